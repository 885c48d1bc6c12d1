"""The drop-in `nonBragg` command: scattering from amorphous material (water,
air, ice, ...) given as a .stol table, on nanoBragg's detector geometry, with
the original's flags, files and report. The image is the `Background` model's.

torch is imported only once the flags and files are known to be good.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from ..errors import InputError
from ..flags import NONBRAGG_FLAGS, by_name, number

PROG = "nonBragg"
RTD = 180.0 * (1.0 / math.pi)
DEFAULT_FLUENCE = 125932015286227086360700780544.0

FLAGS = NONBRAGG_FLAGS  # this command's part of flags.REGISTRY
BY_NAME = by_name(FLAGS)
# flags of the original that torchbragg does not offer, and why
REFUSED = {
    "-img": "reading an image back into a .stol table (-img, -stolout, -ignore) is not supported",
    "-stolout": "reading an image back into a .stol table (-img, -stolout, -ignore) is not supported",
    "-ignore": "reading an image back into a .stol table (-img, -stolout, -ignore) is not supported",
}


# the sample of an amorphous background in `torchbragg simulate --background`
SAMPLE_FLAGS = {"-thickness": "thickness", "-samplesize": "samplesize", "-width": "width", "-height": "height",
                "-density": "density", "-molecules": "molecules", "-MW": "molecular_weight"}


def background_sample(path: str, flags: list[str]) -> tuple[dict, list[str]]:
    """(keywords of Background.from_stol, the other flags) from a .stol file and
    flags among which the sample flags describe the amorphous sample."""
    from ..io.stol import read_stol
    read_stol(path)  # a bad table fails before anything renders
    rest, sample, i = [], {}, 0
    while i < len(flags):
        flag = BY_NAME.get(flags[i])
        key = None if flag is None else SAMPLE_FLAGS.get(flag.names[0])
        if key is None:
            rest.append(flags[i])
            i += 1
            continue
        if i + 1 >= len(flags):
            raise InputError(f"{flags[i]} expects 1 value")
        value = number(flags[i + 1], flag.kind, flag.names[0])
        if not value > 0:
            raise InputError(f"{flags[i]} must be positive, got {value:g}")
        sample.update(dict.fromkeys(("thickness", "width", "height"), value) if key == "samplesize" else {key: value})
        i += 2
    kw = dict(path=os.path.abspath(path), thickness=sample.get("thickness", 0.1),
              size=(sample.get("height", 0.1), sample.get("width", 0.1)),
              density=sample.get("density", 1.0), molecular_weight=sample.get("molecular_weight", 18.0))
    if "molecules" in sample:
        kw["molecules"] = sample["molecules"]
    return kw, rest


def help_text() -> str:
    lines = ["usage: nonBragg -stol water.stol [options]",
             "",
             "Scattering of an amorphous sample (water, air, ice, ...) given as a table of the structure",
             "factor of one molecule against sin(theta)/lambda, on nanoBragg's detector (MOSFLM axes: beam",
             "along x, fast axis z, slow axis -y; no half-pixel offset). Writes the float image, an SMV",
             "int image, a PGM preview (deterministic, unlike the original's) and a Poisson noise image.",
             "'.stol' files: '#' lines are skipped and only the first two columns are used.",
             "",
             "options:"]
    for f in FLAGS:
        names = " ".join(f.names)
        arg = {0: "", 1: " N" if f.kind in ("float", "int") else " VALUE", 2: " F S", 3: " X Y Z",
               4: " XMIN XMAX YMIN YMAX"}[f.nargs]
        if f.kind == "str" and f.help.startswith("FILE"):
            arg = " FILE"
        lines.append(f"  {names}{arg}")
        lines.append(f"        {f.help.removeprefix('FILE: ')}")
    lines += ["", "not offered (refused): " + " ".join(REFUSED)]
    return "\n".join(lines)


# flags that set several values at once: each value is then the last flag's that set it, as in the original
EXPANDS = {"-detsize": ("-detsize_x", "-detsize_y"), "-detpixels": ("-detpixels_x", "-detpixels_y"),
           "-samplesize": ("-thickness", "-width", "-height"), "-divergence": ("-hdivrange", "-vdivrange"),
           "-divsteps": ("-hdivsteps", "-vdivsteps")}
OVERRIDES = {"-lambda": "-energy", "-energy": "-lambda"}
SAMPLE_PIVOT = {"-Xclose", "-Yclose", "-ORGX", "-ORGY", "-close_distance", "-twotheta"}
BEAM_PIVOT = {"-Xbeam", "-Ybeam", "-distance"}


def parse(argv: list[str]) -> dict:
    """Flags -> {canonical name: value}; '_pivot' the last pivot a flag chose, '_stol_flag' which file flag."""
    opts: dict = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in REFUSED:
            raise InputError(REFUSED[word])
        flag = BY_NAME.get(word)
        if flag is None:
            raise InputError(f"unknown flag '{word}' (see nonBragg -h)")
        key = flag.names[0]
        if i + flag.nargs >= len(argv) + (1 if flag.nargs == 0 else 0) and flag.nargs:
            raise InputError(f"{word} expects {flag.nargs} value{'s' if flag.nargs > 1 else ''}")
        values = argv[i + 1:i + 1 + flag.nargs]
        if flag.kind == "switch":
            opts[key] = True
        elif flag.kind == "str":
            opts[key] = values[0]
        elif flag.nargs == 1:
            opts[key] = number(values[0], flag.kind, flag.names[0])
        else:
            opts[key] = tuple(number(w, flag.kind, flag.names[0]) for w in values)
        for part in EXPANDS.get(key, ()):
            opts[part] = opts[key]
        opts.pop(OVERRIDES.get(key), None)
        if key in ("-stol", "-4stol", "-Q"):
            opts["_stol_flag"] = key
            opts["_stol_file"] = values[0]
        if key in ("-noisefile", "-nonoise"):
            opts["_noise"] = key == "-noisefile"  # the later of the two wins, as in the original
        if key in SAMPLE_PIVOT:
            opts["_pivot"] = "SAMPLE"
        elif key in BEAM_PIVOT:
            opts["_pivot"] = "BEAM"
        elif key == "-pivot":
            if values[0] not in ("beam", "sample"):
                raise InputError(f"-pivot takes 'beam' or 'sample', got '{values[0]}'")
            opts["_pivot"] = values[0].upper()
        i += 1 + flag.nargs
    return opts


@dataclass
class Setup:
    """The run as the original resolves it: lengths in metres, as it prints them."""
    opts: dict
    fpixels: int
    spixels: int
    pixel: float
    detsize: tuple
    Xbeam: float
    Ybeam: float
    Xclose: float
    Yclose: float
    pivot: str
    wavelength: float  # m
    fluence: float
    sample: tuple  # thickness, width, height (m)
    density: float  # g/cm^3
    molecular_weight: float
    molecules: float | None
    roi: tuple
    oversample: int
    phi0: float  # degrees
    osc: float
    seed: int  # stored (negative) noise seed
    outputs: dict
    messages: list


def _positive(opts, key, what):
    if key in opts and not opts[key] > 0:
        raise InputError(f"{key} must be positive, got {opts[key]:g} ({what})")


def resolve(opts: dict) -> Setup:
    """Defaults and derived values as the original computes them; refuses impossible values."""
    if "_stol_file" not in opts:
        raise InputError("no .stol file: give -stol FILE (see nonBragg -h)")
    g = opts.get
    for key, what in (("-pixel", "mm"), ("-lambda", "Angstrom"), ("-energy", "eV"), ("-thickness", "mm"),
                      ("-samplesize", "mm"), ("-width", "mm"), ("-height", "mm"), ("-density", "g/cm^3"),
                      ("-molecules", "count"), ("-MW", "g/mol"), ("-fluence", "photons/m^2"),
                      ("-detsize", "mm"), ("-detsize_x", "mm"), ("-detsize_y", "mm"), ("-detpixels", "pixels"),
                      ("-detpixels_x", "pixels"), ("-detpixels_y", "pixels"), ("-source_distance", "mm")):
        _positive(opts, key, what)
    if g("-distance", 100.0) <= 0 and "-close_distance" not in opts:
        raise InputError(f"-distance must be positive, got {g('-distance'):g} mm")
    for key in ("-flux", "-exposure", "-beamsize", "-dispersion", "-divergence", "-hdivrange", "-vdivrange",
                "-hdivstep", "-vdivstep", "-scale", "-pgmscale"):
        if key in opts and opts[key] < 0:
            raise InputError(f"{key} must not be negative, got {opts[key]:g}")
    if opts.get("-oversample", 1) < 0:
        raise InputError(f"-oversample must be at least 1 (0 means 1, as in the original), got {opts['-oversample']}")
    for key in ("-dispsteps", "-hdivsteps", "-vdivsteps", "-divsteps", "-phisteps"):
        if key in opts and opts[key] < 1:
            raise InputError(f"{key} must be at least 1, got {opts[key]}")
    if "-polar" in opts and not -1.0 <= opts["-polar"] <= 1.0:
        raise InputError(f"-polar takes a Kahn factor between -1 and 1, got {opts['-polar']:g}")
    from ..validate import check_device
    check_device(g("-device", "cpu"))
    if g("-dtype", "float64") not in ("float32", "float64"):
        raise InputError(f"-dtype takes float32 or float64, got '{opts['-dtype']}'")
    for key in ("-fdet_vector", "-sdet_vector", "-beam_vector", "-polar_vector", "-twotheta_axis"):
        if key in opts and not any(opts[key]):
            raise InputError(f"{key} must not be the zero vector")

    messages = []
    pixel = g("-pixel", 0.1) / 1000.0
    detsize_x, detsize_y = g("-detsize_x", 102.4) / 1000.0, g("-detsize_y", 102.4) / 1000.0
    fpixels, spixels = g("-detpixels_x", 0), g("-detpixels_y", 0)
    if fpixels:
        detsize_x = pixel * fpixels
    if spixels:
        detsize_y = pixel * spixels
    fpixels, spixels = int(math.ceil(detsize_x / pixel)), int(math.ceil(detsize_y / pixel))
    if fpixels * spixels > 100_000_000:
        raise InputError(f"a {fpixels}x{spixels} detector is too large (at most 100 million pixels)")

    Xclose = opts["-ORGX"] * pixel if "-ORGX" in opts else g("-Xclose", math.nan) / 1000.0
    Yclose = opts["-ORGY"] * pixel if "-ORGY" in opts else g("-Yclose", math.nan) / 1000.0
    Xclose = (detsize_x - pixel) / 2.0 if math.isnan(Xclose) else Xclose
    Yclose = (detsize_y + pixel) / 2.0 if math.isnan(Yclose) else Yclose
    Xbeam = opts["-Xbeam"] / 1000.0 if "-Xbeam" in opts else Xclose
    Ybeam = opts["-Ybeam"] / 1000.0 if "-Ybeam" in opts else Yclose

    wavelength = g("-lambda", 1.0) / 1e10
    if "-energy" in opts:
        wavelength = (12398.42 / opts["-energy"]) / 1e10
    fluence = g("-fluence", DEFAULT_FLUENCE)
    flux, exposure, beamsize = g("-flux", 0.0), g("-exposure", 1.0), g("-beamsize", 0.1) / 1000.0
    if flux != 0.0 and exposure > 0.0 and beamsize >= 0:
        if beamsize == 0:
            raise InputError("-beamsize 0 with -flux gives an infinite fluence")
        fluence = flux * exposure / beamsize / beamsize
    sx, sy, sz = (g(key, 0.1) / 1000.0 for key in ("-thickness", "-width", "-height"))
    if beamsize >= 0:
        if beamsize < sy:
            messages.append("WARNING: clipping sample (%g m high) with beam (%g m)" % (sy, beamsize))
            sy = beamsize
        if beamsize < sz:
            messages.append("WARNING: clipping sample (%g m wide) with beam (%g m)" % (sz, beamsize))
            sz = beamsize
    if "-molecules" not in opts and sx * sy * sz <= 0:
        raise InputError("the sample has no volume (a zero -beamsize clips it away); give -beamsize or -molecules")

    roi = (0, fpixels, 0, spixels)
    if "-roi" in opts:
        xmin, xmax, ymin, ymax = opts["-roi"]
        if xmin > xmax or ymin > ymax or xmax < 0 or ymax < 0 or xmin >= fpixels or ymin >= spixels:
            raise InputError(f"-roi {xmin} {xmax} {ymin} {ymax} selects no pixel of the {fpixels}x{spixels} detector")
        roi = (max(xmin, 0), xmax, max(ymin, 0), ymax)

    phi0, osc = g("-phi", 0.0), _osc(opts)
    seed = -opts["-seed"] if "-seed" in opts else -int(time.time())
    outputs = {"floatfile": g("-floatfile", "floatimage.bin"), "intfile": g("-intfile", "intimage.img")}
    if not g("-nopgm"):
        outputs["pgmfile"] = g("-pgmfile", "image.pgm")
    if opts.get("_noise", True):
        outputs["noisefile"] = g("-noisefile", "noiseimage.img")
    names = list(outputs.values())
    if len(set(map(os.path.realpath, names))) < len(names):
        raise InputError("two outputs would be written to the same file: " + " ".join(names))
    for path in names:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"cannot write {path}: folder {folder} does not exist")
    return Setup(opts, fpixels, spixels, pixel, (detsize_x, detsize_y), Xbeam, Ybeam, Xclose, Yclose,
                 opts.get("_pivot", "BEAM"), wavelength, fluence, (sx, sy, sz), g("-density", 1.0),
                 g("-MW", 18.0), g("-molecules"), roi, max(g("-oversample", 1), 1), phi0, osc, seed, outputs, messages)


def _osc(opts) -> float:
    """The oscillation range the original writes in the header (degrees)."""
    steps, osc, step = opts.get("-phisteps", -1), opts.get("-osc", -1.0), opts.get("-phistep", -1.0)
    if steps < 0:
        if osc < 0:
            return step if step > 0 else 0.0
        return osc
    if osc < 0:
        return 1.0 if step <= 0 else step
    return osc


def build(setup: Setup, dtype=None, device=None):
    """(beam, detector, background) of a run, float64 then cast."""
    import numpy as np
    import torch

    from ..build.nanobragg import BuildInfo, make_beam
    from ..config import SimulationConfig
    from ..io.stol import STOL_PER_COLUMN
    from ..models import Background, Detector, DistanceMount, Panel

    o = setup.opts
    dtype = dtype or {"float32": torch.float32, "float64": torch.float64}[o.get("-dtype", "float64")]
    device = torch.device(device or o.get("-device", "cpu"))
    f64 = torch.float64

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.linalg.norm(v)

    fast, slow = unit(o.get("-fdet_vector", (0, 0, 1))), unit(o.get("-sdet_vector", (0, -1, 0)))
    normal = np.cross(fast, slow)
    if not np.linalg.norm(normal) > 0:
        raise InputError("-fdet_vector and -sdet_vector are parallel")
    mm = 1000.0
    mount = DistanceMount(fast, slow, unit(normal), unit(o.get("-twotheta_axis", (0, 1, 0))),
                          distance=o.get("-distance", 100.0),
                          beam_center=(setup.Xbeam * mm, setup.Ybeam * mm),
                          close_center=(setup.Xclose * mm, setup.Yclose * mm),
                          rotation=(o.get("-detector_rotx", 0.0), o.get("-detector_roty", 0.0),
                                    o.get("-detector_rotz", 0.0)),
                          twotheta=o.get("-twotheta", 0.0), close_distance=o.get("-close_distance"),
                          pivot=setup.pivot, dtype=f64, device=device)
    mask = None
    if setup.roi != (0, setup.fpixels, 0, setup.spixels):
        xmin, xmax, ymin, ymax = setup.roi
        f, s = np.arange(setup.fpixels), np.arange(setup.spixels)
        mask = ((f >= xmin) & (f <= xmax))[None, :] & ((s >= ymin) & (s <= ymax))[:, None]
    panel = Panel(mount, (setup.fpixels, setup.spixels), (setup.pixel * mm, setup.pixel * mm), mask=mask,
                  dtype=f64, device=device)
    detector = Detector([panel], dtype=f64, device=device)

    cfg = SimulationConfig()
    b = cfg.beam
    b.dispersion = o.get("-dispersion", 0.0)
    b.dispsteps = o.get("-dispsteps")
    b.hdivrange, b.vdivrange = o.get("-hdivrange"), o.get("-vdivrange")
    b.hdivstep, b.vdivstep = o.get("-hdivstep"), o.get("-vdivstep")
    b.hdivsteps, b.vdivsteps = o.get("-hdivsteps"), o.get("-vdivsteps")
    b.round_div = not o.get("-square_div", False)
    b.fluence, b.flux = setup.fluence, 0.0
    travel = unit(o.get("-beam_vector", (1, 0, 0)))
    e_vector = unit(o.get("-polar_vector", (0, 0, 1)))
    info = BuildInfo(cfg)
    kahn = o.get("-polar", 0.0)
    if "-sourcefile" in o:
        from ..io.sources import read_sources, source_defaults
        from ..models import Beam
        rows = np.asarray(source_defaults(read_sources(o["-sourcefile"]), travel, setup.wavelength,
                                          o.get("-source_distance", 10000.0) / 1000.0), dtype=np.float64)
        if not rows[:, 3].mean() > 0:
            raise InputError(f"{o['-sourcefile']}: the source intensities must add up to more than 0")
        # the original adds each source's intensity as given; the Beam's weights have mean 1
        beam = Beam(-travel, setup.wavelength * 1e10, polarization_fraction=(1.0 + kahn) / 2.0,
                    polarization_normal=np.cross(travel, e_vector), fluence=setup.fluence * rows[:, 3].mean(),
                    source_positions=rows[:, :3], source_wavelengths=rows[:, 4] * 1e10, source_weights=rows[:, 3],
                    dtype=f64, device=device)
    else:
        from ..resolve import beam_sampling
        beam = make_beam(cfg, info, beam_sampling(cfg), None, travel, e_vector, setup.wavelength * 1e10, (1.0 + kahn) / 2.0,
                         device)
    with torch.no_grad():
        ratio = float(mount.geometry(beam.incident())["ratio"])
    if abs(ratio) < 1e-9:
        raise InputError("impossible geometry: the detector plane contains the beam (check rotations and vectors)")

    flag = o["_stol_flag"]
    sx, sy, sz = setup.sample
    molecules = setup.molecules
    background = Background.from_stol(o["_stol_file"], STOL_PER_COLUMN[flag], thickness=sx * mm,
                                      size=(sy * mm, sz * mm), density=setup.density,
                                      molecular_weight=setup.molecular_weight, molecules=molecules,
                                      dtype=f64, device=device)
    return beam.to(dtype), detector.to(dtype), background.to(dtype), info


def report_lines(setup: Setup, beam, detector, background, info) -> list[str]:
    """The original's report of the setup (same words and numbers)."""
    import torch
    o = setup.opts
    lines = ["pivoting detector around sample" if setup.pivot == "SAMPLE"
             else "pivoting detector around direct beam spot", "reading %s" % o["_stol_file"]]
    lines += ["WARNING: " + w for w in getattr(background, "warnings", [])]
    mount = detector.panels[0].frame
    with torch.no_grad():
        g = {k: v.double().cpu() for k, v in mount.geometry(beam.incident().double()).items()}
        inc, lam = beam.sources()
        inc, lam = inc.double().cpu(), lam.double().cpu()
    if "-sourcefile" not in o:
        div = info.divergence
        for ih, iv in beam.divergence_points:
            lines.append("divergence deviation: %g %g" % (div["h"]["step"] * ih - div["h"]["range"] / 2.0,
                                                          div["v"]["step"] * iv - div["v"]["range"] / 2.0))
        n = beam.dispersion_steps
        for k in range(n):
            lines.append("lambda%d = %.15g" % (k, float(lam[k]) * 1e-10))
    lines.append("  created a total of %d sources:" % lam.numel())
    if beam.has_source_table:
        for p, w, i in zip(beam.source_positions.double().cpu().tolist(), lam.tolist(),
                           beam.source_weights.double().cpu().tolist()):
            lines.append("%g %g %g   %g %g" % (*p, i, w * 1e-10))
    else:
        dist = o.get("-source_distance", 10000.0) / 1000.0
        for d, w in zip(inc, lam):
            lines.append("%g %g %g   %g %g" % (*(-dist * d).tolist(), 1.0, float(w) * 1e-10))
    sx, sy, sz = setup.sample
    molecules = float(background.molecule_count())
    density = setup.density  # with -molecules, the density those molecules make in the box
    if setup.molecules is not None:
        volume = sx * sy * sz
        density = molecules / volume / 6.02214179e23 * setup.molecular_weight / 1e6 if volume > 0 else math.inf
    lines += [
        "  %d initialized F points (will cubic-spline interpolate between them)" % (background.stol.numel() + 4),
        "  wave=%g meters +/- %g%% in %d steps" % (setup.wavelength, float(beam.dispersion) * 100,
                                                   beam.dispersion_steps),
        "  polarization effect disabled" if o.get("-nopolar") else "  Kahn polarization factor: %f"
        % o.get("-polar", 0.0),
        "  incident fluence: %g photons/m^2" % float(beam.fluence),
        "  sample is %g m thick x %g m high x %g m wide, %g g/cm^3 and %g g/mol (%g molecules)"
        % (sx, sy, sz, density, setup.molecular_weight, molecules),
        "  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)"
        % (float(g["distance"]) / 1000, setup.detsize[0], setup.detsize[1], setup.pixel, setup.fpixels,
           setup.spixels),
        "  Xbeam=%g Ybeam=%g" % (float(g["Fbeam"]) / 1000, float(g["Sbeam"]) / 1000),
        "  detector origin: %g %g %g" % tuple((g["pix0"] / 1000).tolist()),
        "  DIRECTION_OF_DETECTOR_X-AXIS= %g %g %g" % tuple(g["fdet"].tolist()),
        "  DIRECTION_OF_DETECTOR_Y-AXIS= %g %g %g" % tuple(g["sdet"].tolist()),
        "  INCIDENT_BEAM_DIRECTION= %g %g %g" % tuple(g["beam"].tolist()),
        "  POLARIZATION_PLANE_NORMAL= %g %g %g" % tuple(beam.e_vector().double().cpu().tolist()),
        "  roi: %d < x < %d && %d < y < %d" % setup.roi,
    ]
    if "-sourcefile" not in o:
        div = info.divergence
        lines += ["  hdivrange=%g hdivstep=%g  radians" % (div["h"]["range"], div["h"]["step"]),
                  "  vdivrange=%g vdivstep=%g  radians" % (div["v"]["range"], div["v"]["step"]),
                  "  %d divergence steps" % len(beam.divergence_points)]
    lines += ["  %d sources" % lam.numel(), "  %d pixel oversample steps" % setup.oversample]
    if "noisefile" in setup.outputs:
        lines += ["", "  noise image paramters:", "  seed: %d" % setup.seed]
    return lines


