"""``python -m bnstats``: the same as the ``bnstats`` command."""

from bnstats.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
