"""`torchbragg simulate`: render the images of a DIALS experiment, with
nanoBragg flags for the physics an experiment file does not hold; and the
factory from an experiment (plus those flags) to a Simulator."""

from __future__ import annotations

import os
import sys

from ..dataset import FORMATS
from ..errors import InputError
from .options import refuse_geometry, split_options

USAGE = """usage: torchbragg simulate EXPERIMENTS.expt --out PREFIX [options] [nanoBragg flags]

Renders a dataset and writes it with the experiment describing its truth
(PREFIX.expt, naming the images, in the frame and numbering a reader of the
files gets). Beam, detector (panels, sensor thickness and mu), goniometer,
scan and crystal come from the experiment; nanoBragg flags give the rest:
-N, -mosaic, -mosaic_dom, -default_F, -hkl, -fluence or -flux, -phisteps
(rotation steps per image, sampled at their middles), -oversample,
-thicksteps, -parallax, -roi, -mask, -dtype (float32 by default), -device,
-seed, -nonoise, spot shape, divergence and dispersion, and so on. -N, -Na,
-Nb and -Nc take any number >= 1 here (the domain size is continuous in the
model; nanoBragg reads integers). Panels with a thickness and mu get the
physical parallax by default (-parallax dials: the depth DIALS's correction
assumes; original: nanoBragg's layers). Missing output folders are made.

what to render (default: every image of every experiment's scan, one image
for a still):
  --images FIRST:LAST       images of the scan (numbered as the scan numbers them)
  --experiment K            only experiment K of the file (0-based)
  --stills N                a series of N stills of the crystal in random
                            orientations drawn from --orientation-seed S (default 0)
  --orientations FILE       a series of stills, one orientation a line: 9 numbers
                            (a rotation matrix, row by row) or 3 angles about x, y, z (deg)
  --spectra FILE            per-shot spectra: lines 'shot energy_eV weight'
output (PREFIX names files, not a folder: PREFIX_00001.npy, ... and PREFIX.expt
in PREFIX's folder, which must exist; an empty PREFIX or one ending in / is refused):
  --format npy|smv|cbf|nxs  npy: float32 expected photons, (panels, slow, fast), one
                            file per image; smv: the original's noise image (photons + 40);
                            cbf: Pilatus miniCBF photon counts; nxs: one NXmx file
                            (bitshuffle-LZ4) of photon counts. Counts are Poisson draws
                            with the original's generator, image k seeded with
                            -seed + k - 1 (default -seed 1; k is the scan's image
                            number for one sweep, else 1, 2, ...); -nonoise: expected
                            photons rounded
  --resume                  skip images whose file is already complete (it reads back
                            whole, with the detector's shape); others are rendered again.
                            Without --resume a failed run leaves no file of its own;
                            with it, the images already complete are kept
  --workers N               spread images over N local processes (at most one per
                            image to render and per CPU)
  --ray [ADDRESS]           spread images over a Ray cluster (a local one without
                            ADDRESS); each worker uses a GPU when it has one
  --quiet                   no progress bar or per-image lines
amorphous background (as nonBragg computes it), added to every image:
  --background FILE.stol    table of sin(theta)/lambda (1/A) against the structure factor
                            of one molecule; with it the sample flags describe the
                            amorphous sample, not the crystal: -sample_thick (mm, default
                            0.1), -sample_width, -sample_height (mm, default 0.1),
                            -samplesize (mm, all three), -density (g/cm^3, default 1),
                            -MW (g/mol, default 18), -molecules (a count, instead)
detector response (any of these: every format holds the detector's integer
readings in ADU, the photons spread, scaled, offset and read out):
  -psf gauss|fiber          point-spread function, of FWHM -psf_fwhm UM (microns, default 46)
  -psf_radius N             its radius in pixels (default: where 1e-4 of the photons remains)
  -gain G                   ADU per photon (default 1)
  -adc_offset A             ADU added to every pixel (default 0)
  -readout ADU              rms read-out noise (default 0)
  -calibration_noise PCT    rms per-pixel calibration error in percent, drawn from -seed (default 0)
  -overload N               largest reading (ADU; default: none)
"""

