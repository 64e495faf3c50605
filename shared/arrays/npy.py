"""The .npy header: parsed incrementally from a stream's first bytes, never unpickled.

The API reads an upload chunk by chunk and must know the dtype and shape before it can size a
shared-memory segment, so `parse_header` answers "need more bytes" (None) until the header is
complete. The dict itself is read by numpy's own header reader, which uses `ast.literal_eval`
(no eval, no pickle). `check_dtype` is the single place that decides which dtypes forklift
accepts: plain little-endian numbers only, because anything holding Python objects would need
pickle and anything else is not worth the risk of raw bytes being misread.
"""

from __future__ import annotations

import io
import math
import re
import struct
import sys
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npformat

MAGIC_PREFIX = b"\x93NUMPY"
MAX_NDIM = 32
# Shapes whose byte count does not fit in a signed 64-bit int cannot be mapped or indexed.
_MAX_NBYTES = 2**63 - 1
# Version -> struct format of the header-length field (1.0: uint16, 2.0/3.0: uint32).
_LENGTH_FORMATS = {(1, 0): "<H", (2, 0): "<I", (3, 0): "<I"}
_ACCEPTED_NAMES = (
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
)
ACCEPTED_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(name) for name in _ACCEPTED_NAMES)
# Dtype spellings worth handing to np.dtype: letters, digits and a byte-order mark. Keeps list
# and comma syntax ("[('a','O')]", "f8,f8") away from numpy's parser altogether.
_DTYPE_TEXT = re.compile(r"[<>|=]?(\?|[A-Za-z][A-Za-z0-9]{0,15})")
_DIM_TEXT = re.compile(r"[0-9]{1,19}")


class NpyFormatError(ValueError):
    """A .npy stream, dtype or shape that forklift will not accept; the message says why."""


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy header says about the array that follows it."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    header_len: int  # magic + length field + dict + padding: the offset of the data

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes (Python ints, so no overflow)."""
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def order(self) -> str:
        """Memory order for np.ndarray: 'F' only matters when there are two or more axes."""
        return "F" if self.fortran_order and len(self.shape) > 1 else "C"


def parse_header(
    prefix: bytes | memoryview, max_header_len: int = 65536, *, eof: bool = False
) -> NpyHeader | None:
    """Parse the header at the start of a .npy stream.

    Returns None while `prefix` is too short to tell, so a streaming reader can keep
    accumulating; raises NpyFormatError as soon as the bytes can never become a valid header,
    so a bad upload is refused before its body is read. `max_header_len` bounds the header
    dict (with padding) in bytes, checked before waiting for it. With `eof=True`, `prefix` is
    the whole stream and a header that needs more bytes is refused as truncated.
    """
    header = _parse_header(prefix, max_header_len)
    if header is None and eof:
        raise NpyFormatError(f"truncated .npy header: the stream ended after {len(prefix)} bytes")
    return header


def _parse_header(prefix: bytes | memoryview, max_header_len: int) -> NpyHeader | None:
    """parse_header without the end-of-stream rule."""
    data = bytes(prefix[: len(MAGIC_PREFIX) + 2])
    if not MAGIC_PREFIX.startswith(data[: len(MAGIC_PREFIX)]):
        raise NpyFormatError("not a .npy file: bad magic (expected b'\\x93NUMPY')")
    if len(data) < len(MAGIC_PREFIX) + 2:
        return None
    version = (data[-2], data[-1])
    length_format = _LENGTH_FORMATS.get(version)
    if length_format is None:
        raise NpyFormatError(
            f"unsupported .npy format version {version[0]}.{version[1]} (1.0, 2.0, 3.0 work)"
        )
    start = len(MAGIC_PREFIX) + 2
    length_end = start + struct.calcsize(length_format)
    if len(prefix) < length_end:
        return None
    (dict_len,) = struct.unpack(length_format, bytes(prefix[start:length_end]))
    if dict_len > max_header_len:
        raise NpyFormatError(
            f".npy header too long: {dict_len} bytes (limit {max_header_len}); "
            "np.save writes a few hundred at most"
        )
    header_len = length_end + dict_len
    if len(prefix) < header_len:
        return None
    shape, fortran_order, dtype = _read_dict(bytes(prefix[:header_len]), version, max_header_len)
    dtype = check_dtype(dtype)
    return NpyHeader(dtype, _check_shape(shape, dtype.itemsize), fortran_order, header_len)


def _read_dict(
    header: bytes, version: tuple[int, int], max_header_len: int
) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Run numpy's safe header reader on a complete header; its errors become NpyFormatError."""
    if version == (3, 0):
        header = _v3_as_v2(header)
    stream = io.BytesIO(header)
    stream.seek(len(MAGIC_PREFIX) + 2)
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    try:
        return reader(stream, max_header_size=max_header_len)
    # Hostile text reaches literal_eval, numpy's Python-2 fallback (tokenize) and np.dtype,
    # which raise ValueError, SyntaxError, TokenError, TypeError, MemoryError (deep nesting)...
    # Whatever they raise, the header is invalid.
    except Exception as exc:
        raise NpyFormatError(f"invalid .npy header: {_shorten(str(exc))}") from None


