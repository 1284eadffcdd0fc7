"""`python -m trl_uniapl ...` is the `trl-uniapl` command."""

from .cli import main

if __name__ == "__main__":
    main()
