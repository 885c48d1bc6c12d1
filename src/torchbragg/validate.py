"""Checks of a configuration that need no torch: they answer at once, before
any heavy import, and name the problem in one line.

`check_config` (nanoBragg flags) and `check_experiment` (an experiment plus
flags) are the entry points shared by the commands and the Python builders,
so every path refuses the same inputs with the same message. Both check the
flags' values, then the numbers `resolve` derives from them (pixels,
oversampling, total work, memory), and return those numbers for the builder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from .config import SimulationConfig
from .errors import InputError
from .flags import COUNT_RULE, experiment_held_fields, flag_of
from .resolve import ExperimentGeometry, Resolved, resolve, resolve_experiment

# Like the original, a run writes these unless told otherwise (-nopgm, -nonoise).
DEFAULT_NAMES = dict(floatfile="floatimage.bin", intfile="intimage.img", noisefile="noiseimage.img",
                     pgmfile="image.pgm")

# Beyond these a run cannot finish in any sensible time or memory.
MAX_COUNT = 10000  # any single sampling count, automatic oversampling included
MAX_WORK = 1e13  # pixels x sub-pixels x layers x sources x phi steps x mosaic domains
MAX_SOURCES = 10**7  # each source is a direction and a wavelength held for the whole render

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
    counts = [(flag_of(section, attr), getattr(obj, attr)) for section, obj, attr in (
        ("crystal", c, "phisteps"), ("crystal", c, "mosaic_domains"), ("detector", d, "thicksteps"),
        ("beam", b, "dispsteps"), ("beam", b, "hdivsteps"), ("beam", b, "vdivsteps"))]
    counts += [(f"-N{'abc'[i]}", n) for i, n in enumerate(c.N)]
    for name, v in counts + [(flag_of("detector", "oversample"), d.oversample)]:
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


def check_config(cfg: SimulationConfig) -> Resolved:
    """Refuse, with one line naming the flag, anything that cannot give a
    finite, physical image; return the resolved numbers of the run. Called
    by the command line and by the model builder (again after SMV header
    values are applied)."""
    _check_exclusive(cfg)
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
    _positive(d.pixel_size, "-pixel")
    _positive(d.distance, "-distance")
    _positive(d.close_distance, "-close_distance")
    for name, v in (("-detpixels_f", d.fpixels), ("-detpixels_s", d.spixels)):
        if v is not None and v <= 0:
            raise InputError(f"{name} must be a positive number of pixels, got {v}")
    _positive(d.detsize_f, "-detsize_f")
    _positive(d.detsize_s, "-detsize_s")
    _check_physics(cfg)
    resolved = resolve(cfg, headers)
    check_resolved(resolved)
    return resolved


def check_experiment(cfg: SimulationConfig, geometry: ExperimentGeometry) -> Resolved:
    """The checks of `check_config` that apply to an experiment plus flags
    (the experiment holds the geometry, so flags for it are refused); return
    the resolved numbers."""
    held = experiment_held_fields(cfg)
    if held is not None:
        raise InputError(f"{held} is held by the experiment file; edit the experiment to change it")
    _check_exclusive(cfg)
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    check_device(cfg.device)
    _file(c.hkl_file, "HKL")
    _file(b.source_file, "source")
    _file(d.mask_file, "-mask")
    _check_finite(cfg)
    _check_counts(cfg)
    _check_physics(cfg)
    resolved = resolve_experiment(cfg, geometry)
    check_resolved(resolved)
    return resolved


def _check_exclusive(cfg) -> None:
    if cfg.detector.absorbed_layers and cfg.detector.oversample_thick:
        raise InputError("-absorbed_layers and -oversample_thick both weight the sensor layers; give one of them")


def _check_physics(cfg) -> None:
    """Values of the physics flags, on every path."""
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
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


def check_resolved(resolved: Resolved) -> None:
    """Refuse what no machine can hold or finish: the images in memory, the
    automatic oversampling, the total sampling (memory is bounded by
    chunking, but time is not) and the sources held for the render."""
    need, have = resolved.memory, physical_memory()
    if need > have:
        if len(resolved.panels) == 1:
            what = "a %dx%d-pixel detector" % resolved.panels[0]
        else:
            what = f"a detector of {len(resolved.panels)} panels"
        raise InputError(f"{what} needs about {need / 2**30:.1f} GiB for its images, "
                         f"more than this machine's {have / 2**30:.1f} GiB")
    sampling = resolved.sampling
    if sampling.oversample_auto and sampling.oversample > MAX_COUNT:
        raise InputError(f"automatic oversampling would take {sampling.oversample:.3g} sub-pixels per pixel edge "
                         f"(crystal large for this -distance, -pixel and -lambda); give -oversample N "
                         f"(limit {MAX_COUNT}) or a smaller crystal")
    if sampling.work > MAX_WORK:
        detail = " x ".join(f"{v:g} {k}" for k, v in sampling.counts().items())
        raise InputError(f"this run samples {sampling.work:.3g} points ({detail}), more than the {MAX_WORK:.0e} "
                         "any machine can finish; reduce the sampling")
    if sampling.sources > MAX_SOURCES:
        raise InputError(f"this run has {sampling.sources:.3g} sources (divergence points x wavelengths), more "
                         f"than the {MAX_SOURCES:.0e} any machine can hold; give fewer -divsteps or -dispsteps")


def _check_fluence(b) -> None:
    """With -flux the fluence is flux x exposure / beamsize^2, as in the original."""
    if b.flux != 0.0 and b.exposure > 0.0 and b.beamsize >= 0:
        if b.beamsize == 0:
            raise InputError("-beamsize must be positive with -flux (the fluence is flux*exposure/beamsize^2)")
        area = (b.beamsize * 1e-3) ** 2
        if area == 0 or not math.isfinite(b.flux * b.exposure / area):
            raise InputError(f"-flux {b.flux:g} with -exposure {b.exposure:g} and -beamsize {b.beamsize:g} "
                             "gives an infinite fluence")
