"""The sync client is generated from the async one: this fails when the two have drifted."""

from __future__ import annotations

from forklift import _unasync


def test_sync_client_is_what_the_generator_makes_from_the_async_one() -> None:
    current = _unasync.TARGET.read_text()
    assert current == _unasync.generate(), (
        f"{_unasync.TARGET.name} differs from what `python -m forklift._unasync` makes from "
        f"{_unasync.SOURCE.name}: edit the async client, then run that command"
    )


def test_async_only_blocks_and_the_docstring_stay_out_of_the_sync_client() -> None:
    generated = _unasync.generate()
    assert "__await__" in _unasync.SOURCE.read_text()
    assert "__await__" not in generated and "unasync:" not in generated
    code = [line for line in generated.splitlines() if not line.lstrip().startswith(('"', "#"))]
    assert not [line for line in code if "await " in line or "async def" in line]
    assert generated.startswith(_unasync.HEADER)
