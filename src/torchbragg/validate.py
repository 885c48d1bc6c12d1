"""Checks of a configuration that need no torch: they answer at once, before
any heavy import, and name the problem in one line.

`check_config` is the one entry point shared by the command line and the
Python API, so both refuse the same inputs with the same message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from .config import CONVENTION_VECTORS, CUSTOM_START, FORCED_PIVOT, SimulationConfig, auto_steps, sweep_is_off
from .errors import InputError
from .flags import COUNT_RULE, FIELD_FLAGS

# Like the original, a run writes these unless told otherwise (-nopgm, -nonoise).
DEFAULT_NAMES = dict(floatfile="floatimage.bin", intfile="intimage.img", noisefile="noiseimage.img",
                     pgmfile="image.pgm")

# Beyond these a run cannot finish in any sensible time or memory.
MAX_COUNT = 10000  # any single sampling count, automatic oversampling included
MAX_WORK = 1e13  # pixels x sub-pixels x layers x sources x phi steps x mosaic domains

# Flags for config fields that `flags.simple` does not register.
_FLAG_NAMES = {
    ("crystal", "cell"): "-cell", ("crystal", "misset"): "-misset", ("crystal", "N"): "-N",
    ("crystal", "sample_size"): "-xtalsize", ("crystal", "spindle_axis"): "-spindle_axis",
    ("beam", "polarization"): "-polar", ("beam", "beam_vector"): "-beam_vector",
    ("beam", "polar_vector"): "-polar_vector", ("beam", "hdivsteps"): "-hdivsteps",
    ("detector", "distance"): "-distance", ("detector", "close_distance"): "-close_distance",
    ("detector", "Xbeam"): "-Xbeam", ("detector", "Ybeam"): "-Ybeam", ("detector", "Xclose"): "-Xclose",
    ("detector", "Yclose"): "-Yclose", ("detector", "ORGX"): "-ORGX", ("detector", "ORGY"): "-ORGY",
    ("detector", "fdet_vector"): "-fdet_vector", ("detector", "sdet_vector"): "-sdet_vector",
    ("detector", "odet_vector"): "-odet_vector", ("detector", "pix0_vector"): "-pix0_vector",
    ("detector", "twotheta_axis"): "-twotheta_axis", ("detector", "rotation"): "-detector_rotx/y/z",
    ("detector", "twotheta"): "-twotheta", ("detector", "attenuation_depth"): "-detector_abs",
    ("detector", "roi"): "-roi", ("detector", "fpixels"): "-detpixels_f", ("detector", "spixels"): "-detpixels_s",
    ("output", "pgm_scale"): "-pgmscale", ("output", "printout_pixel"): "-printout_pixel",
}


def flag_of(section: str, attr: str) -> str:
    return _FLAG_NAMES.get((section, attr)) or FIELD_FLAGS.get((section, attr)) or f"-{attr}"


# ----------------------------------------------------------------------------- outputs

def output_paths(cfg) -> dict[str, str]:
    """The files this run will write."""
    o = cfg.output
    paths = {"floatfile": _or_default(o.floatfile, "floatfile"), "intfile": _or_default(o.intfile, "intfile")}
    if o.write_pgm:
        paths["pgmfile"] = _or_default(o.pgmfile, "pgmfile")
    if o.calculate_noise:
        paths["noisefile"] = _or_default(o.noisefile, "noisefile")
    if o.write_expt is not None:
        paths["write_expt"] = o.write_expt
    return paths


def _or_default(value, key):
    return DEFAULT_NAMES[key] if value is None else value


def _is_device(path: str) -> bool:
    """A character device, pipe or socket: written through, never replaced."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def check_writable(cfg) -> None:
    """Refuse before rendering when an output could not be written where it
    was meant to go: an empty name, a folder, a missing or read-only folder,
    or two outputs naming the same file."""
    seen: dict[str, str] = {}
    for key, path in output_paths(cfg).items():
        flag = f"-{key}"
        if path == "":
            raise InputError(f"{flag} needs a file name, got an empty one")
        if path.endswith(("/", os.sep)):
            raise InputError(f"{flag} {path} names a folder, not a file")
        real = os.path.realpath(path)  # outputs go through symlinks to their target
        if os.path.isdir(real):
            raise InputError(f"cannot write {path} ({flag}): it is a folder")
        if _is_device(real):
            if not os.access(real, os.W_OK):
                raise InputError(f"cannot write {path} ({flag}): not writable")
            continue  # several outputs may go to /dev/null
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            raise InputError(f"cannot write {path} ({flag}): folder {os.path.dirname(os.path.abspath(path))} "
                             "does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(f"cannot write {path} ({flag}): folder {folder} is not writable")
        if real in seen:
            raise InputError(f"{seen[real]} and {flag} both name {path}; give each output its own file")
        seen[real] = flag
    c = cfg.crystal
    if c.hkl_file is not None and c.dump_file:
        real = os.path.realpath(c.dump_file)
        if real in seen:
            raise InputError(f"-dumpfile and {seen[real]} both name {c.dump_file}; give each output its own file")


# ----------------------------------------------------------------------------- inputs

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


_HEADER_POSITIVE = ("PIXEL_SIZE", "DISTANCE", "CLOSE_DISTANCE", "WAVELENGTH")
_HEADER_FINITE = ("BEAM_CENTER_X", "BEAM_CENTER_Y", "ORGX", "ORGY", "PHI", "OSC_RANGE")


def check_header_values(header: dict, path) -> None:
    """The SMV header values a run takes from -img/-mask get the checks their
    flags get: sizes positive whole numbers, lengths and wavelength positive,
    everything finite."""
    for key in ("SIZE1", "SIZE2"):
        try:
            v = float(header[key])
        except (KeyError, ValueError):
            raise InputError(f"{path}: SMV header has no SIZE1/SIZE2") from None
        if not (1 <= v < math.inf and v == int(v)):
            raise InputError(f"{path}: header {key}={header[key]} is not a positive whole number of pixels")
    for key in _HEADER_POSITIVE + _HEADER_FINITE:
        try:
            v = float(header[key])
        except (KeyError, ValueError):
            continue  # absent or unreadable: the builder ignores it too
        if not math.isfinite(v) or (key in _HEADER_POSITIVE and v <= 0):
            need = "a positive number" if key in _HEADER_POSITIVE else "a finite number"
            raise InputError(f"{path}: header {key}={header[key]} must be {need}")


def _headers(cfg) -> list[tuple[str, dict]]:
    from .io.smv import check_smv
    out = []
    for path in (cfg.detector.mask_file, cfg.detector.img_file):
        if path is not None:
            header, _ = check_smv(path)  # declared size against the file, nothing allocated
            check_header_values(header, path)
            out.append((path, header))
    return out


def check_device(device: str) -> None:
    """A device torch can use here; torch is imported only for a GPU request."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(device)):
        raise InputError(f"-device takes cpu, cuda, cuda:N or mps, got '{device}'")
    if device == "cpu":
        return
    import torch
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("-device mps: the Apple GPU (MPS) is not available on this machine")
        return
    if not torch.cuda.is_available():
        raise InputError(f"-device {device}: CUDA is not available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"-device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_finite(cfg) -> None:
    """Every number of the configuration is finite (the parser already refuses
    'inf' on the command line; a config built in Python is checked here)."""
    for section in ("crystal", "beam", "detector", "output"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                    raise InputError(f"{flag_of(section, f.name)} must be a finite number, got {v}")


def _check_counts(cfg) -> None:
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    counts = [("-phisteps", c.phisteps), ("-mosaic_domains", c.mosaic_domains), ("-thicksteps", d.thicksteps),
              ("-dispsteps", b.dispsteps), ("-hdivsteps", b.hdivsteps), ("-vdivsteps", b.vdivsteps)]
    counts += [(f"-N{'abc'[i]}", n) for i, n in enumerate(c.N)]
    for name, v in counts + [("-oversample", d.oversample)]:
        if v is None:
            continue
        if v < (0 if name == "-oversample" else 1):
            raise InputError(f"{name} {v:g} is not allowed ({COUNT_RULE})")
        if v > MAX_COUNT:
            raise InputError(f"{name} {v:g} is beyond any sensible sampling (limit {MAX_COUNT})")


def _check_vectors(cfg) -> None:
    for section, attr in (("beam", "beam_vector"), ("beam", "polar_vector"), ("crystal", "spindle_axis"),
                          ("detector", "fdet_vector"), ("detector", "sdet_vector"),
                          ("detector", "twotheta_axis")):
        v = getattr(getattr(cfg, section), attr)
        if v is not None and not any(v):
            raise InputError(f"{flag_of(section, attr)} 0 0 0 is a zero-length vector; give a direction")


def _check_cell(cell) -> None:
    for name, v in zip(("a", "b", "c"), cell[:3]):
        _positive(v, f"cell length {name}")
    if max(cell[3:]) >= 180 or min(cell[3:]) <= 0:
        raise InputError("impossible unit cell: angles %g %g %g give no volume" % tuple(cell[3:]))
    ca, cb, cg = (math.cos(math.radians(x)) for x in cell[3:])
    # squared volume of the unit-edge cell: zero or negative when the angles cannot close
    shape = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    if not shape > 1e-10:
        raise InputError("impossible unit cell: angles %g %g %g give no volume "
                         "(each angle must be less than the sum of the other two)" % tuple(cell[3:]))
    volume = cell[0] * cell[1] * cell[2] * math.sqrt(shape)
    if not 0 < volume < math.inf:
        raise InputError(f"unit cell {cell[0]:g} {cell[1]:g} {cell[2]:g} has a volume of {volume:g} A^3, "
                         "which cannot be simulated")


def check_config(cfg: SimulationConfig) -> None:
    """Refuse, with one line naming the flag, anything that cannot give a
    finite, physical image: called by the command line and by the model
    builder (again after SMV header values are applied)."""
    if cfg.detector.absorbed_layers and cfg.detector.oversample_thick:
        raise InputError("-absorbed_layers and -oversample_thick both weight the sensor layers; give one of them")
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    check_device(cfg.device)
    _file(c.hkl_file, "HKL")
    _file(c.mat_file, "matrix")
    _file(b.source_file, "source")
    _file(d.img_file, "-img")
    _file(d.mask_file, "-mask")
    headers = _headers(cfg)
    _check_finite(cfg)
    if c.cell is None and c.mat_file is None:
        raise InputError("no unit cell: give -cell a b c alpha beta gamma or -mat FILE")
    if c.cell is not None:
        _check_cell(c.cell)
    _check_counts(cfg)
    _check_vectors(cfg)
    _positive(b.wavelength, "wavelength")
    if c.mat_file is not None:
        _cell_lengths(cfg)  # a matrix must give a finite cell
    _positive(d.pixel_size, "-pixel")
    _positive(d.distance, "-distance")
    _positive(d.close_distance, "-close_distance")
    for name, v in (("-detpixels_f", d.fpixels), ("-detpixels_s", d.spixels)):
        if v is not None and v <= 0:
            raise InputError(f"{name} must be a positive number of pixels, got {v}")
    _positive(d.detsize_f, "-detsize_f")
    _positive(d.detsize_s, "-detsize_s")
    _positive(c.fudge, "-fudge")
    if b.dispersion < 0:
        raise InputError(f"-dispersion must not be negative, got {b.dispersion:g}")
    if b.fluence < 0 or b.flux < 0:
        raise InputError("fluence and flux must not be negative")
    if b.water_size < 0:
        raise InputError(f"-water must not be negative, got {b.water_size:g}")
    if not b.nopolar and not -1 <= b.polarization <= 1:
        raise InputError(f"-polar must be between -1 and 1, got {b.polarization:g}")
    if d.attenuation_depth is not None and d.attenuation_depth < 0:
        raise InputError(f"-detector_abs must not be negative, got {d.attenuation_depth:g}")
    _check_fluence(b)
    if c.mosaic_spread is not None and c.mosaic_spread < 0:
        raise InputError(f"-mosaic must not be negative, got {c.mosaic_spread:g}")
    if d.roi is not None:
        xmin, xmax, ymin, ymax = d.roi
        if (xmin >= 0 and xmax >= 0 and xmin > xmax) or (ymin >= 0 and ymax >= 0 and ymin > ymax):
            raise InputError(f"-roi {xmin} {xmax} {ymin} {ymax} is empty (give xmin xmax ymin ymax)")
    fpix, spix = detector_pixels(cfg, headers)
    need = fpix * spix * BYTES_PER_PIXEL
    have = physical_memory()
    if need > have:
        raise InputError(f"a {fpix}x{spix}-pixel detector needs about {need / 2**30:.1f} GiB for its images, "
                         f"more than this machine's {have / 2**30:.1f} GiB")
    frame = detector_frame(cfg)
    check_work(cfg, fpix, spix, frame)


def _check_fluence(b) -> None:
    """With -flux the fluence is flux x exposure / beamsize^2, as in the original."""
    if b.flux != 0.0 and b.exposure > 0.0 and b.beamsize >= 0:
        if b.beamsize == 0:
            raise InputError("-beamsize must be positive with -flux (the fluence is flux*exposure/beamsize^2)")
        area = (b.beamsize * 1e-3) ** 2
        if area == 0 or not math.isfinite(b.flux * b.exposure / area):
            raise InputError(f"-flux {b.flux:g} with -exposure {b.exposure:g} and -beamsize {b.beamsize:g} "
                             "gives an infinite fluence")


def detector_pixels(cfg, headers=()) -> tuple[int, int]:
    """Detector size in pixels as the builder resolves it; a header size counts
    unless a flag sets that axis."""
    d = cfg.detector
    px = d.pixel_size
    hf = max((int(float(h["SIZE1"])) for _, h in headers), default=None)
    hs = max((int(float(h["SIZE2"])) for _, h in headers), default=None)
    fpix = d.fpixels or hf or math.ceil(d.detsize_f / px - 0.5)
    spix = d.spixels or hs or math.ceil(d.detsize_s / px - 0.5)
    if not (fpix < 1e15 and spix < 1e15):
        raise InputError(f"-detsize {d.detsize_f:g} x {d.detsize_s:g} mm with -pixel {px:g} mm is an absurd "
                         "number of pixels")
    return int(fpix), int(spix)


# ----------------------------------------------------------------------------- geometry

# The detector frames of models.CONVENTION_VECTORS (beam, fast, slow, normal,
# two-theta axis), repeated here so the geometry can be checked without torch.
def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return tuple(x / n for x in v)


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _cross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _matvec(m, v):
    return tuple(_dot(row, v) for row in m)


def _matmul(a, b):
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)) for i in range(3))


def _rotation_xyz(rx, ry, rz):
    """Rotation about x, then y, then z (radians), as physics.rotation_xyz."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = ((1, 0, 0), (0, cx, -sx), (0, sx, cx))
    my = ((cy, 0, sy), (0, 1, 0), (-sy, 0, cy))
    mz = ((cz, -sz, 0), (sz, cz, 0), (0, 0, 1))
    return _matmul(mz, _matmul(my, mx))


def _rotation_axis_angle(k, angle):
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = k
    return ((c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s),
            (y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s),
            (z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)))