def smv_header(setup: Setup, geometry) -> str:
    """The original nonBragg's (short) SMV header, up to the closing brace and form feed."""
    g = geometry
    px = setup.pixel
    lines = ["{", "HEADER_BYTES=512;", "DIM=2;",
             "BYTE_ORDER=%s;" % ("little_endian" if sys.byteorder == "little" else "big_endian"),
             "TYPE=unsigned_short;", "SIZE1=%d;" % setup.fpixels, "SIZE2=%d;" % setup.spixels,
             "PIXEL_SIZE=%g;" % (px * 1000.0), "DISTANCE=%g;" % (g["distance"] * 1000.0),
             "WAVELENGTH=%g;" % (setup.wavelength * 1e10),
             "BEAM_CENTER_X=%g;" % (g["Fbeam"] * 1000.0),
             "BEAM_CENTER_Y=%g;" % ((setup.detsize[1] - g["Sbeam"]) * 1000),
             "ORGX=%g;" % (g["Fclose"] / px), "ORGY=%g;" % (g["Sclose"] / px),
             "CLOSE_DISTANCE=%g;" % (g["close_distance"] * 1000.0),
             "PHI=%g;" % setup.phi0, "OSC_START=%g;" % setup.phi0, "OSC_RANGE=%g;" % setup.osc,
             "TWOTHETA=%g;" % setup.opts.get("-twotheta", 0.0), "DETECTOR_SN=000;", "BEAMLINE=fake;"]
    return "\n".join(lines) + "\n}\f"


