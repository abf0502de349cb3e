"""`python -m warmserve.cli` runs the command line (the GPU machine has no console script)."""

from warmserve.cli import main

main()
