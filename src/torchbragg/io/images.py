"""Measured images in: npy, SMV, miniCBF and NeXus frames as (panels, slow,
fast) photons with the mask of pixels to use."""

from __future__ import annotations

import base64
import bz2
import contextlib
import hashlib
import logging
import os
import re
import sys
import zlib

import numpy as np

from ..errors import InputError

# files that hold several images (one per scan image or still)
CONTAINERS = (".nxs", ".h5", ".hdf5", ".nx5")
MAX_IMAGE_PIXELS = 2 ** 28  # elements of one stored image: 16 times the largest detectors
CBF_BINARY_START = b"\x0c\x1a\x04\xd5"


def is_container(path: str) -> bool:
    return path.lower().endswith(CONTAINERS)


def split_frame(frame: np.ndarray, detector, path: str) -> np.ndarray:
    """(panels, slow, fast) from a stored image: (slow, fast) for one panel or
    for panels tiled by their raw_image_offset, or already (panels, slow, fast)."""
    panels = detector.panels
    sizes = [(int(p.image_size[1]), int(p.image_size[0])) for p in panels]  # (slow, fast)
    frame = np.asarray(frame)
    want = f"{len(panels)} panel(s) of (slow, fast) {sizes[0] if len(set(sizes)) == 1 else sizes}"
    if frame.ndim == 3:
        if frame.shape[0] == len(panels) and all(frame.shape[1:] == s for s in sizes):
            return frame
        raise InputError(f"{path}: image of shape {frame.shape} does not match the detector's {want}")
    if frame.ndim != 2:
        raise InputError(f"{path}: image of shape {frame.shape} does not match the detector's {want}")
    if len(panels) == 1:
        if frame.shape != sizes[0]:
            raise InputError(f"{path}: image of shape {frame.shape} (slow, fast) does not match the detector's "
                             f"{sizes[0]}")
        return frame[None]
    offsets = [p.extras.get("raw_image_offset") for p in panels]
    if len(set(sizes)) != 1 or not all(o is not None and len(o) == 2 for o in offsets):
        raise InputError(f"{path}: one {frame.shape} frame, but the detector's {len(panels)} panels carry no "
                         "raw_image_offset placing them in it")
    out = []
    for (s, f), (of, os_) in zip(sizes, offsets):
        of, os_ = int(of), int(os_)
        if of < 0 or os_ < 0 or os_ + s > frame.shape[0] or of + f > frame.shape[1]:
            raise InputError(f"{path}: image of shape {frame.shape} does not hold the detector's panel at "
                             f"raw_image_offset {[of, os_]} of size (slow, fast) {(s, f)}")
        out.append(frame[os_:os_ + s, of:of + f])
    return np.stack(out)


def _npy_layout(path) -> None:
    """Check an .npy file's declared shape against its size before loading
    (a header may declare anything)."""
    from numpy.lib import format as npy
    try:
        with open(path, "rb") as fh:
            version = npy.read_magic(fh)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read(fh)
            offset, size = fh.tell(), os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, EOFError):
        return  # np.load gives the reason
    count = int(np.prod(shape, dtype=np.float64)) if shape else 1
    if count > MAX_IMAGE_PIXELS:
        raise InputError(f"{path}: an array of shape {shape} is beyond any detector's image")
    if dtype.itemsize and size - offset < count * dtype.itemsize:
        raise InputError(f"{path} is cut short: its header declares {shape} {dtype} ({count * dtype.itemsize} "
                         f"bytes), the file holds {size - offset}")


def read_npy(path):
    _npy_layout(path)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InputError(f"{path} does not hold a numeric array")
    return a, None


def read_smv_image(path):
    from .smv import read_smv
    return read_smv(path)[1], None


