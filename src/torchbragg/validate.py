"""Checks of a configuration that need no torch: they answer at once, before
any heavy import, and name the problem in one line."""

from __future__ import annotations

import math
import os

from .config import SimulationConfig
from .errors import InputError

# Like the original, a run writes these unless told otherwise (-nopgm, -nonoise).
DEFAULT_NAMES = dict(floatfile="floatimage.bin", intfile="intimage.img", noisefile="noiseimage.img",
                     pgmfile="image.pgm")


def output_paths(cfg) -> dict[str, str]:
    """The files this run will write."""
    o = cfg.output
    paths = {"floatfile": o.floatfile or DEFAULT_NAMES["floatfile"],
             "intfile": o.intfile or DEFAULT_NAMES["intfile"]}
    if o.write_pgm:
        paths["pgmfile"] = o.pgmfile or DEFAULT_NAMES["pgmfile"]
    if o.calculate_noise:
        paths["noisefile"] = o.noisefile or DEFAULT_NAMES["noisefile"]
    return paths


def check_writable(cfg) -> None:
    """Refuse before rendering when an output could not be written."""
    for path in output_paths(cfg).values():
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"cannot write {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(f"cannot write {path}: folder {folder} is not writable")
        if os.path.isdir(path):
            raise InputError(f"cannot write {path}: it is a folder")


BYTES_PER_PIXEL = 4 * 6  # float image, its copies for statistics, int/noise/pgm images


def _file(path: str | None, what: str) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise InputError(f"{what} file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{what} file {path} is a folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file {path} is not readable")


def _positive(value, name: str) -> None:
    if value is not None and not value > 0:
        raise InputError(f"{name} must be positive, got {value:g}")


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def check_config(cfg: SimulationConfig) -> None:
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    _file(c.hkl_file, "HKL")
    _file(c.mat_file, "matrix")
    _file(b.source_file, "source")
    _file(d.img_file, "-img")
    _file(d.mask_file, "-mask")
    if c.cell is None and c.mat_file is None:
        raise InputError("no unit cell: give -cell a b c alpha beta gamma or -mat FILE")
    if c.cell is not None:
        for name, v in zip(("a", "b", "c"), c.cell[:3]):
            _positive(v, f"cell length {name}")
        al, be, ga = (math.radians(x) for x in c.cell[3:])
        s = (al + be + ga) / 2
        skew = math.sin(s) * math.sin(s - al) * math.sin(s - be) * math.sin(s - ga)
        if not abs(skew) > 1e-12 or max(c.cell[3:]) >= 180:
            raise InputError("impossible unit cell: angles %g %g %g give no volume" % tuple(c.cell[3:]))
    for i, n in enumerate(c.N):
        if n < 0:
            raise InputError(f"-N{'abc'[i]} must not be negative, got {n:g}")
    _positive(b.wavelength, "wavelength")
    _positive(d.pixel_size, "-pixel")
    _positive(d.distance, "-distance")
    _positive(d.close_distance, "-close_distance")
    for name, v in (("-detpixels_f", d.fpixels), ("-detpixels_s", d.spixels)):
        if v is not None and v <= 0:
            raise InputError(f"{name} must be a positive number of pixels, got {v}")
    _positive(d.detsize_f, "-detsize_f")
    _positive(d.detsize_s, "-detsize_s")
    if b.dispersion < 0:
        raise InputError(f"-dispersion must not be negative, got {b.dispersion:g}")
    if b.fluence < 0 or b.flux < 0:
        raise InputError("fluence and flux must not be negative")
    if c.mosaic_spread is not None and c.mosaic_spread < 0:
        raise InputError(f"-mosaic must not be negative, got {c.mosaic_spread:g}")
    if d.roi is not None:
        xmin, xmax, ymin, ymax = d.roi
        if (xmin >= 0 and xmax >= 0 and xmin > xmax) or (ymin >= 0 and ymax >= 0 and ymin > ymax):
            raise InputError(f"-roi {xmin} {xmax} {ymin} {ymax} is empty (give xmin xmax ymin ymax)")
    for name, v in (("-oversample", d.oversample), ("-phisteps", c.phisteps), ("-mosaic_domains", c.mosaic_domains),
                    ("-thicksteps", d.thicksteps), ("-dispsteps", b.dispsteps)):
        if v is not None and v > 10000:
            raise InputError(f"{name} {v} is beyond any sensible sampling (limit 10000)")
    px = d.pixel_size
    fpix = d.fpixels if d.fpixels else math.ceil(d.detsize_f / px - 0.5)
    spix = d.spixels if d.spixels else math.ceil(d.detsize_s / px - 0.5)
    need = fpix * spix * BYTES_PER_PIXEL
    have = physical_memory()
    if need > have:
        raise InputError(f"a {fpix}x{spix}-pixel detector needs about {need / 2**30:.1f} GiB for its images, "
                         f"more than this machine's {have / 2**30:.1f} GiB")
