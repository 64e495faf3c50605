"""How should create_segment allocate a shared-memory segment before it is filled?

A fresh tmpfs file is sparse: every first write to a 4 KiB page takes a fault that allocates and
zeroes it, and if /dev/shm is full the write dies with SIGBUS instead of an error. This script
times "create + fill" for several allocation strategies so shared/arrays/segments.py can pick
the fastest one that still reports a full /dev/shm as an error (posix_fallocate does; a sparse
file or MAP_POPULATE alone does not).

Fills: 'slice' copies 1 MiB bytes chunks by memoryview slice assignment (what the API does with
an upload body); 'socket' receives into the segment with recv_into from a socketpair fed by a
thread (a body arriving from the network).

Run: python bench/fill_strategies.py [--sizes 16,256,1024] [--repeat N]
"""

from __future__ import annotations

import _posixshmem
import argparse
import mmap
import os
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 1 << 20
MIB = 1 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


@dataclass(frozen=True)
class Strategy:
    """One way of creating a segment: allocate the file, map it, maybe prefault it."""

    name: str
    fallocate: bool
    map_populate: bool
    madvise_populate: bool


STRATEGIES = (
    Strategy("ftruncate", False, False, False),
    Strategy("ftruncate + MAP_POPULATE", False, True, False),
    Strategy("ftruncate + MADV_POPULATE_WRITE", False, False, True),
    Strategy("fallocate", True, False, False),
    Strategy("fallocate + MAP_POPULATE", True, True, False),
    Strategy("fallocate + MADV_POPULATE_WRITE", True, False, True),
)


def create(name: str, size: int, strategy: Strategy) -> mmap.mmap:
    """Create and map a segment the way `strategy` says; the caller unlinks it."""
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        if strategy.fallocate:
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if strategy.map_populate else 0)
        mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if strategy.madvise_populate:
        mapping.madvise(MADV_POPULATE_WRITE)
    return mapping


def fill_slices(view: memoryview, source: bytes) -> None:
    """Copy 1 MiB chunks in, like the API writing an upload body chunk by chunk."""
    for offset in range(0, len(view), CHUNK):
        end = min(offset + CHUNK, len(view))
        view[offset:end] = source[: end - offset]


def fill_socket(view: memoryview, source: bytes) -> None:
    """Receive the data from a socketpair fed by a sender thread."""
    receiver, sender = socket.socketpair()
    total = len(view)

    def send() -> None:
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            sender.sendall(source[:n])
            sent += n

    thread = threading.Thread(target=send)
    thread.start()
    try:
        offset = 0
        while offset < total:
            offset += receiver.recv_into(view[offset : offset + CHUNK])
    finally:
        thread.join()
        receiver.close()
        sender.close()


def measure(
    strategy: Strategy, size: int, fill: Callable[[memoryview, bytes], None], source: bytes
) -> tuple[float, float, float]:
    """Seconds for create, for create + fill, and minor faults per MiB taken by the fill alone.

    Faults are counted after create returns because the kernel counts MAP_POPULATE's and
    MADV_POPULATE_WRITE's own faults too; what matters is what the writer still pays.
    """
    name = f"forklift_bench_{os.getpid()}"
    start = time.perf_counter()
    mapping = create(name, size, strategy)
    created = time.perf_counter() - start
    try:
        view = memoryview(mapping)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fill(view, source)
        elapsed = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        view.release()
    finally:
        mapping.close()
        _posixshmem.shm_unlink("/" + name)
    return created, elapsed, faults / (size / MIB)


def run(sizes_mib: list[int], repeat: int) -> None:
    """Print one markdown row per strategy and size: medians over `repeat` runs."""
    source = os.urandom(CHUNK)
    print("| strategy | size | create ms | slice GB/s | socket GB/s | fill faults/MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for size_mib in sizes_mib:
        size = size_mib * MIB
        for strategy in STRATEGIES:
            sliced = [measure(strategy, size, fill_slices, source) for _ in range(repeat)]
            socketed = [measure(strategy, size, fill_socket, source) for _ in range(repeat)]
            create_ms = statistics.median(c for c, _, _ in sliced) * 1e3
            slice_rate = size / statistics.median(t for _, t, _ in sliced) / 1e9
            socket_rate = size / statistics.median(t for _, t, _ in socketed) / 1e9
            faults = statistics.median(f for _, _, f in sliced)
            print(
                f"| {strategy.name} | {size_mib} MiB | {create_ms:.1f} | {slice_rate:.2f} "
                f"| {socket_rate:.2f} | {faults:.0f} |",
                flush=True,
            )


def main() -> None:
    """Parse arguments and run the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,256,1024", help="segment sizes in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell (median)")
    args = parser.parse_args()
    run([int(s) for s in args.sizes.split(",")], args.repeat)


if __name__ == "__main__":
    main()