def image_statistics(img, roi, pixel, oversample):
    """max_I and where, mean, rms and rmsd, as the original computes them (its
    rmsd pass reads each pixel's successor, the last pixel as 0)."""
    import numpy as np
    xmin, xmax, ymin, ymax = roi
    ns, nf = img.shape
    rows, cols = slice(max(ymin, 0), ymax + 1), slice(max(xmin, 0), xmax + 1)
    sel = img[rows, cols].astype(np.float64)
    n = max(sel.size, 1)
    avg = float(sel.sum()) / n
    max_I, where = 0.0, (0.0, 0.0)
    if sel.size and sel.max() > 0:
        s, f = np.unravel_index(int(np.argmax(sel)), sel.shape)
        s, f = s + rows.start, f + cols.start
        max_I = float(img[s, f])
        sub, last = pixel / oversample, oversample - 1  # the original reports the last sub-pixel's position
        where = (sub * (f * oversample + last) + sub / 2.0, sub * (s * oversample + last) + sub / 2.0)
    rms = math.sqrt(float(np.dot(sel.ravel(), sel.ravel())) / (max(n, 2) - 1))
    successor = np.append(img.reshape(-1)[1:], np.float32(0.0)).reshape(ns, nf)[rows, cols].astype(np.float64)
    successor -= avg
    rmsd = math.sqrt(float(np.dot(successor.ravel(), successor.ravel())) / (max(n, 2) - 1))
    return dict(max_I=max_I, where=where, mean=avg, rms=rms, rmsd=rmsd)