@contextlib.contextmanager
def quiet_libraries():
    """Silence what reader libraries print themselves (fabio's log lines,
    HDF5's diagnostics written straight to file descriptor 2): a bad file
    gives our one line, not theirs."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to silence
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        logging.disable(level)


def _cbf_field(header: str, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}:\s*(\S+)", header, re.MULTILINE | re.IGNORECASE)
    return m.group(1).strip('"') if m else None


def check_cbf_binary(path: str, raw: bytes) -> tuple[int, int] | None:
    """Check the binary section against its MIME header before decoding: the
    declared size must be present in the file (a cut file cannot make the
    decoder run past its end) and, where the header has them, the MD5 digest
    and the element count must agree. Returns (slow, fast) when declared."""
    start = raw.find(CBF_BINARY_START)
    if start < 0:
        raise InputError(f"cannot read CBF image {path}: no binary section")
    header = raw[max(0, start - 4096):start].decode("latin-1")
    size = _cbf_field(header, "X-Binary-Size")
    if size is None or not size.isdigit():
        raise InputError(f"cannot read CBF image {path}: the binary section declares no X-Binary-Size")
    size = int(size)
    body = raw[start + len(CBF_BINARY_START):start + len(CBF_BINARY_START) + size]
    if len(body) < size:
        raise InputError(f"cannot read CBF image {path}: the file is cut short ({len(body)} of the {size} bytes "
                         "its binary section declares)")
    digest = _cbf_field(header, "Content-MD5")
    if digest is not None and base64.b64encode(hashlib.md5(body).digest()).decode() != digest:
        raise InputError(f"cannot read CBF image {path}: its binary section is corrupt (the MD5 digest does not "
                         "match the header's Content-MD5)")
    fast, slow = (_cbf_field(header, f"X-Binary-Size-{k}-Dimension") for k in ("Fastest", "Second"))
    count = _cbf_field(header, "X-Binary-Number-of-Elements")
    if fast is None or slow is None or not fast.isdigit() or not slow.isdigit():
        return None
    fast, slow = int(fast), int(slow)
    if count is not None and count.isdigit() and int(count) != fast * slow:
        raise InputError(f"cannot read CBF image {path}: the header declares {count} elements for a {fast} x {slow} "
                         "image")
    if not 0 < fast * slow <= MAX_IMAGE_PIXELS:
        raise InputError(f"cannot read CBF image {path}: a {fast} x {slow} image is beyond any detector")
    return slow, fast


# compressed CBF files (as beamlines archive them, and dxtbx reads them): suffix -> decompressor
CBF_COMPRESSIONS = {".bz2": lambda: bz2.BZ2Decompressor(), ".gz": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)}
MAX_CBF_BYTES = 4 * 2 ** 30  # a decompressed CBF beyond any detector's (a compression bomb)


def _decompressed(path: str, raw: bytes) -> bytes:
    suffix = os.path.splitext(path.lower())[1]
    if suffix not in CBF_COMPRESSIONS:
        return raw
    try:
        d = CBF_COMPRESSIONS[suffix]()
        out = d.decompress(raw, MAX_CBF_BYTES)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"cannot read CBF image {path}: not a valid {suffix[1:]} file ({exc})") from None
    done = d.eof if hasattr(d, "eof") else False
    if not done:
        raise InputError(f"cannot read CBF image {path}: the {suffix[1:]} stream is cut short or decompresses beyond "
                         f"{MAX_CBF_BYTES >> 30} GB")
    return out


def read_cbf(path):
    import fabio
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"cannot read CBF image {path}: {exc.strerror}") from None
    raw = _decompressed(path, raw)
    shape = check_cbf_binary(path, raw)
    try:
        with quiet_libraries():
            img = fabio.open(path)
            data = np.asarray(img.data)
    except Exception as exc:  # fabio raises many kinds on foreign or broken files
        text = str(exc).strip()
        reason = getattr(exc, "strerror", None) or (text.splitlines()[0][:200] if text else type(exc).__name__)
        raise InputError(f"cannot read CBF image {path}: not a CBF file fabio can decode ({reason})") from None
    if data is None or data.ndim != 2:
        raise InputError(f"cannot read CBF image {path}: no 2-D image in it")
    if shape is not None and data.shape != shape:
        raise InputError(f"cannot read CBF image {path}: decoded {data.shape} pixels, the header declares {shape}")
    return data, None


def read_nexus(path, index):
    import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter before h5py reads)
    import h5py
    try:
        with quiet_libraries(), h5py.File(path, "r") as f:
            ds = f.get("entry/data/data")
            if ds is None:
                raise InputError(f"{path} has no /entry/data/data")
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"{path}: /entry/data/data is a {type(ds).__name__.lower()}, not an image dataset")
            if ds.ndim not in (3, 4) or not np.issubdtype(ds.dtype, np.number):
                raise InputError(f"{path}: /entry/data/data has shape {ds.shape} and type {ds.dtype}; expected "
                                 "numbers (images, slow, fast) or (images, panels, slow, fast)")
            if not 0 <= index < ds.shape[0]:
                raise InputError(f"{path} holds images 1..{ds.shape[0]}, not image {index + 1}")
            if np.prod(ds.shape[1:], dtype=np.float64) > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: images of shape {ds.shape[1:]} are beyond any detector's")
            data = np.asarray(ds[index])
            flags = None
            key = "entry/instrument/detector/pixel_mask"
            if key in f:
                mask = f[key]
                if not isinstance(mask, h5py.Dataset) or tuple(mask.shape) != data.shape:
                    raise InputError(f"{path}: /{key} has shape {getattr(mask, 'shape', None)}, the images "
                                     f"{data.shape}")
                flags = np.asarray(mask) != 0
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read NeXus image {path}: {str(exc).strip()[:200]}") from None
    return data, flags


def read_image(path: str, detector, index: int = 0, adc_offset: float = 0.0):
    """(data, valid): float64 photons (panels, slow, fast) with invalid pixels
    set to 0, and the boolean mask of pixels to use. `index`: 0-based image of
    a NeXus file. Raises InputError for a missing, unreadable or mis-shaped image."""
    if not os.path.exists(path):
        raise InputError(f"cannot read image {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"cannot read image {path}: it is a folder")
    low = path.lower()
    if low.endswith(".npy"):
        raw, flags = read_npy(path)
    elif low.endswith((".img", ".smv")):
        raw, flags = read_smv_image(path)
    elif low.endswith(tuple(".cbf" + c for c in ("",) + tuple(CBF_COMPRESSIONS))):
        raw, flags = read_cbf(path)
    elif low.endswith(CONTAINERS):
        raw, flags = read_nexus(path, index)
    else:
        raise InputError(f"cannot read image {path}: unknown format (use .npy, .img/.smv, .cbf (or .cbf.bz2, "
                         ".cbf.gz) or .nxs/.h5)")
    raw = split_frame(raw, detector, path)
    data = raw.astype(np.float64) - float(adc_offset)
    valid = np.isfinite(data) & (raw.astype(np.float64) >= 0) & (data >= 0)
    if flags is not None:
        valid &= ~split_frame(flags, detector, path)
    for k, p in enumerate(detector.panels):
        top = float(p.trusted_range[1])
        if top > 0:
            valid[k] &= data[k] <= top
        if p.mask is not None:
            valid[k] &= p.mask.detach().cpu().numpy().astype(bool)
    if not valid.any():
        raise InputError(f"{path}: no valid pixel in the image")
    if not data[valid].any():
        raise InputError(f"{path}: every valid pixel is 0; an image without photons cannot be refined")
    data = np.where(valid, data, 0.0)
    return data, valid
