"""`python -m forklift`: the `forklift` command without its console script."""

from __future__ import annotations

import sys

from forklift.cli import main

if __name__ == "__main__":
    sys.exit(main())
