"""SMV (ADSC) images: the original's 512-byte header and unsigned 16-bit data."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..errors import InputError
from ..units import RTD

HEADER_BYTES = 512


@dataclass
class SMVGeometry:
    """The values the original puts in its headers, in its own units
    (metres and radians; DIALS origin in mm, XDS origin in pixels)."""
    fpixels: int
    spixels: int
    pixel_size: float
    distance: float
    wavelength: float  # metres
    Xbeam: float
    Ybeam: float
    Fbeam: float
    Sbeam: float
    detsize_s: float
    dials_origin: tuple[float, float, float]  # mm
    ORGX: float
    ORGY: float
    close_distance: float
    phi0: float  # radians
    osc: float
    twotheta: float


def byte_order_name() -> str:
    return "little_endian" if sys.byteorder == "little" else "big_endian"


def _g(x: float) -> str:
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%g" % x


def header_text(g: SMVGeometry, denzo_sign: float = -1.0, byte_order: str | None = None,
                header_bytes: int | None = None) -> str:
    """Header text up to and including the closing brace and form feed.

    Keys, order and ``%g`` formatting follow the original; each value is
    computed with the same operations.  The original writes the DENZO centres
    as ``S - 0.0*pixel`` in the int image (``denzo_sign=-1``) and
    ``S + 0.0*pixel`` in the noise image (``denzo_sign=+1``): the same number
    except when the centre is -0.0, which prints as ``-0`` only in the first.
    DIALS_ORIGIN has no trailing semicolon, as in the original.

    The header block is 512 bytes.  Only unusually long numbers make the text
    longer; the original then writes it anyway, still declaring 512, which
    shifts the pixels for every reader, so here the block grows to 1024
    (``header_bytes`` forces a size).
    """
    if header_bytes is None:
        text = header_text(g, denzo_sign, byte_order, HEADER_BYTES)
        if len(text) <= HEADER_BYTES:
            return text
        size = -(-len(text) // HEADER_BYTES) * HEADER_BYTES
        return header_text(g, denzo_sign, byte_order, size)
    px = float(g.pixel_size)
    zero = (-0.0 if denzo_sign < 0 else 0.0) * px
    phi = g.phi0 * RTD
    lines = [
        "{",
        f"HEADER_BYTES={header_bytes};",
        "DIM=2;",
        f"BYTE_ORDER={byte_order or byte_order_name()};",
        "TYPE=unsigned_short;",
        "SIZE1=%d;" % g.fpixels,
        "SIZE2=%d;" % g.spixels,
        f"PIXEL_SIZE={_g(px * 1000.0)};",
        f"DISTANCE={_g(g.distance * 1000.0)};",
        f"WAVELENGTH={_g(g.wavelength * 1e10)};",
        f"BEAM_CENTER_X={_g(g.Xbeam * 1000.0)};",
        f"BEAM_CENTER_Y={_g(g.Ybeam * 1000)};",
        f"ADXV_CENTER_X={_g(g.Fbeam * 1000.0)};",
        f"ADXV_CENTER_Y={_g((g.detsize_s - g.Sbeam) * 1000)};",
        f"MOSFLM_CENTER_X={_g((g.Sbeam - 0.5 * px) * 1000.0)};",
        f"MOSFLM_CENTER_Y={_g((g.Fbeam - 0.5 * px) * 1000)};",
        f"DENZO_X_BEAM={_g((g.Sbeam + zero) * 1000.0)};",
        f"DENZO_Y_BEAM={_g((g.Fbeam + zero) * 1000)};",
        "DIALS_ORIGIN=%s,%s,%s" % tuple(_g(v) for v in g.dials_origin),
        f"XDS_ORGX={_g(g.ORGX)};",
        f"XDS_ORGY={_g(g.ORGY)};",
        f"CLOSE_DISTANCE={_g(g.close_distance * 1000.0)};",
        f"PHI={_g(phi)};",
        f"OSC_START={_g(phi)};",
        f"OSC_RANGE={_g(g.osc * RTD)};",
        f"TWOTHETA={_g(g.twotheta * RTD)};",
        "DETECTOR_SN=000;",
        "BEAMLINE=fake;",
    ]
    return "\n".join(lines) + "\n}\f"


def smv_bytes(data: np.ndarray, header: Union[str, SMVGeometry], denzo_sign: float = -1.0) -> bytes:
    """Whole file: header padded with spaces to 512 bytes, then native uint16 pixels.

    ``header`` is the text from ``header_text`` or an ``SMVGeometry``; the
    block is padded to the size its HEADER_BYTES declares.
    """
    if isinstance(header, SMVGeometry):
        header = header_text(header, denzo_sign)
    head = header.encode("ascii")
    size = int(_declared_size(header))
    if len(head) > size:
        raise InputError(f"SMV header needs {len(head)} bytes, more than its HEADER_BYTES={size}")
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError("SMV data must be 2-D (spixels, fpixels)")
    body = np.ascontiguousarray(arr, dtype=np.uint16).astype("=u2").tobytes()
    return head + b" " * (size - len(head)) + body


def _declared_size(text: str) -> float:
    v = value_of(text.split("}", 1)[0], "HEADER_BYTES")
    return HEADER_BYTES if v != v or v < 1 else v


def write_smv(path, data: np.ndarray, header: Union[str, SMVGeometry], denzo_sign: float = -1.0) -> None:
    """Write an SMV file whole or not at all (see ``smv_bytes``)."""
    from .atomic import atomic_write
    atomic_write(path, smv_bytes(data, header, denzo_sign))


def parse_header(text: str) -> dict[str, str]:
    """``KEY=value;`` pairs of a header (later keys win, like the original's lookup)."""
    out: dict[str, str] = {}
    body = text.split("}", 1)[0]
    for item in re.split(r"[;\n]", body):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().lstrip("{").strip()
            if key:
                out[key] = value.strip()
    return out


def value_of(header_text: str, keyword: str) -> float:
    """The original's header lookup: the number after the '=' that follows the
    LAST occurrence of ``keyword`` anywhere in the header (so "DISTANCE" finds
    CLOSE_DISTANCE in the original's own files, "ORGX" finds XDS_ORGX);
    NaN when the keyword is absent, 0.0 when no '=' follows."""
    idx = header_text.rfind(keyword)
    if idx < 0:
        return math.nan
    rest = header_text[idx + len(keyword):]
    eq = rest.find("=")
    if eq < 0:
        return 0.0
    return _atof(rest[eq + 1:])


_NUM = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))",
                  re.IGNORECASE)


