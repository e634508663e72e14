"""Launch and test tools run from a checkout: python -m launch.chaos, launch.bench, launch.bench_checkpoint (launch.run: the old name of ftrain-run)."""

import os
import sys

try:
    import ftrain  # noqa: F401
except ImportError:  # a checkout that was not pip-installed: use its src/ folder
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "src"))
