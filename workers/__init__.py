"""sessionbus worker runtime."""
