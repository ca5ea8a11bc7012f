from flatbasin.search.cli import main

main()
