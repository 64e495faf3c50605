"""The `forklift` command: `forklift up` runs a local stack; the rest are client commands."""

from __future__ import annotations

import sys

from shared.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
