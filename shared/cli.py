"""The `forklift` command: `forklift up` runs a local stack; the rest are client commands."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "up":
        from shared.launcher import main as up

        return up(args[1:])
    from shared.client.cli import main as client_main

    return client_main(args)


if __name__ == "__main__":
    sys.exit(main())
