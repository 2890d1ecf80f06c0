"""``python -m auxframe`` (and ``torchrun -m auxframe``) is the same as the ``auxframe`` command."""

from auxframe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
