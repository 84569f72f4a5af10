from fastgen.cli.main import main

main()
