"""Generate the blocking client from the async one, as httpcore's `scripts/unasync.py` does.

    python -m forklift._unasync            # writes forklift/_sync/client.py
    python -m forklift._unasync --check    # exit 1 (and a diff) if it is not what this makes

Line by line, the async source's names become their blocking twins (`AsyncClient` →
`Client`, `async_sleep` → `sleep`, `aiter_lines` → `iter_lines`) and `async`/`await` go;
lines between `# unasync: async-only` and `# unasync: end` are left out; the module
docstring is replaced by `HEADER`. Then ruff sorts the imports, drops the unused ones and
formats, so the generated file passes the same lint as the rest (ruff is a test extra).
Every rule must be used, so a stale one shows up. tests/unit/test_client_generated.py runs
the check.
"""

from __future__ import annotations

import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCE = PACKAGE / "_async" / "client.py"
TARGET = PACKAGE / "_sync" / "client.py"

SUBS = [
    (r"Async([A-Z]\w*)", r"\1"),  # AsyncClient, AsyncJob, httpx.AsyncClient, AsyncIterator
    (r"async_(\w+)", r"\1"),  # forklift._concurrency's pairs, async_as_completed
    (r"async def", "def"),
    (r"async with", "with"),
    (r"async for", "for"),
    (r"await ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"aclose", "close"),
    (r"aread", "read"),
    (r"aiter_(\w+)", r"iter_\1"),
]
COMPILED = [(re.compile(rf"\b{pattern}"), replacement) for pattern, replacement in SUBS]
ASYNC_ONLY, END = "# unasync: async-only", "# unasync: end"

HEADER = '''\
"""The blocking client: `Client`, `Job`, `as_completed`.

GENERATED from forklift/_async/client.py by `python -m forklift._unasync`: do not edit this
file. Edit the async client (its docstring says how the two differ), then run that command
again; `--check` (and tests/unit/test_client_generated.py) tells whether this file is current.

    with Client() as fl:                           # FORKLIFT_URL, FORKLIFT_API_KEY
        job = fl.submit("matmul", a=x, b=y)        # returns once submitted
        c = job.result(timeout=60)                 # long-polls; an ndarray or a JSON value
"""
'''


def unasync_lines(source: str, used: set[int]) -> str:
    """The substituted source, without its docstring and its async-only blocks."""
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    skip_to = 0
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        skip_to = first.end_lineno or 0
    out: list[str] = []
    dropping = False
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        if number <= skip_to:
            continue
        if line.strip() == ASYNC_ONLY:
            dropping = True
            continue
        if line.strip() == END and dropping:
            dropping = False
            continue
        if dropping:
            continue
        for index, (pattern, replacement) in enumerate(COMPILED):
            line, count = pattern.subn(replacement, line)
            if count:
                used.add(index)
        out.append(line)
    if dropping:
        raise ValueError(f"{SOURCE.name}: {ASYNC_ONLY!r} without {END!r}")
    return HEADER + "".join(out)


def ruff(args: list[str], text: str) -> str:
    """`ruff <args>` over `text` given as the target file (the repo's ruff settings apply)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ruff {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def generate(source: str | None = None) -> str:
    """The sync client's text, made from the async client's source."""
    used: set[int] = set()
    text = unasync_lines(SOURCE.read_text() if source is None else source, used)
    unused = [SUBS[i][0] for i in range(len(SUBS)) if i not in used]
    if unused:
        raise ValueError(f"unasync rules no longer used (remove them): {unused}")
    text = ruff(["check", "--fix-only", "--select", "I,F401"], text)
    return ruff(["format"], text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    expected = generate()
    if "--check" in args:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current == expected:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            f"{TARGET.name} (as it is)",
            f"{TARGET.name} (as generated)",
        )
        sys.stderr.writelines(diff)
        print(f"{TARGET} is stale: run python -m forklift._unasync", file=sys.stderr)
        return 1
    TARGET.write_text(expected)
    print(f"{SOURCE.relative_to(PACKAGE.parent)} -> {TARGET.relative_to(PACKAGE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
