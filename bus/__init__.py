"""sessionbus client side."""
