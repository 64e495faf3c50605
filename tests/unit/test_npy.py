"""The .npy header: byte-exact with np.save, incremental, and refusing anything unsafe."""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import numpy.lib.format as npformat
import pytest

from shared.arrays import npy
from shared.arrays.npy import NpyFormatError, NpyHeader

ACCEPTED = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 4), (3, 0, 2), (0, 0)]


def sample(dtype: str, shape: tuple[int, ...], order: str) -> np.ndarray:
    """A deterministic, non-trivial array in the requested memory order."""
    values = np.arange(math.prod(shape)) * 7 % 11
    if dtype == "bool":
        values = values % 2
    arr = values.astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "c":
        arr = arr + 1j * arr
    return arr.copy(order=order)  # ascontiguousarray would turn 0-d into 1-d


def saved(arr: np.ndarray, **kwargs: object) -> bytes:
    """What np.save writes for `arr`."""
    out = io.BytesIO()
    np.save(out, arr, **kwargs)
    return out.getvalue()


def raw_header(text: str, version: tuple[int, int] = (1, 0), length: int | None = None) -> bytes:
    """A hand-made header around an arbitrary dict text, possibly lying about its length."""
    body = text.encode("latin-1") + b"\n"
    fmt = "<H" if version == (1, 0) else "<I"
    size = len(body) if length is None else length
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, size) + body


def is_fortran(arr: np.ndarray) -> bool:
    """The fortran_order np.save records."""
    return bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ACCEPTED)
def test_build_and_parse_match_np_save(dtype: str, shape: tuple[int, ...], order: str) -> None:
    arr = sample(dtype, shape, order)
    reference = saved(arr)

    header = npy.build_header(arr.dtype, arr.shape, is_fortran(arr))
    data = arr.tobytes(order="F" if is_fortran(arr) else "C")
    assert header + data == reference
    assert len(header) % 64 == 0
    loaded = np.load(io.BytesIO(header + data), allow_pickle=False)
    np.testing.assert_array_equal(loaded, arr)

    parsed = npy.parse_header(reference)
    assert parsed == NpyHeader(np.dtype(dtype), shape, is_fortran(arr), len(header))
    assert parsed.nbytes == arr.nbytes == len(reference) - parsed.header_len
    rebuilt = np.ndarray(
        parsed.shape, parsed.dtype, buffer=reference[parsed.header_len :], order=parsed.order
    )
    np.testing.assert_array_equal(rebuilt, arr)


def test_order_is_c_unless_fortran_and_multidimensional() -> None:
    f8 = np.dtype("f8")
    assert NpyHeader(f8, (3, 4), True, 128).order == "F"
    assert NpyHeader(f8, (3, 4), False, 128).order == "C"
    assert NpyHeader(f8, (3,), True, 128).order == "C"
    assert NpyHeader(f8, (), True, 128).order == "C"


def test_nbytes_does_not_overflow() -> None:
    assert NpyHeader(np.dtype("c16"), (2**31, 2**31), False, 128).nbytes == 16 * 2**62


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_strict_prefix_needs_more(version: tuple[int, int]) -> None:
    arr = sample("float32", (3, 4), "F")
    out = io.BytesIO()
    npformat.write_array(out, arr, version=version)
    stream = out.getvalue()
    full = npy.parse_header(stream)
    assert full is not None
    assert full.header_len == len(stream) - arr.nbytes
    for end in range(full.header_len):
        assert npy.parse_header(stream[:end]) is None, end
        assert npy.parse_header(memoryview(stream)[:end]) is None, end
    assert npy.parse_header(stream[: full.header_len]) == full
    assert npy.parse_header(memoryview(stream)) == full
    assert full == NpyHeader(np.dtype("float32"), (3, 4), True, full.header_len)


def test_eof_turns_need_more_into_truncated() -> None:
    stream = saved(np.zeros(3))
    assert npy.parse_header(stream, eof=True) is not None
    for end in (0, 3, 9, 40):
        with pytest.raises(NpyFormatError, match=r"truncated \.npy header"):
            npy.parse_header(stream[:end], eof=True)


