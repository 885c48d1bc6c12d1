"""`torchbragg refine`: fit the models of a DIALS experiment to one measured
image and write the refined experiment, the numbers and a report."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import numpy as np

from ..errors import InputError

USAGE = """usage: torchbragg refine EXPERIMENTS.expt IMAGES... --out DIR [options] [nanoBragg flags]

Refines the models of one experiment against one measured image (a still,
or one image of a sweep) and writes DIR/refined.expt (the experiment list
with the refined models), DIR/refined.json (each parameter's start, refined
value, standard uncertainty and unit; the loss and its history; whether it
converged; which parameters the data cannot determine) and DIR/report.md
with PNG figures (observed, model and residual around the strongest spots,
the loss per evaluation, the correlation matrix).

Beam, detector, goniometer, scan and crystal come from the experiment;
nanoBragg flags give the physics the file does not hold: -N, -default_F,
-hkl, -fluence or -flux, -mosaic, -mosaic_dom, -oversample, -dtype, -device,
spot shape, divergence, dispersion and so on. Start values of refined
quantities (N, fluence, mosaic spread) come from these flags.

images (one image is refined):
  .npy                      photons, (panels, slow, fast) or (slow, fast)
  .img / .smv               SMV; one panel, or panels tiled by their raw_image_offset
  .cbf                      (mini)CBF, read with fabio; -1 marks gaps
  .nxs / .h5                NXmx: /entry/data/data (and its pixel_mask)
  Several files: file k is image FIRST + k of the scan (FIRST: its first image).
  Pixels that are negative (after --adc-offset), above the panel's trusted
  range, flagged in a NeXus pixel_mask or masked in the experiment are left out.

options:
  --out DIR                 output folder (made if missing)
  --refine G,G,...          parameter groups: orientation, cell, N, mosaic, scale,
                            background, distance, beam_centre, panels, wavelength
                            (default: scale,background,orientation,cell,N)
  --experiment K            experiment K of the file (0-based; default 0)
  --image N                 image N of the scan (default: its first image; stills: 1);
                            for a NeXus file, also which of its images to read
  --adc-offset A            subtracted from every pixel read (default 0; SMV noise
                            images written by nanoBragg and torchbragg carry 40)
  --loss poisson|gaussian   likelihood (default poisson)
  --read-noise R --gain G   the Gaussian likelihood's read noise (photons) and gain
  --max-iter N              L-BFGS iterations per stage (default 60)
  --spots K                 cut-outs of the K strongest spots in the report (default 12)
  --quiet                   no summary on stdout
