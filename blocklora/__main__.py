from blocklora.cli import main

main()
