from castore_di.cli import main

main()
