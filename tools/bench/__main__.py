"""`python -m tools.bench`: run the benchmark (see tools/bench/__init__.py)."""

import sys

from tools.bench.cli import main

sys.exit(main())