"""

DEFAULT_GROUPS = ("scale", "background", "orientation", "cell", "N")
DETECTOR_GROUPS = ("distance", "beam_centre", "panels")
OUTPUTS = ("refined.expt", "refined.json", "report.md")


# ----------------------------------------------------------------------------- arguments

def parse(argv: list[str]) -> dict:
    from ..simulate import refuse_geometry, split_options
    opts = dict(expt=None, images=[], out=None, refine=None, experiment="0", image=None, adc_offset="0",
                loss="poisson", read_noise=None, gain=None, max_iter="60", spots="12", quiet=False, flags=[])
    valued = ("--out", "--refine", "--experiment", "--image", "--adc-offset", "--loss", "--read-noise", "--gain",
              "--max-iter", "--spots")
    positionals = split_options(argv, opts, valued, ("--quiet",), "refine")
    opts["expt"], opts["images"] = (positionals[0], positionals[1:]) if positionals else (None, [])
    if opts["expt"] is None:
        raise InputError("no experiment file given")
    if not opts["images"]:
        raise InputError("no image given to refine against")
    if opts["out"] is None:
        raise InputError("--out DIR is required")
    for key in ("experiment", "max_iter", "spots") + (("image",) if opts["image"] is not None else ()):
        try:
            opts[key] = int(opts[key])
        except ValueError:
            raise InputError(f"--{key.replace('_', '-')} expects an integer, got '{opts[key]}'") from None
    if opts["max_iter"] < 1:
        raise InputError("--max-iter expects a number >= 1")
    for key in ("adc_offset", "read_noise", "gain"):
        if opts[key] is not None:
            try:
                opts[key] = float(opts[key])
            except ValueError:
                raise InputError(f"--{key.replace('_', '-')} expects a number, got '{opts[key]}'") from None
            if not math.isfinite(opts[key]):
                raise InputError(f"--{key.replace('_', '-')} must be finite")
    if opts["loss"] not in ("poisson", "gaussian"):
        raise InputError(f"unknown --loss '{opts['loss']}'; choose poisson or gaussian")
    if opts["loss"] != "gaussian" and (opts["read_noise"] is not None or opts["gain"] is not None):
        raise InputError("--read-noise and --gain belong to --loss gaussian")
    if opts["gain"] is not None and not opts["gain"] > 0:
        raise InputError("--gain must be positive")
    opts["groups"] = parse_groups(opts["refine"])
    refuse_geometry(opts["flags"])
    return opts


def parse_groups(text: str | None) -> list[str]:
    from .parameters import GROUPS
    if text is None:
        return list(DEFAULT_GROUPS)
    names = []
    for g in (t.strip() for t in text.split(",")):
        if not g:
            continue
        g = "beam_centre" if g == "beam_center" else g
        if g not in GROUPS:
            raise InputError(f"unknown parameter group '{g}'; known: {', '.join(GROUPS)}")
        if g not in names:
            names.append(g)
    if not names:
        raise InputError("--refine names no parameter group")
    return names


# ----------------------------------------------------------------------------- images

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


def _read_npy(path):
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InputError(f"{path} does not hold a numeric array")
    return a, None


def _read_smv(path):
    from ..io.smv import read_smv
    return read_smv(path)[1], None


def _read_cbf(path):
    import fabio
    try:
        img = fabio.open(path)
        data = np.asarray(img.data)
    except Exception as exc:  # fabio raises many kinds on foreign or broken files
        text = str(exc).strip()
        reason = getattr(exc, "strerror", None) or (text.splitlines()[0][:200] if text else type(exc).__name__)
        raise InputError(f"cannot read CBF image {path}: not a CBF file fabio can decode ({reason})") from None
    if data is None or data.ndim != 2:
        raise InputError(f"cannot read CBF image {path}: no 2-D image in it")
    return data, None


def _read_nexus(path, index):
    import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter before h5py reads)
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "entry/data/data" not in f:
                raise InputError(f"{path} has no /entry/data/data")
            ds = f["entry/data/data"]
            if ds.ndim not in (3, 4):
                raise InputError(f"{path}: /entry/data/data has shape {ds.shape}; expected (images, slow, fast) "
                                 "or (images, panels, slow, fast)")
            if not 0 <= index < ds.shape[0]:
                raise InputError(f"{path} holds images 1..{ds.shape[0]}, not image {index + 1}")
            data = np.asarray(ds[index])
            flags = None
            key = "entry/instrument/detector/pixel_mask"
            if key in f and tuple(f[key].shape) == data.shape:
                flags = np.asarray(f[key]) != 0
    except InputError:
        raise
    except (OSError, KeyError, ValueError) as exc:
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
        raw, flags = _read_npy(path)
    elif low.endswith((".img", ".smv")):
        raw, flags = _read_smv(path)
    elif low.endswith(".cbf"):
        raw, flags = _read_cbf(path)
    elif low.endswith((".nxs", ".h5", ".hdf5", ".nx5")):
        raw, flags = _read_nexus(path, index)
    else:
        raise InputError(f"cannot read image {path}: unknown format (use .npy, .img/.smv, .cbf or .nxs/.h5)")
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
    data = np.where(valid, data, 0.0)
    return data, valid


def pick_image(paths: list[str], experiment, number: int | None) -> tuple[str, int, int | None]:
    """(path, NeXus index, scan image number or None for a still) of the image to refine against."""
    scan = experiment.scan
    first, last = scan.image_range if scan is not None else (1, 1)
    n = first if number is None else number
    if not first <= n <= last:
        raise InputError(f"--image {n} is outside the {'scan' if scan is not None else 'still'}'s images "
                         f"{first}..{last}")
    if len(paths) == 1:
        return paths[0], n - first, (n if scan is not None else None)
    k = n - first
    if k >= len(paths):
        raise InputError(f"image {n} is file {k + 1} of the list, but {len(paths)} images were given")
    return paths[k], 0, (n if scan is not None else None)


# ----------------------------------------------------------------------------- refined experiment

def refined_experiment(experiment, sim, groups):
    """The experiment with the refined models: the crystal from the refined
    real-space vectors (space group and file fields kept), the detector and
    beam replaced only when they were refined."""
    import copy

    import torch

    from ..dials import Experiment
    from ..models import Crystal
    given = experiment.crystal
    with torch.no_grad():
        real = sim.crystal.real_vectors().double().cpu().numpy()
    crystal = Crystal.from_real_vectors(*real, space_group=given.space_group, extras=given.extras,
                                        dtype=torch.float64)
    detector, beam = experiment.detector, experiment.beam
    if any(g in groups for g in DETECTOR_GROUPS):
        detector = copy.deepcopy(sim.detector).to(device="cpu", dtype=torch.float64)
    if "wavelength" in groups:
        beam = copy.deepcopy(experiment.beam)
        with torch.no_grad():
            beam.wavelength.copy_(sim.beam.wavelength.detach().to(beam.wavelength))
    return Experiment(beam=beam, detector=detector, crystal=crystal, goniometer=experiment.goniometer,
                      scan=experiment.scan, identifier=experiment.identifier, extras=experiment.extras)


def misorientation(real_a: np.ndarray, real_b: np.ndarray) -> float:
    """Angle (degrees) of the rotation between two crystals' orientations (rows: a, b, c)."""
    qa = np.linalg.qr(np.asarray(real_a).T)[0]
    qb = np.linalg.qr(np.asarray(real_b).T)[0]
    r = qa @ qb.T
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2))))


