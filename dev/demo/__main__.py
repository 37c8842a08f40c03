"""`python -m kubetune.dev.demo`: see kubetune.dev.demo.run."""

import sys

from kubetune.dev.demo.run import main

sys.exit(main())
