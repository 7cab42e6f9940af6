from hostwall.cli import main

main(prog_name="hostwall")
