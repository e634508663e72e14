"""``python -m launch.chaos``: kill the training job at random moments, restart it, and check
that it ends exactly as an uninterrupted run does (``--help``; docs/development/chaos.md).

The command only: the tool is the test harness's (tests/harness/chaos.py), which the tests
use as a library.
"""

import sys

from tests.harness.chaos import main

if __name__ == "__main__":
    sys.exit(main())
