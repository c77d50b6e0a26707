"""`python -m lorabuild` runs the command-line interface."""

from lorabuild.cli import main

if __name__ == "__main__":
    main()
