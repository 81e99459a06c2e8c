"""`python -m fewshot.cli`: the command line without the installed `fewshot` script."""

from fewshot.cli import main

main()