def _v3_as_v2(header: bytes) -> bytes:
    """Re-encode a 3.0 header (UTF-8 dict) as 2.0 (latin-1), which numpy reads publicly.

    3.0 exists only for non-latin-1 field names of structured dtypes, which forklift refuses
    anyway; a 3.0 header that does not fit latin-1 is therefore refused here.
    """
    offset = len(MAGIC_PREFIX) + 2 + 4
    try:
        text = header[offset:].decode("utf-8")
        body = text.encode("latin-1")
    except UnicodeError:
        raise NpyFormatError(
            "invalid .npy 3.0 header: not UTF-8, or it names structured fields "
            "(forklift accepts plain numeric dtypes only)"
        ) from None
    return MAGIC_PREFIX + bytes([2, 0]) + struct.pack("<I", len(body)) + body


def _shorten(text: str, limit: int = 200) -> str:
    """Keep error messages readable when they quote a hostile header."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shape(shape: tuple[object, ...], itemsize: int) -> tuple[int, ...]:
    """Refuse shapes numpy could not allocate or that would overflow a byte count."""
    if len(shape) > MAX_NDIM:
        raise NpyFormatError(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
    dims = []
    for dim in shape:
        # bool is an int subclass and numpy's reader lets (True, 2) through.
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise NpyFormatError(f"shape {shape!r} is not a tuple of ints")
        if dim < 0:
            raise NpyFormatError(f"shape {shape!r} has a negative dimension")
        dims.append(dim)
    if itemsize * math.prod(dims) > _MAX_NBYTES or any(d > _MAX_NBYTES for d in dims):
        raise NpyFormatError(f"shape {tuple(dims)!r} is too large to address")
    return tuple(dims)


def check_dtype(dtype: np.dtype) -> np.dtype:
    """Decide whether forklift accepts `dtype`; return its canonical native form.

    Accepted: bool, int8..int64, uint8..uint64, float16/32/64, complex64/128, little-endian.
    Everything else is refused with a message naming the dtype and what to send instead.
    """
    dtype = np.dtype(dtype)
    shown = _describe(dtype)
    if dtype.hasobject:
        raise NpyFormatError(
            f"object dtype refused ({shown}): arrays holding Python objects would need pickle"
        )
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind == "V":
        raise NpyFormatError(
            f"structured/void dtype {shown} refused: send each field as its own plain array"
        )
    if dtype.kind in "SUa":
        raise NpyFormatError(f"string dtype {shown} refused: forklift takes numeric arrays only")
    if dtype.kind in "mM":
        raise NpyFormatError(
            f"datetime dtype {shown} refused: send it as int64 (arr.view('int64')) instead"
        )
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        raise NpyFormatError(
            f"big-endian dtype {shown} refused: send little-endian "
            "(arr.astype(arr.dtype.newbyteorder('<')))"
        )
    for accepted in ACCEPTED_DTYPES:
        if dtype == accepted:
            return accepted
    raise NpyFormatError(f"dtype {shown} refused: accepted are {', '.join(_ACCEPTED_NAMES)}")


def _describe(dtype: np.dtype) -> str:
    """A short, quoted spelling of a dtype for error messages."""
    text = dtype.str if dtype.fields is None else str(dtype.descr)
    return repr(_shorten(text, 120))


def dtype_from_string(text: str) -> np.dtype:
    """Parse a dtype given as text (a query parameter), e.g. 'float64', '<f8', 'uint8'.

    Only simple spellings reach np.dtype, so list/comma syntax and garbage are refused with
    NpyFormatError rather than numpy's TypeError, and the result passes `check_dtype`.
    """
    if not isinstance(text, str) or not _DTYPE_TEXT.fullmatch(text):
        raise NpyFormatError(f"not a dtype: {_shorten(repr(text), 60)} (try 'float64' or '<f8')")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        raise NpyFormatError(f"not a dtype: {text!r} (try 'float64' or '<f8')") from None
    return check_dtype(dtype)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse a shape given as text: '3,4', '1024', or '' for a 0-d array.

    Whitespace around numbers is allowed; signs, floats, empty parts and more than
    MAX_NDIM dimensions are refused with NpyFormatError.
    """
    if not isinstance(text, str) or len(text) > 32 * (MAX_NDIM + 1):
        raise NpyFormatError("shape text is too long")
    if not text.strip():
        return ()
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_NDIM:
        raise NpyFormatError(f"shape has {len(parts)} dimensions; at most {MAX_NDIM} allowed")
    for part in parts:
        if not _DIM_TEXT.fullmatch(part):
            what = "a negative dimension" if part.startswith("-") else f"{part!r}, not an int"
            raise NpyFormatError(f"bad shape {_shorten(repr(text), 60)}: {what}")
    return _check_shape(tuple(int(part) for part in parts), 1)


def build_header(dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> bytes:
    """Build the header np.save would write for such an array (magic + dict, 64-byte aligned).

    Header bytes followed by the raw data bytes form a file np.load(allow_pickle=False) reads.
    """
    dtype = check_dtype(dtype)
    fields = {
        "descr": npformat.dtype_to_descr(dtype),
        "fortran_order": bool(fortran_order),
        # int(): numpy 2 scalars repr as 'np.int64(3)', which no .npy reader accepts.
        "shape": _check_shape(tuple(int(d) for d in shape), dtype.itemsize),
    }
    out = io.BytesIO()
    try:
        npformat.write_array_header_1_0(out, fields)
    except ValueError:  # dict longer than 1.0's uint16 length field; unreachable for 32 dims
        out = io.BytesIO()
        npformat.write_array_header_2_0(out, fields)
    return out.getvalue()
