"""`torchbragg simulate`: render the images of a DIALS experiment, with
nanoBragg flags for the physics an experiment file does not hold; and the
factory from an experiment (plus those flags) to a Simulator."""

from __future__ import annotations

import os
import sys

from .config import SimulationConfig
from .errors import InputError

USAGE = """usage: torchbragg simulate EXPERIMENTS.expt --out PREFIX [--images FIRST:LAST] [--experiment K]
                           [--format npy] [--quiet] [nanoBragg flags]

Renders images of the experiment's scan (all of them without --images; one
for a still) and writes PREFIX_NNNNN.npy per image: float32 photons per
pixel, shape (panels, slow, fast). Beam, detector (panels, sensor thickness
and mu), goniometer, scan and crystal come from the experiment; nanoBragg
flags give the rest: -N, -mosaic, -mosaic_dom, -default_F, -hkl, -fluence or
-flux, -phisteps (rotation steps per image), -oversample, -thicksteps, -roi,
-dtype, -device, -seed, spot shape, divergence and dispersion, and so on."""

# Flags whose values the experiment file holds: refused, so a run never mixes two geometries.
GEOMETRY_FLAGS = {
    "-cell", "-mat", "-misset", "-lambda", "-wave", "-wavelength", "-energy", "-pixel", "-detpixels",
    "-detpixels_f", "-detpixels_x", "-detpixels_s", "-detpixels_y", "-detsize", "-detsize_f", "-detsize_s",
    "-distance", "-close_distance", "-Xbeam", "-Ybeam", "-Xclose", "-Yclose", "-ORGX", "-ORGY", "-mosflm", "-xds",
    "-adxv", "-denzo", "-dials", "-pivot", "-fdet_vector", "-sdet_vector", "-odet_vector", "-pix0_vector",
    "-beam_vector", "-polar_vector", "-spindle_axis", "-twotheta_axis", "-twotheta", "-detector_rotx",
    "-detector_roty", "-detector_rotz", "-phi", "-osc", "-phistep", "-detector_thick", "-detector_abs",
    "-detector_absorb", "-detector_absorption", "-polar", "-img", "-floatfile", "-floatimage", "-intfile",
    "-intimage", "-noisefile", "-noiseimage", "-pgmfile", "-pgmimage", "-write_expt",
}


def build_from_experiment(experiment, cfg: SimulationConfig | None = None, dtype=None, device=None,
                          chunk_elements=None):
    """A Simulator for a dials.Experiment; `cfg` (nanoBragg flags parsed into a
    SimulationConfig) supplies what the experiment does not say. Returns
    (simulator, BuildInfo)."""
    import torch

    from .models import Crystal
    from .nanobragg import BuildInfo, _device, make_beam, make_crystal, read_inputs, render_options
    from .simulator import Simulator

    cfg = cfg or SimulationConfig()
    dtype, device = _device(cfg, dtype, device)
    info = BuildInfo(cfg, messages=list(cfg.notes))
    if experiment.crystal is None:
        raise InputError("the experiment has no crystal: index it first, or give one in the file")
    table, sources, mask = read_inputs(cfg, info)
    f64 = torch.float64
    src = experiment.beam.to(f64)
    with torch.no_grad():
        travel, e_vector = src.incident().cpu().numpy(), src.e_vector().cpu().numpy()
        fraction = float(src.polarization_fraction)
    beam = make_beam(cfg, info, sources, travel, e_vector, float(src.wavelength), fraction, device)
    given = experiment.crystal.to(f64)
    probe = Crystal(given.cell, given.U, misset=given.misset, space_group=given.space_group, setting=given.setting,
                    dtype=f64, device=device)
    crystal = make_crystal(cfg, info, probe, table, device)
    detector = experiment.detector.to(device=device, dtype=f64)
    if mask is not None:
        if len(detector.panels) != 1:
            raise InputError("-mask applies to single-panel detectors; this one has %d panels" % len(detector.panels))
        try:
            detector.panels[0].set_mask(mask)
        except ValueError as exc:
            raise InputError(f"-mask {cfg.detector.mask_file}: {exc}") from None
    with torch.no_grad():
        absorbing = all(float(p.thickness) > 0 and float(p.mu) > 0 for p in detector.panels)
    options = render_options(cfg, absorbing, chunk_elements)
    options.phisteps = max(cfg.crystal.phisteps or 1, 1)
    goniometer = None if experiment.goniometer is None else experiment.goniometer.to(device=device, dtype=f64)
    scan = None if experiment.scan is None else experiment.scan.to(device=device, dtype=f64)
    sim = Simulator(beam, crystal, detector, goniometer, scan, options)
    return sim.to(dtype), info