def detector_frame(cfg) -> dict:
    """Beam direction, detector normal and sample-to-beam-spot distance (m)
    the way the models derive them, in plain floats; refuses a detector the
    beam cannot reach from the front."""
    d, b = cfg.detector, cfg.beam
    conv = d.convention
    if conv == "CUSTOM":
        frame = dict(CUSTOM_START)
        for key, vec in (("f", d.fdet_vector), ("s", d.sdet_vector), ("o", d.odet_vector),
                         ("tt", d.twotheta_axis), ("beam", b.beam_vector)):
            if vec is not None:
                frame[key] = vec
    else:
        frame = dict(CONVENTION_VECTORS.get(conv, CUSTOM_START))
    if not any(frame["o"]):
        frame["o"] = _cross(_unit(frame["f"]), _unit(frame["s"]))
    beam, o0, tt = _unit(frame["beam"]), _unit(frame["o"]), _unit(frame["tt"])
    rot = _rotation_xyz(*(math.radians(x) for x in d.rotation))
    full = _matmul(_rotation_axis_angle(tt, math.radians(d.twotheta)), rot)
    ratio = _dot(beam, _matvec(rot, o0))
    cos_full = _dot(beam, _matvec(full, o0))
    pivot = FORCED_PIVOT.get(conv, d.pivot)
    plane = ("impossible geometry: the detector plane contains the beam (check -twotheta, "
             "-detector_rotx/y/z and the detector vectors)")
    if abs(ratio) < 1e-9:
        raise InputError(plane)
    close = d.close_distance * 1e-3 if d.close_distance is not None else abs(ratio * d.distance * 1e-3)
    if pivot == "BEAM":
        # the detector turns about the beam spot; its plane then lies at
        # close * cos_full / ratio along its normal, which must stay positive
        # or every solid angle (and intensity) turns negative
        facing = cos_full / ratio
        if abs(facing) < 1e-6:
            raise InputError(plane)
        if facing < 0:
            angle = math.degrees(math.acos(max(-1.0, min(1.0, math.copysign(cos_full, ratio)))))
            raise InputError(f"impossible geometry: the detector is behind the sample (its normal is {angle:.4g} "
                             "degrees from the beam); check -twotheta and -detector_rotx/y/z, or pivot about "
                             "the sample (-xds or -dials)")
        close = close * facing
    return dict(beam=beam, ratio=ratio, cos=cos_full, pivot=pivot, distance=close / ratio)


