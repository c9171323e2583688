"""``python -m mergebench``: the CLI, for an interpreter whose scripts folder is not on PATH."""

from mergebench.cli.app import main

main()
