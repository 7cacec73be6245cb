"""`python -m karma ...` (also `accelerate launch -m karma train ...`): the `karma` command line."""

from karma.cli import main

main()