# ----------------------------------------------------------------------------- work

def _cell_lengths(cfg) -> list[float]:
    c = cfg.crystal
    if c.mat_file is None:
        return list(c.cell[:3])
    import numpy as np

    from .io.matrix import read_mosflm_matrix
    recip = read_mosflm_matrix(c.mat_file) / cfg.beam.wavelength
    with np.errstate(all="ignore"):
        volume = 1.0 / abs(float(np.linalg.det(recip)))
        real = np.linalg.inv(recip).T
        lengths = [float(x) for x in np.linalg.norm(real, axis=1)]
    if not (0 < volume < math.inf and all(0 < x < math.inf for x in lengths)):
        raise InputError(f"{c.mat_file}: the matrix gives a unit cell of volume {volume:g} A^3, "
                         "which cannot be simulated")
    return lengths


def auto_oversample(cfg, frame=None) -> float:
    """The automatic oversampling the simulator would choose (three sub-pixels
    per reciprocal pixel across the largest crystal dimension), as a float so
    an absurd value can be reported instead of overflowing."""
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    frame = frame or detector_frame(cfg)
    lengths = _cell_lengths(cfg)
    sizes = list(c.sample_size)
    for i in (1, 2):  # the beam clips the sample, as in the builder
        if sizes[i] is not None and b.beamsize >= 0 and b.beamsize < sizes[i]:
            sizes[i] = b.beamsize
    extent = []
    for i in range(3):
        n = c.N[i]
        if sizes[i] is not None and sizes[i] > 0:
            n = math.ceil(sizes[i] * 1e7 / lengths[i])
        extent.append(lengths[i] * 1e-10 * max(n, 1.0))
    distance = frame["distance"]
    if not distance > 0:
        return 1.0
    recip_px = b.wavelength * 1e-10 * distance / (d.pixel_size * 1e-3)
    return max(math.ceil(3.0 * max(extent) / recip_px), 1) if recip_px > 0 else math.inf