@pytest.mark.parametrize(
    "prefix",
    [b"PK\x03\x04", b"\x93NUMPX", b"x", b"{'descr'", b"\x93NUMP\x00\x01\x00"],
)
def test_bad_magic(prefix: bytes) -> None:
    with pytest.raises(NpyFormatError, match="bad magic"):
        npy.parse_header(prefix)


@pytest.mark.parametrize("version", [(0, 1), (1, 1), (4, 0), (255, 255)])
def test_unsupported_version(version: tuple[int, int]) -> None:
    with pytest.raises(NpyFormatError, match=r"unsupported \.npy format version"):
        npy.parse_header(b"\x93NUMPY" + bytes(version))


def test_oversized_header_refused_before_it_arrives() -> None:
    head = b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31)
    with pytest.raises(NpyFormatError, match="header too long"):
        npy.parse_header(head)
    with pytest.raises(NpyFormatError, match="header too long"):
        npy.parse_header(saved(np.zeros(3)), max_header_len=64)


GARBLED = [
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
    "{'descr': '<f8', 'fortran_order': False}",
    "{'descr': '<f8', 'fortran_order': 'no', 'shape': (3,)}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': [3]}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3.0,)}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (True, 2)}",
    "{'descr': 'zz9', 'fortran_order': False, 'shape': (3,)}",
    "{'descr': 42, 'fortran_order': False, 'shape': (3,)}",
    "__import__('os').system('echo pwned')",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,)",
    "[1, 2, 3]",
    "-" * 20000 + "1",
    "(" * 500 + ")" * 500,
    "\x00\x01\x02",
]


@pytest.mark.parametrize("text", GARBLED, ids=range(len(GARBLED)))
def test_garbled_dict(text: str) -> None:
    with pytest.raises(NpyFormatError):
        npy.parse_header(raw_header(text))


def test_lying_length_field_reads_the_wrong_bytes_and_fails() -> None:
    good = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"
    stream = raw_header(good, length=20) + b"\0" * 64
    with pytest.raises(NpyFormatError, match=r"invalid \.npy header"):
        npy.parse_header(stream)
    # Claiming more than is there is just "need more" until the stream ends.
    short = raw_header(good, length=4000)
    assert npy.parse_header(short) is None
    with pytest.raises(NpyFormatError, match="truncated"):
        npy.parse_header(short, eof=True)


def test_object_array_from_real_np_save_is_refused() -> None:
    stream = saved(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(NpyFormatError, match=r"object dtype refused.*pickle"):
        npy.parse_header(stream)


def test_structured_with_object_field_is_refused() -> None:
    arr = np.zeros(2, dtype=[("a", "O"), ("b", "<f8")])
    with pytest.raises(NpyFormatError, match="object dtype refused"):
        npy.parse_header(saved(arr, allow_pickle=True))


def test_plain_structured_is_refused() -> None:
    arr = np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])
    with pytest.raises(NpyFormatError, match="structured"):
        npy.parse_header(saved(arr))


def test_big_endian_is_refused_with_a_fix() -> None:
    stream = saved(np.arange(4, dtype=">f8"))
    with pytest.raises(NpyFormatError, match=r"big-endian dtype '>f8' refused.*newbyteorder"):
        npy.parse_header(stream)


@pytest.mark.parametrize("shape", ["(-1,)", "(3, -4)"])
def test_negative_shape(shape: str) -> None:
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    with pytest.raises(NpyFormatError, match="negative"):
        npy.parse_header(raw_header(text))


