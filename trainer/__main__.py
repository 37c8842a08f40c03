"""`python -m kubetune.trainer` (and so `accelerate launch -m kubetune.trainer`)."""

import sys

from kubetune.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="kubetune train"))
