"""`python -m polystream` runs the command line."""

from .cli import main

main()
