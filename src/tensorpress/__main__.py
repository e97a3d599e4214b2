"""Run the tensorpress command line: ``python -m tensorpress``."""

from __future__ import annotations

import sys

from tensorpress.cli import main

if __name__ == "__main__":
    sys.exit(main())
