"""``python -m data_prep`` runs the ``longnet-prep`` command line."""

from data_prep.cli import main

if __name__ == "__main__":
    main()
