from qspec.cli import run

run()
