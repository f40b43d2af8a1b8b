"""`python -m booksmith ...` is the `booksmith` command."""

from booksmith.flows.cli import main

if __name__ == "__main__":
    main()
