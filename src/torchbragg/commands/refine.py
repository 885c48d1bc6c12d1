"""`torchbragg refine`: fit the models of a DIALS experiment to measured
images (one image; several images of a sweep with one crystal; or a series of
stills, one image per experiment, with a shared detector and beam) and write
the refined experiments, the numbers and a report."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import namedtuple

import numpy as np

from ..errors import InputError
from ..io.images import is_container, read_image

USAGE = """usage: torchbragg refine EXPERIMENTS.expt [IMAGES...] --out DIR [options] [nanoBragg flags]

Refines the models of experiments against measured images and writes
DIR/refined.expt (the experiment list with the refined models; models that
experiments share in the file stay shared), DIR/refined.json (each
parameter's start, refined value, standard uncertainty and unit; the loss and
its history; whether it converged; which parameters the data cannot
determine; with several images, one section per image) and DIR/report.md
with PNG figures (observed, model and residual around the strongest spots,
for the first 4 images when there are several; the loss per evaluation; the
correlation matrix).

what is refined:
  one experiment, one image   a still, or one image of a sweep (--image N)
  one sweep, several images   one crystal (and detector and beam) shared by every
                              image, each rendered as its own scan image: several
                              files (file k is image FIRST + k), or --images FIRST:LAST
  several experiments         a series of stills (each its own crystal), one image
                              each, refined together: one file per experiment in
                              order, or one NeXus file holding one image per
                              experiment of the list, in its order (so also for
                              --experiment K). Crystal groups (orientation, cell,
                              N, mosaic, scale, background) are refined per image,
                              the others (distance, beam_centre, panels,
                              wavelength, ...) are shared by every image.

Beam, detector, goniometer, scan and crystal come from the experiment;
nanoBragg flags give the physics the file does not hold: -N, -default_F,
-hkl, -fluence or -flux, -mosaic, -mosaic_dom, -oversample, -dtype, -device,
spot shape, divergence, dispersion and so on. Start values of refined
quantities (N, fluence, mosaic spread) come from these flags; -N, -Na, -Nb
and -Nc take any number >= 1 (e.g. a refined -N 9.69).

images (default: the files the experiment list names in its imagesets, as
torchbragg simulate and dials.import write them):
  .npy                      photons, (panels, slow, fast) or (slow, fast)
  .img / .smv               SMV; one panel, or panels tiled by their raw_image_offset
  .cbf                      (mini)CBF, read with fabio; -1 marks gaps
  .nxs / .h5                NXmx: /entry/data/data (and its pixel_mask)
  One sweep, several files: file k is image FIRST + k of the scan (FIRST: its first image).
  Pixels that are negative (after --adc-offset), above the panel's trusted
  range, flagged in a NeXus pixel_mask or masked in the experiment are left out.

