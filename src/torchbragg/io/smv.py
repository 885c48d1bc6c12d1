"""SMV (ADSC) images: the original's 512-byte header and unsigned 16-bit data."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

HEADER_BYTES = 512


@dataclass
class SMVGeometry:
    """The values the original puts in its headers, in its own units
    (metres and radians)."""
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


def header_text(g: SMVGeometry, denzo_sign: float = -1.0) -> str:
    """Header keys in the original's order and %g formatting. The original
    writes the DENZO centres as S - 0*pixel in the int image and S + 0*pixel in
    the noise image; both print the same number."""
    rtd = 180.0 / 3.141592653589793
    px = g.pixel_size
    lines = [
        "{", f"HEADER_BYTES={HEADER_BYTES};", "DIM=2;", f"BYTE_ORDER={byte_order_name()};", "TYPE=unsigned_short;",
        "SIZE1=%d;" % g.fpixels, "SIZE2=%d;" % g.spixels,
        "PIXEL_SIZE=%g;" % (px * 1000.0), "DISTANCE=%g;" % (g.distance * 1000.0),
        "WAVELENGTH=%g;" % (g.wavelength * 1e10),
        "BEAM_CENTER_X=%g;" % (g.Xbeam * 1000.0), "BEAM_CENTER_Y=%g;" % (g.Ybeam * 1000),
        "ADXV_CENTER_X=%g;" % (g.Fbeam * 1000.0), "ADXV_CENTER_Y=%g;" % ((g.detsize_s - g.Sbeam) * 1000),
        "MOSFLM_CENTER_X=%g;" % ((g.Sbeam - 0.5 * px) * 1000.0), "MOSFLM_CENTER_Y=%g;" % ((g.Fbeam - 0.5 * px) * 1000),
        "DENZO_X_BEAM=%g;" % ((g.Sbeam + denzo_sign * 0.0 * px) * 1000.0),
        "DENZO_Y_BEAM=%g;" % ((g.Fbeam + denzo_sign * 0.0 * px) * 1000),
        "DIALS_ORIGIN=%g,%g,%g" % tuple(g.dials_origin),
        "XDS_ORGX=%g;" % g.ORGX, "XDS_ORGY=%g;" % g.ORGY,
        "CLOSE_DISTANCE=%g;" % (g.close_distance * 1000.0),
        "PHI=%g;" % (g.phi0 * rtd), "OSC_START=%g;" % (g.phi0 * rtd), "OSC_RANGE=%g;" % (g.osc * rtd),
        "TWOTHETA=%g;" % (g.twotheta * rtd),
        "DETECTOR_SN=000;", "BEAMLINE=fake;",
    ]
    return "\n".join(lines) + "\n}\f"


def smv_bytes(data: np.ndarray, header: str) -> bytes:
    head = header.encode("ascii")
    if len(head) > HEADER_BYTES:
        raise InputError("SMV header longer than 512 bytes")
    body = np.ascontiguousarray(data, dtype=np.uint16).astype("=u2").tobytes()
    return head + b" " * (HEADER_BYTES - len(head)) + body


def write_smv(path: str, data: np.ndarray, header: str) -> None:
    from .atomic import atomic_write
    atomic_write(path, smv_bytes(data, header))


def parse_header(text: str) -> dict[str, str]:
    out = {}
    for item in text.replace("\n", ";").split(";"):
        if "=" in item:
            key, _, value = item.partition("=")
            out[key.strip().strip("{}")] = value.strip()
    return out


def read_smv(path: str) -> tuple[dict[str, str], np.ndarray]:
    """Header (key -> text) and data (SIZE2, SIZE1). Both byte orders; types
    unsigned_short, signed_short, unsigned_long/int (32 bit) and float."""
    if not os.path.isfile(path):
        raise InputError(f"cannot read SMV file {path}: no such file")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.startswith(b"{") or b"HEADER_BYTES" not in raw[:200]:
        raise InputError(f"{path} is not an SMV image (no '{{ HEADER_BYTES=' header)")
    end = raw.find(b"}")
    header = parse_header(raw[:end if end > 0 else HEADER_BYTES].decode("ascii", "replace"))
    try:
        size = int(float(header["HEADER_BYTES"]))
    except (KeyError, ValueError):
        raise InputError(f"{path}: SMV header has no valid HEADER_BYTES") from None
    header = parse_header(raw[:size].split(b"}")[0].decode("ascii", "replace"))
    try:
        width, height = int(float(header["SIZE1"])), int(float(header["SIZE2"]))
    except (KeyError, ValueError):
        raise InputError(f"{path}: SMV header has no SIZE1/SIZE2") from None
    if width <= 0 or height <= 0:
        raise InputError(f"{path}: SMV image size {width}x{height} is not positive")
    order = header.get("BYTE_ORDER", "little_endian").lower()
    end_char = ">" if order.startswith("big") else "<"
    kinds = {"unsigned_short": "u2", "signed_short": "i2", "unsigned_long": "u4", "unsigned_int": "u4",
             "signed_long": "i4", "signed_int": "i4", "float": "f4", "float_ieee": "f4"}
    kind = kinds.get(header.get("TYPE", "unsigned_short").lower())
    if kind is None:
        raise InputError(f"{path}: unsupported SMV pixel type {header.get('TYPE')}")
    dtype = np.dtype(end_char + kind)
    need = width * height * dtype.itemsize
    body = raw[size:size + need]
    if len(body) < need:
        raise InputError(f"{path} is truncated: {len(body)} of {need} bytes of pixel data")
    data = np.frombuffer(body, dtype=dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    return header, data
