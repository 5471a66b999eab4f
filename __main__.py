"""``python -m slimformer``: the same command line as the ``slimformer`` script."""

from slimformer.converter.cli import main

if __name__ == "__main__":
    main()
