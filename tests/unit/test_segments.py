"""Named shared-memory segments against the real /dev/shm.

Every test gets its own name prefix and checks that /dev/shm holds none of its segments after.
"""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shared.arrays import segments
from shared.arrays.npy import NpyFormatError
from shared.arrays.segments import (
    ShmFullError,
    attach_segment,
    create_segment,
    list_segments,
    ndarray_view,
    unlink_segment,
    validate_segment_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LEAK_WARNING = "leaked shared_memory"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix unique to this test; fails the test if any of its segments survive it."""
    value = f"forklift_t{uuid.uuid4().hex[:8]}_"
    yield value
    left = list_segments(value)
    for name in left:
        unlink_segment(name)
    assert left == [], f"test left segments behind: {left}"


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh interpreter (not a fork) and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def make_array(prefix: str, arr: np.ndarray, order: str = "C") -> str:
    """Create a segment holding `arr` and return its name (the creator's mapping is closed)."""
    name = prefix + "arr"
    with create_segment(name, arr.nbytes) as seg:
        view = ndarray_view(seg, arr.dtype, arr.shape, order)
        view[...] = arr
        del view
    return name


CHILD_READER = """
    import sys
    import numpy as np
    from shared.arrays.segments import attach_segment, ndarray_view

    name, size = sys.argv[1], int(sys.argv[2])
    with attach_segment(name, size) as seg:
        arr = ndarray_view(seg, np.dtype("float64"), (512, 300), "F")
        assert not arr.flags.writeable
        print(repr(float(arr.sum())), arr[7, 11], arr.flags.f_contiguous)
        del arr
"""


def test_other_process_attaches_reads_exits_and_segment_survives(prefix: str) -> None:
    arr = np.asfortranarray(np.random.default_rng(1).standard_normal((512, 300)))
    name = make_array(prefix, arr, "F")

    for _ in range(2):  # a second reader proves the first one's exit removed nothing
        child = run_child(CHILD_READER, name, str(arr.nbytes))
        assert child.returncode == 0, child.stderr
        assert child.stdout.split() == [repr(float(arr.sum())), str(arr[7, 11]), "True"]
        assert LEAK_WARNING not in child.stderr
        assert child.stderr == ""
        assert list_segments(prefix) == [name]

    assert unlink_segment(name) is True


def test_the_harness_would_catch_resource_tracker_unlinking(prefix: str) -> None:
    """Control: attaching with SharedMemory (3.11) deletes the segment when the child exits."""
    name = make_array(prefix, np.arange(10.0))
    child = run_child(
        """
        import sys
        from multiprocessing.shared_memory import SharedMemory
        SharedMemory(name=sys.argv[1]).close()
        """,
        name,
    )
    assert child.returncode == 0, child.stderr
    if sys.version_info < (3, 13):
        assert LEAK_WARNING in child.stderr
        assert list_segments(prefix) == []
    unlink_segment(name)


def test_read_only_view_refuses_writes(prefix: str) -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    name = make_array(prefix, arr)
    with attach_segment(name, arr.nbytes) as seg:
        assert seg.readonly and seg.buffer.readonly
        view = ndarray_view(seg, arr.dtype, arr.shape, "C")
        np.testing.assert_array_equal(view, arr)
        assert not view.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = 99
        with pytest.raises(ValueError):
            view.flags.writeable = True
        with pytest.raises(TypeError):
            seg.buffer[0:1] = b"x"
        del view
    unlink_segment(name)


def test_writable_attach_shares_memory_with_creator(prefix: str) -> None:
    name = prefix + "rw"
    with create_segment(name, 16) as owner, attach_segment(name, 16, writable=True) as other:
        assert not other.readonly
        other.buffer[:5] = b"hello"
        assert bytes(owner.buffer[:5]) == b"hello"
    unlink_segment(name)


def test_create_is_exclusive_private_and_sized(prefix: str) -> None:
    name = prefix + "x"
    with create_segment(name, 10_000) as seg:
        assert (seg.name, seg.size, len(seg.buffer), seg.readonly) == (name, 10_000, 10_000, False)
        info = os.stat(segments.segment_path(name))
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == 10_000
        assert info.st_blocks * 512 >= 10_000  # allocated up front, not sparse
        with pytest.raises(FileExistsError):
            create_segment(name, 10)
    assert os.stat(segments.segment_path(name)).st_size == 10_000  # untouched by the refusal
    assert list_segments(prefix) == [name]
    unlink_segment(name)


def test_zero_byte_and_zero_d_arrays(prefix: str) -> None:
    empty = prefix + "empty"
    with create_segment(empty, 0) as seg:
        assert seg.size == 0 and len(seg.buffer) == 0
        assert os.stat(segments.segment_path(empty)).st_size == 1
        assert ndarray_view(seg, np.dtype("f8"), (0, 3), "C").shape == (0, 3)
        assert ndarray_view(seg, np.dtype("f8"), (0,), "F").shape == (0,)
    with attach_segment(empty, 0) as seg:
        view = ndarray_view(seg, np.dtype("u1"), (4, 0), "C")
        assert view.size == 0 and not view.flags.writeable
        del view

    scalar = prefix + "scalar"
    with create_segment(scalar, 8) as seg:
        ndarray_view(seg, np.dtype("f8"), (), "C")[()] = 2.5
    with attach_segment(scalar, 8) as seg:
        view = ndarray_view(seg, np.dtype("f8"), (), "C")
        assert view.shape == () and view[()] == 2.5 and not view.flags.writeable
        del view
    assert unlink_segment(empty) and unlink_segment(scalar)


def test_ndarray_view_checks(prefix: str) -> None:
    name = prefix + "small"
    with create_segment(name, 24) as seg:
        with pytest.raises(ValueError, match="does not fit"):
            ndarray_view(seg, np.dtype("f8"), (4,), "C")
        with pytest.raises(NpyFormatError, match="object"):
            ndarray_view(seg, np.dtype("O"), (3,), "C")
        with pytest.raises(ValueError, match="order"):
            ndarray_view(seg, np.dtype("f8"), (3,), "K")
        assert ndarray_view(seg, np.dtype("f4"), (2, 3), "F").flags.f_contiguous
    unlink_segment(name)


def test_close_is_idempotent_and_waits_for_live_views(prefix: str) -> None:
    name = prefix + "c"
    seg = create_segment(name, 64)
    view = ndarray_view(seg, np.dtype("i8"), (8,), "C")
    view[:] = np.arange(8)
    assert seg.close() is False  # the array still uses the mapping
    assert seg.closed and seg.close() is True
    np.testing.assert_array_equal(view, np.arange(8))  # still mapped, no crash
    del view
    gc.collect()

    other = attach_segment(name, 64)
    assert other.close() is True
    assert other.close() is True
    with pytest.raises(ValueError, match="does not fit"):
        ndarray_view(other, np.dtype("i8"), (8,), "C")
    unlink_segment(name)


def test_unlink_twice(prefix: str) -> None:
    name = prefix + "u"
    create_segment(name, 1).close()
    assert unlink_segment(name) is True
    assert unlink_segment(name) is False
    with pytest.raises(FileNotFoundError):
        attach_segment(name, 1)


def test_attach_checks_size(prefix: str) -> None:
    name = prefix + "sz"
    create_segment(name, 100).close()
    with pytest.raises(ValueError, match=f"segment {name} is smaller than its record says"):
        attach_segment(name, 101)
    attach_segment(name, 100).close()
    attach_segment(name, 50).close()
    unlink_segment(name)


def test_shm_full(prefix: str) -> None:
    stats = os.statvfs(segments.SHM_DIR)
    if stats.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit")
    # More than the whole filesystem: refused up front, so nothing is actually allocated.
    too_big = stats.f_blocks * stats.f_frsize + 2**30
    assert too_big > stats.f_bavail * stats.f_frsize
    with pytest.raises(ShmFullError, match="shared memory full") as caught:
        create_segment(prefix + "huge", too_big)
    assert isinstance(caught.value, OSError) and caught.value.errno is not None
    assert list_segments(prefix) == []


@pytest.mark.parametrize(
    "name",
    [
        "forklift_abc",
        "forklift_a-b_C9",
        "forklift_" + "x" * 200,
    ],
)
def test_validate_segment_name_accepts(name: str) -> None:
    assert validate_segment_name(name, "forklift_") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "forklift_",
        "forklift_" + "x" * 201,
        "forklift_../etc",
        "forklift_a/b",
        "/forklift_abc",
        "/dev/shm/forklift_abc",
        "..",
        "other_abc",
        "FORKLIFT_abc",
        "forklift_a b",
        "forklift_a.b",
        "forklift_\u00e9",
        "forklift_a\x00",
    ],
)
def test_validate_segment_name_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="segment name"):
        validate_segment_name(name, "forklift_")


@pytest.mark.parametrize("bad_prefix", ["", "a/b", "../"])
def test_validate_segment_name_refuses_bad_prefix(bad_prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        validate_segment_name(bad_prefix + "abc", bad_prefix)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".", "x" * 251])
def test_low_level_calls_refuse_paths(name: str) -> None:
    for call in (
        lambda: create_segment(name, 1),
        lambda: attach_segment(name, 1),
        lambda: unlink_segment(name),
    ):
        with pytest.raises(ValueError, match="bad segment name"):
            call()


@pytest.mark.parametrize("size", [-1, 2**63, 1.5, True])
def test_bad_sizes(prefix: str, size: object) -> None:
    with pytest.raises(ValueError, match="bad segment size"):
        create_segment(prefix + "s", size)  # type: ignore[arg-type]


def test_list_segments(prefix: str) -> None:
    names = [prefix + suffix for suffix in ("b", "a", "c")]
    for name in names:
        create_segment(name, 1).close()
    assert list_segments(prefix) == sorted(names)
    assert list_segments(prefix + "a") == [prefix + "a"]
    for name in names:
        unlink_segment(name)
    assert list_segments(prefix) == []