def _sources(cfg) -> int:
    b = cfg.beam
    if b.source_file is not None:
        from .io.sources import read_sources
        return len(read_sources(b.source_file))
    total = 1
    for axis in ("h", "v"):
        rng, st = getattr(b, f"{axis}divrange"), getattr(b, f"{axis}divstep")
        n, r, s = auto_steps(getattr(b, f"{axis}divsteps"), None if rng is None else rng / 1000.0,
                             None if st is None else st / 1000.0, 1.0, endpoints=True)
        total *= 1 if sweep_is_off(n, r, s) else n
    n, disp, step = auto_steps(b.dispsteps, b.dispersion / 100.0, None, 1.0, endpoints=True)
    return total * (1 if sweep_is_off(n, disp, step) else n)


def check_work(cfg, fpix: int, spix: int, frame=None) -> None:
    """Refuse automatic oversampling and total sampling no machine can finish:
    memory is bounded by chunking, but time is not."""
    c, d = cfg.crystal, cfg.detector
    if d.oversample:
        oversample = d.oversample
    else:
        oversample = auto_oversample(cfg, frame)
        if oversample > MAX_COUNT:
            raise InputError(f"automatic oversampling would take {oversample:.3g} sub-pixels per pixel edge "
                             f"(crystal large for this -distance, -pixel and -lambda); give -oversample N "
                             f"(limit {MAX_COUNT}) or a smaller crystal")
    layers = 1
    if d.thickness > 0:
        layers = max(d.thicksteps, 2) if d.thicksteps else 2
    phi = auto_steps(c.phisteps, c.osc, c.phistep, 1.0, endpoints=False)[0]
    spread = c.mosaic_spread or 0.0
    domains = 1 if spread <= 0 else (c.mosaic_domains or 10)
    pixels = fpix * spix
    if d.roi is not None:
        xmin, xmax, ymin, ymax = d.roi
        fpix_roi = (min(xmax, fpix - 1) if xmax >= 0 else fpix - 1) - max(xmin, 0) + 1
        spix_roi = (min(ymax, spix - 1) if ymax >= 0 else spix - 1) - max(ymin, 0) + 1
        pixels = max(fpix_roi, 1) * max(spix_roi, 1)
    counts = dict(pixels=pixels, subpixels=oversample ** 2, layers=layers, sources=_sources(cfg),
                  phisteps=max(phi, 1), domains=domains)
    work = math.prod(float(v) for v in counts.values())
    if work > MAX_WORK:
        detail = " x ".join(f"{v:g} {k}" for k, v in counts.items())
        raise InputError(f"this run samples {work:.3g} points ({detail}), more than the {MAX_WORK:.0e} "
                         "any machine can finish; reduce the sampling")
