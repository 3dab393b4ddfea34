"""``python -m difflab``: the command line (:mod:`difflab.cli`)."""

from difflab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
