"""`python -m flatbasin`: the same as the `flatbasin` command."""

from flatbasin.search.cli import main

main()