options:
  --out DIR                 output folder (made if missing)
  --refine G,G,...          parameter groups: orientation, cell, N, mosaic, scale,
                            background (a constant per panel), background_plane (and
                            slopes along fast and slow), radial_background (8 knots
                            in 2theta), distance, beam_centre, panels, wavelength,
                            spectrum, structure_factors, amorphous (the scale of
                            --background's scattering)
                            (default: scale,background,orientation,cell,N)
  --experiment K[,K...]     the experiments to refine (0-based; default: every
                            experiment of the file)
  --image N                 image N of the scan (default: its first image; stills: 1);
                            for a NeXus file, also which of its images to read
  --images FIRST:LAST       images FIRST to LAST of one sweep, refined together
  --adc-offset A            subtracted from every pixel read (default 0; SMV noise
                            images written by nanoBragg and torchbragg carry 40)
  --loss poisson|gaussian   likelihood (default poisson)
  --read-noise R --gain G   the Gaussian likelihood's read noise (photons) and gain
  --background FILE.stol    an amorphous background (as nonBragg computes it) in the
                            model; the sample flags (-sample_thick, -density, -MW, ...)
                            then describe that sample, as in torchbragg simulate
  --max-iter N              L-BFGS iterations per stage (default 60)
  --strategy auto|still|sweep|lbfgs
                            still: spot centroids first, then Levenberg-Marquardt
                            steps on the pixels (Anscombe, then Poisson), which holds
                            from faint to bright images in few renders; it fits several
                            stills together (each image's own groups by its centroids,
                            then every group's steps, a shared detector included);
                            sweep: the geometry (orientation, cell, detector) from
                            the centroids of the spots observed over a rotation
                            sweep's frames, as DIALS refines it, then the other
                            groups by Levenberg-Marquardt steps on the pixels where
                            the spots are; lbfgs: L-BFGS stages, coarse to fine, with
                            broadened spots; auto (default): still when every image
                            is a still, sweep when every image is a frame of a
                            rotation scan (5 frames or more), else lbfgs (still
                            and sweep need the poisson loss: their steps are
                            Poisson's)
  --per-image G,G,...       groups refined per image; default: a sweep's scale
                            (one per frame), the crystal groups for several stills
  --spots K                 cut-outs of the K strongest spots in the report (default 12)
  --quiet                   no summary on stdout and no progress on stderr

While it runs, the stage, evaluation and loss are written to stderr every few
seconds. The result is trusted (converged) only when the fit ended with a
small gradient AND the data accept it: the Poisson deviance within what photon
noise allows and few spots with their observed centroid shifted from the
model's. Otherwise, and for parameters the data cannot determine (an
uncertainty beyond the value's own scale, or a correlation beyond 0.99), a
warning goes to stderr and into report.md and refined.json ("warnings",
"converged", "fit_acceptable", "fit"). Uncertainties are inflated by the square
root of the deviance ratio when the data scatter more than photon noise.

exit status:
  0  converged: every output written, the fit trusted
  2  bad input (one line on stderr), nothing written
  3  not enough memory
  4  finished but not trustworthy (likely a wrong minimum, or the fit did not
     converge): every output written, with the warnings
"""

NOT_TRUSTED = 4  # exit status: outputs written, but the fit is not trusted

DEFAULT_GROUPS = ("scale", "background", "orientation", "cell", "N")
DETECTOR_GROUPS = ("distance", "beam_centre", "panels")
# several experiments: these follow each experiment's crystal (and shot); every other group is shared
PER_IMAGE_GROUPS = ("orientation", "cell", "N", "mosaic", "scale", "background", "background_plane", "radial_background")
OUTPUTS = ("refined.expt", "refined.json", "report.md")

# one image to refine against: experiment index, file, image index in the file, scan image (None: a still)
MeasuredImage = namedtuple("MeasuredImage", "experiment path index number")


# ----------------------------------------------------------------------------- arguments

def parse(argv: list[str]) -> dict:
    from .options import refuse_geometry, split_options
    opts = dict(expt=None, images=None, out=None, refine=None, experiment=None, image=None, adc_offset="0",
                loss="poisson", read_noise=None, gain=None, max_iter="60", spots="12", quiet=False, flags=[],
                strategy="auto", per_image=None, background=None)
    valued = ("--out", "--refine", "--experiment", "--image", "--images", "--adc-offset", "--loss", "--read-noise",
              "--gain", "--max-iter", "--spots", "--strategy", "--per-image", "--background")
    positionals = split_options(argv, opts, valued, ("--quiet",), "refine")
    opts["range"] = opts["images"]  # --images FIRST:LAST; "images" holds the files
    opts["expt"], opts["images"] = (positionals[0], positionals[1:]) if positionals else (None, [])
    if opts["expt"] is None:
        raise InputError("no experiment file given")
    if opts["out"] is None:
        raise InputError("--out DIR is required")
    if not opts["out"].strip():
        raise InputError("--out is empty; give the output folder")
    for key in ("max_iter", "spots") + (("image",) if opts["image"] is not None else ()):
        try:
            opts[key] = int(opts[key])
        except ValueError:
            raise InputError(f"--{key.replace('_', '-')} expects an integer, got '{opts[key]}'") from None
    if opts["max_iter"] < 1:
        raise InputError("--max-iter expects a number >= 1")
    if opts["image"] is not None and opts["range"] is not None:
        raise InputError("give --image N (one image) or --images FIRST:LAST (several), not both")
    opts["experiment"] = parse_experiments(opts["experiment"])
    for key in ("adc_offset", "read_noise", "gain"):
        if opts[key] is not None:
            try:
                opts[key] = float(opts[key])
            except ValueError:
                raise InputError(f"--{key.replace('_', '-')} expects a number, got '{opts[key]}'") from None
            if not math.isfinite(opts[key]):
                raise InputError(f"--{key.replace('_', '-')} must be finite")
    from ..refine.refiner import STRATEGIES
    if opts["strategy"] not in STRATEGIES:
        raise InputError(f"unknown --strategy '{opts['strategy']}'; choose {', '.join(STRATEGIES)}")
    if opts["loss"] not in ("poisson", "gaussian"):
        raise InputError(f"unknown --loss '{opts['loss']}'; choose poisson or gaussian")
    if opts["loss"] != "gaussian" and (opts["read_noise"] is not None or opts["gain"] is not None):
        raise InputError("--read-noise and --gain belong to --loss gaussian")
    if opts["gain"] is not None and not opts["gain"] > 0:
        raise InputError("--gain must be positive")
    if opts["read_noise"] is not None and opts["read_noise"] < 0:
        raise InputError("--read-noise must be >= 0")
    opts["groups"] = parse_groups(opts["refine"])
    if opts["per_image"] is not None:
        per = parse_groups(opts["per_image"])
        outside = [g for g in per if g not in opts["groups"]]
        if outside:
            raise InputError(f"--per-image {','.join(outside)}: not among the refined groups "
                             f"{','.join(opts['groups'])}")
        opts["per_image"] = per
    refuse_geometry(opts["flags"])
    if opts["background"] is not None:  # the sample flags then describe the amorphous sample
        from .nonbragg import background_sample
        opts["background"], opts["flags"] = background_sample(opts["background"], opts["flags"])
    elif "amorphous" in opts["groups"]:
        raise InputError("--refine amorphous needs an amorphous background: --background FILE.stol")
    return opts


def parse_experiments(text: str | None) -> list[int] | None:
    """The --experiment list (None: every experiment of the file)."""
    if text is None or text.strip() == "all":
        return None
    out = []
    for part in text.split(","):
        try:
            k = int(part)
        except ValueError:
            raise InputError(f"--experiment expects an integer or a list K,K,..., got '{text}'") from None
        if k in out:
            raise InputError(f"--experiment names experiment {k} twice")
        out.append(k)
    return out


def parse_groups(text: str | None) -> list[str]:
    from ..refine.parameters import GROUPS
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


def plan_shots(opts, experiments) -> list[MeasuredImage]:
    """The images to refine against, checked against the experiments and the
    files given: one, several of one sweep, or one per experiment."""
    count = len(experiments)
    chosen = opts["experiment"] if opts["experiment"] is not None else list(range(count))
    for k in chosen:
        if not 0 <= k < count:
            raise InputError(f"--experiment {k}: the file holds experiments 0..{count - 1}")
        if experiments[k].crystal is None:
            raise InputError(f"experiment {k} of {opts['expt']} has no crystal: index it first")
    paths = opts["images"]
    if len(chosen) == 1:
        return _sweep_shots(opts, chosen[0], experiments[chosen[0]], paths)
    if opts["image"] is not None or opts["range"] is not None:
        raise InputError(f"--image and --images choose images of one sweep, but {len(chosen)} experiments are "
                         "refined (one image each); choose one with --experiment K")
    owner = {}
    for k in chosen:
        c = id(experiments[k].crystal)
        if c in owner:
            raise InputError(f"experiments {owner[c]} and {k} share one crystal; refine them one at a time "
                             "with --experiment K")
        owner[c] = k
    if len(paths) == 1 and not is_container(paths[0]):
        raise InputError(f"{len(chosen)} experiments are refined but one image file was given: give one image per "
                         "experiment (in order), one NeXus file with an image per experiment, or choose one "
                         "experiment with --experiment K")
    if len(paths) != 1 and len(paths) != len(chosen):
        raise InputError(f"{len(chosen)} experiments are refined but {len(paths)} image files were given: give one "
                         "image per experiment, in order")
    shots = []
    for j, k in enumerate(chosen):
        scan = experiments[k].scan
        number = scan.image_range[0] if scan is not None else None
        shots.append(MeasuredImage(k, paths[0], k, number) if len(paths) == 1
                     else MeasuredImage(k, paths[j], 0, number))
    return shots


def _sweep_shots(opts, k, experiment, paths) -> list[MeasuredImage]:
    """The image(s) of one experiment: --image, --images, one per file given, or its first."""
    from ..dataset import image_numbers
    scan = experiment.scan
    first, last = scan.image_range if scan is not None else (1, 1)
    if len(paths) > last - first + 1:
        what = f"the scan has {last - first + 1} images ({first}..{last})" if scan is not None else "it is a still"
        raise InputError(f"{len(paths)} image files were given for experiment {k}, but {what}")
    if opts["range"] is not None:
        numbers = image_numbers(opts["range"], scan)
    elif opts["image"] is not None or len(paths) == 1:
        numbers = [opts["image"]]
    else:
        numbers = list(range(first, first + len(paths)))
    if len(numbers) > 1 and len(paths) == 1 and not is_container(paths[0]):
        raise InputError(f"--images {opts['range']} asks for {len(numbers)} images but {paths[0]} holds one: give "
                         "one file per image (file k is image FIRST + k) or a NeXus file")
    if scan is None and is_container(paths[0]):  # a series of stills in one file: image k is experiment k's
        pick_image(paths, experiment, opts["image"])  # --image N other than 1 is refused, as for other files
        return [MeasuredImage(k, paths[0], k, None)]
    return [MeasuredImage(k, *pick_image(paths, experiment, n)) for n in numbers]


# ----------------------------------------------------------------------------- refined experiment

def refined_experiment(experiment, sim, groups):
    """The experiment with the refined models: the crystal from the refined
    real-space vectors (space group and file fields kept), the detector and
    beam replaced only when they were refined."""
    import copy

    import torch

    from ..io.dials import Experiment
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


def refined_experiments(experiments, refined, groups) -> list:
    """Every experiment of the file with the refined models: `refined` lists
    (experiment index, its simulator after the fit). A model that several
    experiments share in the file is replaced by one refined model, so it
    stays shared when written."""
    from ..io.dials import Experiment
    swap = {}
    for k, sim in refined:
        e = experiments[k]
        r = refined_experiment(e, sim, groups)
        for attr in ("beam", "detector", "crystal"):
            swap.setdefault(id(getattr(e, attr)), getattr(r, attr))

    def pick(model):
        return None if model is None else swap.get(id(model), model)

    return [Experiment(beam=pick(e.beam), detector=pick(e.detector), crystal=pick(e.crystal),
                       goniometer=e.goniometer, scan=e.scan, identifier=e.identifier, extras=e.extras)
            for e in experiments]


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
    from ..build.experiment import parse_experiment_flags
    cfg = parse_experiment_flags(opts["flags"])

    from ..io.dials import read_experiments

    experiments = read_experiments(opts["expt"])
    if not opts["images"]:  # the files the experiment list names
        from ..io.imagesets import named_images
        chosen = opts["experiment"] if opts["experiment"] is not None else list(range(len(experiments)))
        opts["images"] = named_images(experiments, opts["expt"], chosen)
    shots = plan_shots(opts, experiments)
    if not opts["quiet"]:
        for line in profile_notes(experiments, {s.experiment for s in shots}, opts["flags"]):
            print(f"torchbragg refine: note: {line}", file=sys.stderr)
    # every image is read (and checked) before anything is rendered
    images = [read_image(s.path, experiments[s.experiment].detector, s.index, opts["adc_offset"]) for s in shots]
    return refine_shots(opts, cfg, experiments, shots, images, argv, out)


def profile_notes(experiments, chosen, flags) -> list[str]:
    """The spot-shape flags DIALS's profile block of each chosen experiment
    suggests (refine.strategy.profile_flags), for those the user gave none
    of: the render does not read the profile itself."""
    from ..refine.strategy import profile_flags
    notes = []
    for k in sorted(chosen):
        e = experiments[k]
        width = float(e.scan.oscillation[1]) if e.scan is not None and e.goniometer is not None else None
        suggested = profile_flags(e.extras.get("profile"), width)
        names = suggested[::2]
        if suggested and not any(n in flags for n in names + ["-mosaic_spread", "-mosaicity", "-mosaic_dom"]):
            notes.append(f"experiment {k}'s profile (sigma_m, sigma_b) suggests {' '.join(suggested)}")
    return notes


def _loss_options(opts) -> dict:
    if opts["loss"] == "gaussian":
        return dict(read_noise=opts["read_noise"] or 0.0, gain=opts["gain"] or 1.0)
    return {}


def _with_background(model, parameters) -> np.ndarray:
    """The rendered model plus each panel's refined background constant
    (parameters: ParameterResults or their dicts; labels background.K.const)."""
    background = np.zeros(model.shape[0])
    for p in parameters:
        p = p if isinstance(p, dict) else vars(p)
        parts = p["name"].split(".")
        if p["group"] == "background" and parts[-1] == "const":
            background[int(parts[1])] = p["value"]
    return model + background.reshape(-1, 1, 1)


def image_entries(experiments, shots, images, cfg, background=None) -> list:
    """One refinement entry per image. One sweep: one simulator (every model
    shared), each entry its own scan image. Several experiments: each its own
    simulator (beams included, so each still keeps its own refined scale)."""
    import torch

    from ..build.experiment import build_from_experiment
    from ..refine.refiner import Entry
    sims, entries = {}, []
    for s, (data, valid) in zip(shots, images):
        if s.experiment not in sims:
            sims[s.experiment] = build_from_experiment(experiments[s.experiment], cfg, direct_beam=False,
                                                       background=background)[0]
        entries.append(Entry(sims[s.experiment], torch.as_tensor(data, dtype=torch.float64),
                             valid=torch.as_tensor(valid), image=s.number, still=s.number is None))
    return entries


def _real(crystal):
    return crystal.real_vectors().detach().double().cpu().numpy()


def refine_shots(opts, cfg, experiments, shots, images, argv, out) -> int:
    """Every image refined by the one engine: one image; one sweep with every
    group shared; or several stills with crystal groups per image."""
    import torch

    from ..refine.centroids import centroid_rms, miller_label
    from ..refine.refiner import Refiner
    from ..refine.report import FIGURE_IMAGES, build_joint_report, build_report, strongest_observed
    from ..refine.roi import mask_substitutions

    one = len(shots) == 1
    sweep = len({s.experiment for s in shots}) == 1
    groups = opts["groups"]
    if opts.get("per_image") is not None:
        per_image = list(opts["per_image"])
    else:
        # a sweep's frames: one scale each (the beam and the exposure vary), all else shared
        per_image = [g for g in groups if g == "scale" and not one] if sweep else \
            [g for g in groups if g in PER_IMAGE_GROUPS]
    shared = [g for g in groups if g not in per_image]
    entries = image_entries(experiments, shots, images, cfg, opts["background"])
    starts = [_real(e.sim.crystal) for e in entries]
    try:
        refiner = Refiner(entries, shared, per_image, loss=opts["loss"], max_iter=opts["max_iter"],
                          strategy=opts["strategy"],
                          entry_max_iter=opts["max_iter"], loss_options=_loss_options(opts),
                          progress=None if opts["quiet"] else Progress(sys.stderr))
    except ValueError as exc:
        raise InputError(str(exc)) from None

    made = _make_folder(opts["out"])
    try:
        t0 = time.perf_counter()
        try:
            result = refiner.run()
        except ValueError as exc:
            raise InputError(str(exc)) from None
        seconds = time.perf_counter() - t0
        listed = refined_experiments(experiments, [(s.experiment, e.sim) for s, e in zip(shots, entries)], groups)
        finals = [_real(listed[s.experiment].crystal) for s in shots]
        shown = []
        for j, e in enumerate(entries[:FIGURE_IMAGES]):
            # rendered where the figures look: the region and the cut-outs of the strongest spots
            where = refiner.masks[j].clone()
            for k, sl, f in strongest_observed(images[j][0], images[j][1], max(int(opts["spots"]), 1)):
                where[k, max(sl - 7, 0):sl + 8, max(f - 7, 0):f + 8] = True
            with torch.no_grad():
                model = e.render(e.sim, mask_substitutions(where)).detach().double().cpu().numpy()
            model = _with_background(model, result.parameters + result.images[j])
            shown.append((images[j][0], model, images[j][1], refiner.masks[j].numpy(),
                          miller_label(e.sim, None if e.still else e.image)))
        if one:
            s = shots[0]
            doc = summary_document(opts, s.experiment, s.path, s.number, result, seconds, starts[0], finals[0])
            files = build_report(doc, result, *shown[0][:4], opts["spots"], label=shown[0][4])
        else:
            doc = joint_document(opts, shots, result, sweep, shared, per_image, starts, finals)
            files = build_joint_report(doc, result, shown, opts["spots"])
        doc["centroids"] = [dict(image=j if e.image is None else e.image,
                                 **centroid_rms(e.sim, images[j][0], images[j][1], None if e.still else e.image))
                            for j, e in enumerate(entries)]
        files["report.md"] += centroid_lines(doc["centroids"]).encode()
        files["refined.json"] = (json.dumps(_finite(doc), indent=2) + "\n").encode()
        write_outputs(opts, experiments, listed, files, argv)
    except BaseException:
        if made:
            shutil.rmtree(opts["out"], ignore_errors=True)
        raise
    if not opts["quiet"]:
        print(result.summary(), file=out)
        if one:
            print(f"rotation from the start: {doc['crystal']['rotation_from_start_deg']:.4f} deg", file=out)
        for j, section in enumerate(doc.get("images", [])):
            where = f", scan image {section['image']}" if section["image"] is not None else ""
            print(f"  image {j} (experiment {section['experiment']}{where}): loss {section['loss']:.3f}, "
                  f"rotation from the start {section['crystal']['rotation_from_start_deg']:.4f} deg", file=out)
        print(f"wrote {', '.join(os.path.join(opts['out'], n) for n in OUTPUTS)}", file=out)
    for w in result.warnings:
        print(f"torchbragg refine: warning: {w}", file=sys.stderr)
    return 0 if result.converged else NOT_TRUSTED


class Progress:
    """The stage, evaluation and loss of a running fit on `stream`, at most
    every `every` seconds (and when the uncertainties start)."""

    def __init__(self, stream, every: float = 3.0):
        self.stream, self.every = stream, every
        self.t0 = time.perf_counter()
        self.last = None

    def __call__(self, info: dict) -> None:
        now = time.perf_counter()
        if info["stage"] != "uncertainties" and self.last is not None and now - self.last < self.every:
            return
        self.last = now
        where = f" (image {info['image']})" if info.get("image") is not None else ""
        if info["stage"] == "uncertainties":
            text = "computing the uncertainties"
        else:
            text = (f"stage {info['stage']}{where} [{info['dtype']}], evaluation {info['evaluation']}, "
                    f"loss {info['loss']:.6g}")
        print(f"torchbragg refine: {now - self.t0:.0f} s: {text}", file=self.stream, flush=True)


def _crystal_section(start_real, final_real) -> dict:
    return dict(start_real_space=np.asarray(start_real).tolist(), refined_real_space=np.asarray(final_real).tolist(),
                rotation_from_start_deg=misorientation(start_real, final_real))


def _honesty(d) -> dict:
    """What says whether the result can be trusted."""
    return {k: d[k] for k in ("gradient_converged", "fit_acceptable", "fit", "uncertainty_scale", "newton_decrement",
                              "warnings")}


def summary_document(opts, k, path, number, result, seconds, start_real, final_real) -> dict:
    d = result.to_dict()
    return dict(
        experiment_file=os.path.abspath(opts["expt"]), experiment=k, image_file=os.path.abspath(path),
        image=number, groups=list(opts["groups"]), loss_function=opts["loss"], adc_offset=opts["adc_offset"],
        flags=list(opts["flags"]),
        parameters=d["parameters"], undetermined=d["undetermined"], loss=d["loss"], loss_history=d["loss_history"],
        converged=d["converged"], renders=d["renders"], hessian_renders=d["hessian_renders"], pixels=d["pixels"],
        seconds=seconds, stages=d["stages"], labels=d["labels"], x=d["x"], sigma_internal=d["sigma_internal"],
        correlation=d["correlation"], crystal=_crystal_section(start_real, final_real), **_honesty(d),
    )


def centroid_lines(rows) -> str:
    """The report's table of spot centroids: refined model against observed."""
    lines = ["", "## Spot centroids", "",
             "The brightest observed spots of each image (centroids above the local background) against the "
             "refined model's, as dials.refine reports: rms in pixels, and for scan images the rms of where the "
             "model's reflections cross the Ewald sphere from the image's middle, in frames.", "",
             "| image | spots | rms (px) | rms (frames) |", "| --- | --- | --- | --- |"]
    for r in rows:
        frames = "-" if r["rms_frames"] is None else f"{r['rms_frames']:.3f}"
        lines.append(f"| {r['image']} | {r['spots']} | {r['rms_px']:.3f} | {frames} |")
    return "\n".join(lines) + "\n"


def joint_document(opts, shots, result, sweep, shared, per_image, starts, finals) -> dict:
    """refined.json of several images: the shared parameters and the joint fit
    at the top, one section per image (its own parameters, loss and history)."""
    d = result.to_dict()
    images = []
    for j, s in enumerate(shots):
        images.append(dict(
            experiment=s.experiment, image_file=os.path.abspath(s.path), file_index=s.index, image=s.number,
            parameters=d["images"][j], loss=d["image_loss"][j], loss_history=d["image_history"][j],
            converged=d["converged"], pixels=d["image_pixels"][j], fit=d["image_fit"][j],
            undetermined=[lab for lab in d["undetermined"] if lab.startswith(f"image{j}.")],
            crystal=_crystal_section(starts[j], finals[j])))
    doc = dict(
        experiment_file=os.path.abspath(opts["expt"]), mode="sweep" if sweep else "stills",
        experiments=list(dict.fromkeys(s.experiment for s in shots)), groups=list(opts["groups"]),
        shared_groups=list(shared), per_image_groups=list(per_image), loss_function=opts["loss"],
        adc_offset=opts["adc_offset"], flags=list(opts["flags"]),
        parameters=d["parameters"], undetermined=d["undetermined"], loss=d["loss"], loss_history=d["loss_history"],
        converged=d["converged"], renders=d["renders"], hessian_renders=d["hessian_renders"], pixels=d["pixels"],
        seconds=d["seconds"], stages=d["stages"], labels=d["labels"], x=d["x"], sigma_internal=d["sigma_internal"],
        correlation=d["correlation"], not_written=d["not_written"], images=images, **_honesty(d))
    if sweep:
        doc["crystal"] = images[0]["crystal"]
    return doc


def write_outputs(opts, experiments, listed, files: dict, argv) -> None:
    """Every output file, each written whole; on a failure the ones already written go."""
    from ..io.dials import write_experiments
    from ..io.atomic import atomic_write
    written = []
    try:
        for name, data in files.items():
            target = os.path.join(opts["out"], name)
            atomic_write(target, data)
            written.append(target)
        target = os.path.join(opts["out"], "refined.expt")
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
    from .nanobragg import guarded
    return guarded("torchbragg refine", lambda: run(argv))
