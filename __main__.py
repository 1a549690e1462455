"""`python -m clipsql …` runs the command line, exactly as the `clipsql` console script does."""
from clipsql.cli import main

main()