def test_too_many_dims_and_too_many_bytes() -> None:
    many = "(" + "1, " * 33 + ")"
    with pytest.raises(NpyFormatError, match="dimensions"):
        npy.parse_header(raw_header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': {many}}}"))
    huge = f"({2**40}, {2**40})"
    with pytest.raises(NpyFormatError, match="too large"):
        npy.parse_header(raw_header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': {huge}}}"))


def test_v3_header_with_non_latin1_field_is_refused() -> None:
    arr = np.zeros(2, dtype=[("\u00e9\u4e2d", "<f8")])
    out = io.BytesIO()
    npformat.write_array(out, arr, version=(3, 0))
    with pytest.raises(NpyFormatError):
        npy.parse_header(out.getvalue())


@pytest.mark.parametrize("name", ACCEPTED)
def test_check_dtype_accepts(name: str) -> None:
    assert npy.check_dtype(np.dtype(name)) == np.dtype(name)
    assert npy.check_dtype(np.dtype(name).newbyteorder("<")) == np.dtype(name)


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (np.dtype("O"), "object dtype refused"),
        (np.dtype([("a", "O")]), "object dtype refused"),
        (np.dtype([("a", "<f8"), ("b", "<i4")]), "structured"),
        (np.dtype("V8"), "structured/void"),
        (np.dtype(("<f8", (2,))), "structured/void"),
        (np.dtype("S4"), "string dtype 'S4'|string dtype '|S4'"),
        (np.dtype("U4"), "string dtype '<U4'"),
        (np.dtype("M8[s]"), "datetime dtype '<M8\\[s\\]'"),
        (np.dtype("m8[ns]"), "datetime"),
        (np.dtype(">i4"), "big-endian dtype '>i4'"),
        (np.dtype(">c16"), "big-endian"),
        (np.dtype("float128"), "dtype '<f16' refused: accepted are"),
        (np.dtype("complex256"), "refused"),
    ],
)
def test_check_dtype_refuses(dtype: np.dtype, message: str) -> None:
    with pytest.raises(NpyFormatError, match=message):
        npy.check_dtype(dtype)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("float64", "float64"),
        ("<f8", "float64"),
        ("f8", "float64"),
        ("=f4", "float32"),
        ("uint8", "uint8"),
        ("|u1", "uint8"),
        ("bool", "bool"),
        ("?", "bool"),
        ("complex128", "complex128"),
        ("int", "int64"),
        ("float16", "float16"),
        ("<i2", "int16"),
    ],
)
def test_dtype_from_string_good(text: str, expected: str) -> None:
    assert npy.dtype_from_string(text) == np.dtype(expected)


@pytest.mark.parametrize(
    "text",
    [
        "O",
        "object",
        "V8",
        "[('a','O')]",
        "f8,f8",
        ">f8",
        "float128",
        "S3",
        "U5",
        "M8[s]",
        "datetime64",
        "",
        " ",
        "float64 ",
        "np.float64",
        "int64x",
        "x" * 1000,
        "\x00",
        "{'names': ['a'], 'formats': ['O']}",
    ],
)
def test_dtype_from_string_bad(text: str) -> None:
    with pytest.raises(NpyFormatError):
        npy.dtype_from_string(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3,4", (3, 4)),
        ("1024", (1024,)),
        ("", ()),
        ("  ", ()),
        (" 2 , 3 ", (2, 3)),
        ("0", (0,)),
        ("0,5", (0, 5)),
        (",".join(["1"] * 32), (1,) * 32),
    ],
)
def test_parse_shape_good(text: str, expected: tuple[int, ...]) -> None:
    assert npy.parse_shape(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "3,-4",
        "3.5",
        "a",
        "3,,4",
        "3,",
        ",",
        "1e3",
        "+3",
        "(3,4)",
        "9" * 40,
        ",".join(["1"] * 33),
        "1" * 5000,
    ],
)
def test_parse_shape_bad(text: str) -> None:
    with pytest.raises(NpyFormatError):
        npy.parse_shape(text)


def test_parse_shape_negative_message() -> None:
    with pytest.raises(NpyFormatError, match="negative"):
        npy.parse_shape("3,-4")


def test_build_header_accepts_numpy_ints_and_refuses_bad_input() -> None:
    header = npy.build_header(np.dtype("<u2"), (np.int64(2), np.int32(3)), False)
    assert npy.parse_header(header) == NpyHeader(np.dtype("uint16"), (2, 3), False, len(header))
    with pytest.raises(NpyFormatError):
        npy.build_header(np.dtype("O"), (2,), False)
    with pytest.raises(NpyFormatError, match="negative"):
        npy.build_header(np.dtype("f8"), (-2,), False)
