"""`python -m evaluator`: see evaluator.cli."""

import sys

from evaluator.cli import main

if __name__ == "__main__":
    sys.exit(main())
