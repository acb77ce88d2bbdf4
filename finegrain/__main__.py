"""`python -m finegrain` runs the command line (also what `torchrun -m finegrain` uses)."""

from finegrain.cli import main

if __name__ == "__main__":
    main()