def _finite(v):
    """JSON has no infinity or NaN: those become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


class _OneImage:
    """Mixin for a simulator class whose forward() renders one chosen scan image."""

    def forward(self, image=None, progress=None):
        return self.render(self.refine_image if image is None else image, progress)


_IMAGE_CLASSES: dict = {}


def render_image(sim, image: int | None) -> None:
    """Make sim(), as the refiner calls it, render scan image `image`."""
    if image is None:
        return
    base = type(sim)
    if base not in _IMAGE_CLASSES:
        _IMAGE_CLASSES[base] = type(base.__name__, (_OneImage, base), {"__module__": __name__})
        globals()[f"_{base.__name__}OneImage"] = _IMAGE_CLASSES[base]
    sim.__class__ = _IMAGE_CLASSES[base]
    sim.refine_image = int(image)


# ----------------------------------------------------------------------------- run

def _make_folder(out: str) -> bool:
    """Make the output folder; True when this run made it."""
    if os.path.isdir(out):
        return False
    if os.path.exists(out):
        raise InputError(f"cannot make the output folder {out}: a file of that name exists")
    try:
        os.makedirs(out)
    except OSError as exc:
        raise InputError(f"cannot make the output folder {out}: {exc.strerror or exc}") from None
    return True


def run(argv: list[str], out=None) -> int:
    out = out or sys.stdout
    opts = parse(argv)
    from ..flags import parse_args
    cfg = parse_args(opts["flags"])

    import torch

    from ..dials import read_experiments
    from ..simulate import build_from_experiment
    from .refiner import refine
    from .roi import roi_mask

    experiments = read_experiments(opts["expt"])
    k = opts["experiment"]
    if not 0 <= k < len(experiments):
        raise InputError(f"--experiment {k}: the file holds experiments 0..{len(experiments) - 1}")
    experiment = experiments[k]
    if experiment.crystal is None:
        raise InputError(f"experiment {k} of {opts['expt']} has no crystal: index it first")
    path, index, number = pick_image(opts["images"], experiment, opts["image"])
    data, valid = read_image(path, experiment.detector, index, opts["adc_offset"])

    sim, _ = build_from_experiment(experiment, cfg)
    if number is None:  # a still: no rotation whatever the goniometer
        sim.goniometer = sim.scan = None
    render_image(sim, number)
    start_real = sim.crystal.real_vectors().detach().double().cpu().numpy()
    data_t = torch.as_tensor(data, dtype=torch.float64)
    valid_t = torch.as_tensor(valid)
    with torch.no_grad():
        start_model = sim().detach()
        roi = roi_mask(sim, data_t.to(start_model), model=start_model).cpu() & valid_t
    if not bool(roi.any()):
        raise InputError("no pixel of the image is both valid and near a spot")

    made = _make_folder(opts["out"])
    try:
        loss_options = {}
        if opts["loss"] == "gaussian":
            loss_options = dict(read_noise=opts["read_noise"] or 0.0, gain=opts["gain"] or 1.0)
        t0 = time.perf_counter()
        try:
            result = refine(sim, data_t, opts["groups"], loss=opts["loss"], roi=roi, max_iter=opts["max_iter"],
                            loss_options=loss_options)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            model = sim().detach().double().cpu()
        background = np.zeros(model.shape[0])
        for label, value in result.background.items():  # background.K.const (and slopes)
            parts = label.split(".")
            if parts[-1] == "const":
                background[int(parts[1])] = value
        model = model.numpy() + background.reshape(-1, 1, 1)

        refined = refined_experiment(experiment, sim, opts["groups"])
        final_real = refined.crystal.real_vectors().detach().double().cpu().numpy()
        doc = summary_document(opts, path, number, result, seconds, start_real, final_real)
        from .report import build_report
        files = build_report(doc, result, data, model, valid, roi.numpy(), opts["spots"])
        files["refined.json"] = (json.dumps(_finite(doc), indent=2) + "\n").encode()
        write_outputs(opts, experiments, k, refined, files, argv)
    except BaseException:
        if made:
            shutil.rmtree(opts["out"], ignore_errors=True)
        raise
    if not opts["quiet"]:
        print(result.summary(), file=out)
        print(f"rotation from the start: {doc['crystal']['rotation_from_start_deg']:.4f} deg", file=out)
        print(f"wrote {', '.join(os.path.join(opts['out'], n) for n in OUTPUTS)}", file=out)
    return 0


def summary_document(opts, path, number, result, seconds, start_real, final_real) -> dict:
    d = result.to_dict()
    return dict(
        experiment_file=os.path.abspath(opts["expt"]), experiment=opts["experiment"], image_file=os.path.abspath(path),
        image=number, groups=list(opts["groups"]), loss_function=opts["loss"], adc_offset=opts["adc_offset"],
        flags=list(opts["flags"]),
        parameters=d["parameters"], undetermined=d["undetermined"], loss=d["loss"], loss_history=d["loss_history"],
        converged=d["converged"], renders=d["renders"], hessian_renders=d["hessian_renders"], pixels=d["pixels"],
        seconds=seconds, stages=d["stages"], labels=d["labels"], x=d["x"], sigma_internal=d["sigma_internal"],
        correlation=d["correlation"],
        crystal=dict(start_real_space=np.asarray(start_real).tolist(),
                     refined_real_space=np.asarray(final_real).tolist(),
                     rotation_from_start_deg=misorientation(start_real, final_real)),
    )


def write_outputs(opts, experiments, k, refined, files: dict, argv) -> None:
    """Every output file, each written whole; on a failure the ones already written go."""
    from ..dials import write_experiments
    from ..io.atomic import atomic_write
    written = []
    try:
        for name, data in files.items():
            target = os.path.join(opts["out"], name)
            atomic_write(target, data)
            written.append(target)
        target = os.path.join(opts["out"], "refined.expt")
        listed = [refined if i == k else e for i, e in enumerate(experiments)]
        write_experiments(target, listed, history=list(experiments.history) + ["torchbragg refine " + " ".join(argv)])
        written.append(target)
    except BaseException:
        for p in written:
            try:
                os.unlink(p)
            except OSError:
                pass
        raise


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from ..cli import guarded
    return guarded("torchbragg refine", lambda: run(argv))