def _atof(text: str) -> float:
    m = _NUM.match(text)
    return float(m.group(1)) if m else 0.0


_TYPES = {"unsigned_short": "u2", "signed_short": "i2", "unsigned_long": "u4", "unsigned_int": "u4",
          "signed_long": "i4", "signed_int": "i4", "long": "i4", "int": "i4",
          "float": "f4", "float_ieee": "f4", "float32": "f4", "double": "f8"}


def read_smv_header(path) -> tuple[str, int]:
    """(header text, file size in bytes), reading only the header; raises
    ``InputError`` for anything not SMV or shorter than its header says."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
            file_size = os.fstat(fh.fileno()).st_size
            if not raw.startswith(b"{") or b"HEADER_BYTES" not in raw:
                raise InputError(f"{path} is not an SMV image (it does not start with '{{ HEADER_BYTES=')")
            size = value_of(raw.decode("latin-1").split("}", 1)[0], "HEADER_BYTES")
            if not (size == size and 1 <= size < math.inf and size == int(size)):
                raise InputError(f"{path}: SMV header has no valid HEADER_BYTES")
            size = int(size)
            # compare with the file before reading: a header may declare anything
            if file_size < size:
                raise InputError(f"{path} is truncated: header says {size} bytes, file has {file_size}")
            raw += fh.read(size - len(raw)) if size > len(raw) else b""
    except FileNotFoundError:
        raise InputError(f"cannot read SMV file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read SMV file {path}: it is a folder") from None
    except OSError as exc:
        raise InputError(f"cannot read SMV file {path}: {exc.strerror or exc}") from None
    return raw[:size].decode("latin-1"), file_size


def check_smv(path) -> tuple[dict[str, str], tuple[int, int, np.dtype, int]]:
    """Header and pixel layout (width, height, dtype, offset of the pixels) of an SMV file, checked
    against the file's size without reading (or allocating) the pixels."""
    text, file_size = read_smv_header(path)
    header = parse_header(text)
    size = len(text)
    try:
        width, height = float(header["SIZE1"]), float(header["SIZE2"])
    except (KeyError, ValueError):
        raise InputError(f"{path}: SMV header has no SIZE1/SIZE2") from None
    if not (1 <= width < math.inf and 1 <= height < math.inf):
        raise InputError(f"{path}: SMV image size {header['SIZE1']}x{header['SIZE2']} is not positive")
    width, height = int(width), int(height)
    order = header.get("BYTE_ORDER", byte_order_name()).lower()
    if order.startswith("big"):
        end = ">"
    elif order.startswith("little"):
        end = "<"
    else:
        raise InputError(f"{path}: unknown BYTE_ORDER {header.get('BYTE_ORDER')!r}")
    kind = _TYPES.get(header.get("TYPE", "unsigned_short").lower())
    if kind is None:
        raise InputError(f"{path}: unsupported SMV pixel type {header.get('TYPE')!r}")
    dtype = np.dtype(end + kind)
    need = width * height * dtype.itemsize
    if size + need > file_size:
        raise InputError(f"{path} is truncated: {max(file_size - size, 0)} of {need} bytes of pixel data "
                         f"({width}x{height} pixels declared)")
    return header, (width, height, dtype, size)


def read_smv(path) -> tuple[dict[str, str], np.ndarray]:
    """Header (key -> text) and pixels shaped (SIZE2, SIZE1), native byte order.

    Both byte orders (BYTE_ORDER) are read; TYPE may be unsigned_short (the
    default), signed_short, unsigned/signed 32-bit, float or double. The
    declared size is checked against the file before anything is allocated.
    """
    header, (width, height, dtype, size) = check_smv(path)
    need = width * height * dtype.itemsize
    try:
        with open(path, "rb") as fh:
            fh.seek(size)
            body = fh.read(need)
    except OSError as exc:
        raise InputError(f"cannot read SMV file {path}: {exc.strerror or exc}") from None
    if len(body) < need:
        raise InputError(f"{path} is truncated: {len(body)} of {need} bytes of pixel data")
    data = np.frombuffer(body, dtype=dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    return header, data
