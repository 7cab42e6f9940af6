from hostwall.cli import run

run()
