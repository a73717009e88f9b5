from hcdiag.cli import main

main()
