"""`python -m gklcli` is the same as the `gkl` console script."""

from gklcli.cli import main

main()
