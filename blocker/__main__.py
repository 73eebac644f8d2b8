"""`python -m blocker` runs the command line."""

import sys

from blocker.cli import main

sys.exit(main())