def _image_range(text: str, scan) -> range:
    first, last = (scan.image_range if scan is not None else (1, 1))
    if text is None:
        return range(first, last + 1)
    try:
        a, _, b = text.partition(":")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise InputError(f"--images expects FIRST:LAST (image numbers), got '{text}'") from None
    if not (first <= lo <= hi <= last):
        raise InputError(f"--images {text} is outside the scan's images {first}:{last}")
    return range(lo, hi + 1)


def parse(argv: list[str]) -> dict:
    opts = dict(expt=None, out=None, images=None, experiment=0, format="npy", quiet=False, flags=[])
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--out", "--images", "--experiment", "--format"):
            if i + 1 >= len(argv):
                raise InputError(f"{a} expects a value")
            opts[a[2:]] = argv[i + 1]
            i += 2
            continue
        if a == "--quiet":
            opts["quiet"] = True
        elif a.startswith("--"):
            raise InputError(f"unknown option '{a}' (see torchbragg simulate -h)")
        elif opts["expt"] is None and not opts["flags"] and not a.startswith("-"):
            opts["expt"] = a
        else:
            opts["flags"].append(a)  # nanoBragg flags and their values
        i += 1
    if opts["expt"] is None:
        raise InputError("no experiment file given")
    if opts["out"] is None:
        raise InputError("--out PREFIX is required")
    if opts["format"] != "npy":
        raise InputError(f"unknown --format '{opts['format']}'; this version writes npy")
    try:
        opts["experiment"] = int(opts["experiment"])
    except ValueError:
        raise InputError(f"--experiment expects an integer, got '{opts['experiment']}'") from None
    refused = [f for f in opts["flags"] if f in GEOMETRY_FLAGS]
    if refused:
        raise InputError(f"{refused[0]} is held by the experiment file; edit the experiment to change it")
    return opts


def run(argv: list[str], out=sys.stdout) -> int:
    opts = parse(argv)
    from .flags import parse_args
    cfg = parse_args(opts["flags"])
    folder = os.path.dirname(os.path.abspath(opts["out"]))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {opts['out']}: folder {folder} does not exist")

    import numpy as np
    import torch

    from .dials import read_experiments
    from .io.atomic import atomic_write
    experiments = read_experiments(opts["expt"])
    k = opts["experiment"]
    if not 0 <= k < len(experiments):
        raise InputError(f"--experiment {k}: the file holds experiments 0..{len(experiments) - 1}")
    sim, info = build_from_experiment(experiments[k], cfg)
    for line in info.messages:
        print(line, file=out)
    images = _image_range(opts["images"], sim.scan)
    for n, image in enumerate(images):
        with torch.no_grad():
            img = sim.render(image).to("cpu", torch.float32).numpy()
        if not np.isfinite(img).all():
            raise InputError(f"image {image} is not finite; check the fluence and structure factors")
        path = f"{opts['out']}_{image:05d}.npy"
        import io
        buf = io.BytesIO()
        np.save(buf, img)
        atomic_write(path, buf.getvalue())
        if not opts["quiet"]:
            print(f"image {image} ({n + 1}/{len(images)}): {path}  max {img.max():.4g}  sum {img.sum():.6g}",
                  file=out, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        return run(argv)
    except InputError as exc:
        print(f"torchbragg simulate: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("torchbragg simulate: error: not enough memory; try a smaller -roi or fewer panels", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("torchbragg simulate: interrupted", file=sys.stderr)
        return 130
