"""Shim so that ``python -m src.predict`` (and ``torchrun -m src.train``) keep working from a checkout.

The code is the installed package ``ftrain`` (``ftrain.predict``); this file is never installed.
"""

import os
import sys

try:
    import ftrain  # noqa: F401
except ImportError:  # a checkout that was not pip-installed: use its src/ folder
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ftrain.predict import cli, main  # noqa: E402,F401

if __name__ == "__main__":
    cli()
