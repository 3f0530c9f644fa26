"""``python -m fnbackprop``: the command line."""

from fnbackprop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