def parse(argv: list[str]) -> dict:
    opts = dict(expt=None, out=None, images=None, experiment=None, format="npy", quiet=False, resume=False,
                stills=None, orientation_seed=None, orientations=None, spectra=None, workers=1, ray=None,
                background=None, flags=[])
    valued = ("--out", "--images", "--experiment", "--format", "--stills", "--orientation-seed", "--orientations",
              "--spectra", "--workers", "--background")
    # --ray takes an optional cluster address (host:port or 'auto'); none: a local cluster
    optional = {"--ray": (lambda w: ":" in w or w == "auto", "local")}
    positionals = split_options(argv, opts, valued, ("--quiet", "--resume"), "simulate", 1, optional)
    opts["expt"] = positionals[0] if positionals else None
    if opts["expt"] is None:
        raise InputError("no experiment file given")
    if opts["out"] is None:
        raise InputError("--out PREFIX is required")
    if not opts["out"].strip():
        raise InputError("--out is empty; give a file name prefix such as images/run1")
    if opts["out"].endswith(("/", os.sep)) or os.path.basename(opts["out"]) in (".", ".."):
        raise InputError(f"--out {opts['out']} names a folder; give a file name prefix inside it, such as "
                         f"{os.path.join(opts['out'], 'image')}")
    if opts["format"] not in FORMATS:
        raise InputError(f"unknown --format '{opts['format']}'; choose from {', '.join(FORMATS)}")
    for key in ("experiment", "stills", "orientation_seed", "workers"):
        if opts[key] is not None and not isinstance(opts[key], int):
            try:
                opts[key] = int(opts[key])
            except ValueError:
                raise InputError(f"--{key.replace('_', '-')} expects an integer, got '{opts[key]}'") from None
    if opts["stills"] is not None and opts["stills"] < 1:
        raise InputError("--stills expects a number of shots >= 1")
    if opts["workers"] < 1:
        raise InputError("--workers expects a number >= 1")
    refuse_geometry(opts["flags"])
    if opts["background"] is not None:
        from .nonbragg import background_sample
        opts["background"], opts["flags"] = background_sample(opts["background"], opts["flags"])
    from .noisify import split_response_flags
    opts["flags"], opts["response"] = split_response_flags(opts["flags"], "simulate")
    return opts


def _progress(total: int, quiet: bool):
    """A progress bar with rate and ETA on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="image", file=sys.stderr)


def run(argv: list[str], out=None) -> int:
    out = out or sys.stdout
    opts = parse(argv)
    from ..build.experiment import parse_experiment_flags
    cfg = parse_experiment_flags(opts["flags"])
    for note in cfg.notes:  # warnings about the flags
        print(note, file=sys.stderr)
    folder = os.path.dirname(os.path.abspath(opts["out"]))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot make the output folder {folder}: {exc.strerror or exc}") from None

    from .. import dataset as ds
    from ..io.dials import read_experiments, write_experiments
    experiments = read_experiments(opts["expt"])
    orientations = ds.read_orientations(opts["orientations"]) if opts["orientations"] else None
    spectra = ds.read_spectra(opts["spectra"]) if opts["spectra"] else None
    shots = ds.plan(experiments, images=opts["images"], experiment=opts["experiment"], stills=opts["stills"],
                    orientation_seed=opts["orientation_seed"], orientations=orientations, spectra=spectra)
    # the flags' physics and sampling against each experiment, before any file is written
    from ..build.experiment import check_experiment_flags
    for k in dict.fromkeys(s.experiment for s in shots):
        check_experiment_flags(experiments[k], cfg)
    data = ds.Dataset(os.path.abspath(opts["expt"]), opts["flags"], shots, os.path.abspath(opts["out"]),
                      opts["format"], seed=1 if cfg.output.seed is None else cfg.output.seed,
                      noise=cfg.output.calculate_noise, response=opts["response"],
                      extras={"background": opts["background"]})
    _check_targets(data, folder)
    renderer = ds.Renderer(experiments, cfg, background=opts["background"])

    if data.format == "cbf":  # refuse geometry a miniCBF header cannot hold before rendering anything
        from ..io.cbf import pilatus_header
        for shot in shots[:1]:
            pilatus_header(renderer.truth(shot), shot.image if shot.image is not None else 1)
    todo = ds.pending(data, opts["resume"], experiments)
    if len(todo) < len(shots):
        print(f"resuming: {len(shots) - len(todo)} of {len(shots)} images already written", file=out)
    remote = opts["ray"] not in (None, "local")  # a cluster's CPUs are not this machine's
    cpus = os.cpu_count() or 1
    workers = min(opts["workers"], max(len(todo), 1), opts["workers"] if remote else cpus)
    if workers < opts["workers"]:
        print(f"note: --workers {opts['workers']} capped at {workers} ({len(todo)} images to render"
              + ("" if remote else f", {cpus} CPUs") + ")", file=sys.stderr)
    bar = _progress(len(todo), opts["quiet"])
    done = 0

    def advance(paths):
        nonlocal done
        for path in paths:
            done += 1
            if bar is not None:
                bar.update(1)
            elif not opts["quiet"]:
                print(f"image {done}/{len(todo)}: {path}", file=out, flush=True)

    before = _stamps(data, todo)
    try:
        if data.format == "nxs":
            os.makedirs(data.prefix + "_work", exist_ok=True)
        if opts["ray"] is not None:
            _run_ray(data, todo, opts["ray"], workers, advance)
        elif workers > 1:
            _run_local(data, todo, workers, advance)
        else:
            for shot in todo:
                advance([ds.write_shot(data, renderer, shot)])
        if bar is not None:
            bar.close()
        if data.format == "nxs":
            _assemble_nxs(data, renderer, out)
        write_experiments(data.prefix + ".expt", truth_experiments(data, renderer),
                          history=["torchbragg simulate " + " ".join(argv)])
    except BaseException:
        if bar is not None:
            bar.close()
        if not opts["resume"]:  # all or nothing; --resume keeps the complete images by design
            _remove_written(data, before)
        raise
    print(f"wrote {len(shots)} images with prefix {opts['out']} and the experiment {opts['out']}.expt", file=out)
    return 0


def _outputs(data) -> list[str]:
    """The files a run writes besides the per-image files."""
    return [data.prefix + ".expt"] + ([data.prefix + ".nxs"] if data.format == "nxs" else [])


def _check_targets(data, folder) -> None:
    """Refuse, before anything is rendered, output names the run could not write."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {data.prefix}: folder {folder} is not writable")
    for path in _outputs(data) + [data.path(s) for s in data.shots]:
        if os.path.isdir(path):
            raise InputError(f"cannot write {path}: it is a folder")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise InputError(f"cannot write {path}: permission denied")


