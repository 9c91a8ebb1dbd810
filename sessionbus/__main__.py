"""``python -m sessionbus``: the command line."""

from sessionbus.cli import main

raise SystemExit(main())
