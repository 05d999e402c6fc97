"""`python -m cli` runs jobq."""

from .main import main

main()