def _stamps(data, todo) -> dict:
    """(modification time, size, inode) of every file the run may write, None where absent."""
    stamps = {}
    for path in _outputs(data) + [data.path(s) for s in todo]:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamps[path] = None
    return stamps


def _remove_written(data, before: dict) -> None:
    """Remove every file this run wrote (new or replaced since `before`)."""
    import shutil
    for path, stamp in before.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stamp is None or (st.st_mtime_ns, st.st_size, st.st_ino) != stamp:
            try:
                os.unlink(path)
            except OSError:
                pass
    if data.format == "nxs":
        shutil.rmtree(data.prefix + "_work", ignore_errors=True)


def truth_experiments(data, renderer) -> list:
    """PREFIX.expt: each experiment as rendered (a still's crystal turned),
    as a reader of its files gets it, naming its images. miniCBF and NXmx
    files: in the reader frame (`torchbragg.io.frames`), an NXmx sweep's
    images numbered 1..n as dxtbx numbers them; npy and SMV: in the input
    frame. A sweep's scan holds the images rendered."""
    from ..io import imagesets
    from ..io.frames import written_list
    nxs = os.path.basename(data.prefix) + ".nxs"
    position = {id(s): k for k, s in enumerate(data.shots)}
    groups: dict = {}
    for s in data.shots:  # a sweep's images together; every still on its own
        groups.setdefault(s.experiment if s.image is not None else ("still", s.number), []).append(s)
    one_sweep = len({s.experiment for s in data.shots}) == 1
    items = []
    for group in groups.values():
        first = group[0]
        indices = [position[id(s)] for s in group]
        if data.format == "nxs":
            block = (imagesets.sequence(nxs, indices) if first.image is not None
                     else imagesets.image_set([nxs], indices))
        elif first.image is not None and one_sweep:  # files numbered as the scan numbers its images
            name = os.path.basename(data.path(first))
            digits = f"{first.number:05d}"
            cut = name.rindex(digits)
            block = imagesets.sequence(name[:cut] + "#" * len(digits) + name[cut + len(digits):])
        else:
            block = imagesets.image_set([os.path.basename(data.path(s)) for s in group])
        images = (first.image, group[-1].image) if first.image is not None else None
        items.append((renderer.truth(first), images, block))
    return written_list(items, renumber=data.format == "nxs", rotate=data.format in ("cbf", "nxs"))


def _chunks(todo, n):
    """Contiguous runs of shots, a few per worker, so each rebuilds its simulator rarely."""
    size = max(1, -(-len(todo) // (n * 2)))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _run_local(data, todo, workers, advance) -> None:
    import multiprocessing as mp

    from ..dataset import render_shots
    threads = max(1, (os.cpu_count() or 1) // workers)
    with mp.get_context("spawn").Pool(workers) as pool:
        for paths in pool.starmap(render_shots, [(data, c, threads) for c in _chunks(todo, workers)]):
            advance(paths)


def _run_ray(data, todo, address, workers, advance) -> None:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'torchbragg[ray]'") from None
    from ..dataset import render_shots
    try:
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray cluster" if address == "local" else f"the Ray cluster at {address}"
        raise InputError(f"cannot start or reach {where}: {str(exc).strip().splitlines()[0][:200]}") from None
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus)(render_shots)
        if gpus:
            data.device = "cuda"
        pending = [task.remote(data, c, 1) for c in _chunks(todo, workers)]
        while pending:
            ready, pending = ray.wait(pending)
            for ref in ready:
                advance(ray.get(ref))
    finally:
        ray.shutdown()


def _assemble_nxs(data, renderer, out) -> None:
    """The NXmx file from the per-image counts, then the work folder goes."""
    import shutil

    import numpy as np

    from ..io.nexus import NXmxWriter
    first = data.shots[0]
    with NXmxWriter(data.prefix + ".nxs", renderer.truth(first), len(data.shots),
                    start_image=first.image or 1) as writer:
        for k, shot in enumerate(data.shots):
            writer.write(k, np.load(data.path(shot)))
    shutil.rmtree(data.prefix + "_work", ignore_errors=True)
    print(f"writing {data.prefix}.nxs (NXmx)", file=out)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from .nanobragg import guarded
    return guarded("torchbragg simulate", lambda: run(argv))