def run(argv: list[str], out=None) -> int:
    out = out or sys.stdout
    setup = resolve(parse(argv))
    from ..io.stol import read_stol
    from ..io.stol import STOL_PER_COLUMN
    read_stol(setup.opts["_stol_file"], STOL_PER_COLUMN[setup.opts["_stol_flag"]])  # bad tables fail before torch

    import numpy as np
    import torch

    from .. import stats
    from ..io.atomic import atomic_write
    from ..io.pgm import pgm_file_bytes
    from ..io.smv import smv_bytes
    from ..noise import noise_image

    beam, detector, background, info = build(setup)
    for w in getattr(background, "warnings", []):
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print("nonBragg amorphous material diffraction simulator - torchbragg", file=out)
    for line in setup.messages:
        print(line, file=out)
    for line in report_lines(setup, beam, detector, background, info):
        print(line, file=out)
    with torch.no_grad():
        image = background(beam, detector, oversample=setup.oversample,
                           polarization=not setup.opts.get("-nopolar", False),
                           point_pixel=setup.opts.get("-point_pixel", False),
                           curved=setup.opts.get("-curved_det", False))[0]
        frame = detector.panels[0].frame
        if setup.opts.get("-Fmap"):
            image = _structure_factor_map(setup, frame, beam, background, detector.panels[0].mask)
        omega = _solid_angle_sum(setup, frame, beam)
        geometry = {k: float(v) / 1000.0 for k, v in frame.geometry(beam.incident().double()).items()
                    if v.dim() == 0}
    img = np.ascontiguousarray(image.to("cpu", torch.float32).numpy())
    if not np.isfinite(img).all():
        raise InputError("the rendered image has NaN or infinite pixels: check the .stol table and the geometry")
    print("", file=out)
    print("solid angle subtended by detector = %g steradian ( %g%% sphere)" % (omega, 100 * omega / 4 / math.pi),
          file=out)
    if setup.opts.get("-printout") or "-printout_pixel" in setup.opts:
        pick = setup.opts.get("-printout_pixel")
        for s in range(setup.spixels):
            for f in range(setup.fpixels):
                if pick is None or (f, s) == tuple(pick):
                    print("%4d %4d : pixel %15.10g" % (f, s, img[s, f]), file=out)
    paths = setup.outputs
    print(f"writing {paths['floatfile']} as {img.size} 4-byte floats", file=out)
    atomic_write(paths["floatfile"], img.astype("<f4").tobytes())
    st = image_statistics(img, setup.roi, setup.pixel, setup.oversample)
    print("max_I = %g  at %g %g" % (st["max_I"], *st["where"]), file=out)
    print("mean= %g rms= %g rmsd= %g" % (st["mean"], st["rms"], st["rmsd"]), file=out)
    adc = setup.opts.get("-adc", 40.0)
    scale = stats.intfile_scale(setup.opts.get("-scale", 0.0), st["max_I"])
    print("intfile_scale = %g" % scale, file=out)
    roi = (setup.roi[0], min(setup.roi[1], setup.fpixels - 1), setup.roi[2], min(setup.roi[3], setup.spixels - 1))
    header = smv_header(setup, geometry)
    ints = stats.int_image(img, scale, adc, roi=roi, max_I=st["max_I"])
    print(f"writing {paths['intfile']} as 2-byte integers", file=out)
    atomic_write(paths["intfile"], smv_bytes(ints, header))
    if "pgmfile" in paths:
        pscale = stats.pgm_scale(setup.opts.get("-pgmscale", 0.0), scale, st["rmsd"])
        print("pgm_scale = %g" % pscale, file=out)
        print(f"writing {paths['pgmfile']} as 1-byte integers", file=out)
        atomic_write(paths["pgmfile"], pgm_file_bytes(stats.pgm_bytes(img, pscale, roi=roi), pscale))
    if "noisefile" in paths:
        noisy, photons, overloads = noise_image(img, setup.seed, adc, roi=roi)
        print("%.0f photons on noise image (%d overloads)" % (photons, overloads), file=out)
        print(f"writing {paths['noisefile']} as 2-byte integers", file=out)
        atomic_write(paths["noisefile"], smv_bytes(noisy, header))
    return 0


