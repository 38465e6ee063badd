"""``python -m lazyinterp``: the command line."""
from lazyinterp.cli import main

main()
