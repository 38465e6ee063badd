from lazyinterp.cli import main

main()