def _structure_factor_map(setup, frame, beam, background, mask):
    """-Fmap: each pixel holds the structure factor the original computed last
    for it (its last sub-pixel, the last source), e.g. to make absorption masks."""
    import torch
    dtype = background.dtype
    g = {k: v.to(dtype) for k, v in frame.geometry(beam.incident().double()).items()}
    px, os_ = setup.pixel * 1000.0, setup.oversample
    last = lambda n: ((torch.arange(n, dtype=dtype) * os_ + os_ - 1) + 0.5) * (px / os_)  # noqa: E731
    pos = g["pix0"] + last(setup.spixels)[:, None, None] * g["sdet"] + last(setup.fpixels)[None, :, None] * g["fdet"]
    incident, lam = beam.sources()
    scattering = pos / torch.linalg.norm(pos, dim=-1, keepdim=True) - incident[-1].to(dtype)
    F = background.structure_factor(0.5 * torch.linalg.norm(scattering, dim=-1) / lam[-1].to(dtype))
    return F if mask is None else F * mask.to(dtype)


def _solid_angle_sum(setup, frame, beam) -> float:
    """Sum of the sub-pixels' solid angles (steradian, each with the whole pixel's
    area, as the original adds them up)."""
    import numpy as np
    import torch
    with torch.no_grad():
        g = {k: v.double().cpu().numpy() for k, v in frame.geometry(beam.incident().double()).items()}
    px, os_ = setup.pixel * 1000.0, setup.oversample
    af = (np.arange(setup.fpixels * os_) + 0.5) * (px / os_)
    as_ = (np.arange(setup.spixels * os_) + 0.5) * (px / os_)
    o, f, s = g["pix0"], g["fdet"], g["sdet"]
    r2_f = af * af * (f @ f) + 2.0 * af * (o @ f)
    r2_s = o @ o + as_ * as_ * (s @ s) + 2.0 * as_ * (o @ s)
    total = 0.0
    for lo in range(0, len(as_), 512):
        r2 = r2_s[lo:lo + 512, None] + r2_f[None, :] + np.outer(2.0 * (f @ s) * as_[lo:lo + 512], af)
        if setup.opts.get("-curved_det"):  # every pixel at the beam distance
            r2 = np.full_like(r2, float(g["distance"]) ** 2)
        total += float((1e6 / r2).sum() if setup.opts.get("-point_pixel")
                       else (px * px * float(g["close_distance"]) * r2 ** -1.5).sum())
    return total


def main(argv: list[str] | None = None) -> int:
    from .nanobragg import companion_main
    return companion_main(PROG, argv, help_text, run)


if __name__ == "__main__":
    sys.exit(main())
