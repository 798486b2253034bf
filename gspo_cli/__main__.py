"""`python -m gspo_cli` is the same as the `gspo` command."""

from gspo_cli.cli import main

main()
