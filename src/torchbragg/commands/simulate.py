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
(PREFIX.expt). Beam, detector (panels, sensor thickness and mu), goniometer,
scan and crystal come from the experiment; nanoBragg flags give the rest:
-N, -mosaic, -mosaic_dom, -default_F, -hkl, -fluence or -flux, -phisteps
(rotation steps per image), -oversample, -thicksteps, -absorbed_layers,
-roi, -mask, -dtype, -device, -seed, -nonoise, spot shape, divergence and
dispersion, and so on. -N, -Na, -Nb and -Nc take any number >= 1 here (the
domain size is continuous in the model; nanoBragg reads integers).

what to render (default: every image of every experiment's scan, one image
for a still):
  --images FIRST:LAST       images of the scan (numbered as the scan numbers them)
  --experiment K            only experiment K of the file (0-based)
  --stills N                a series of N stills of the crystal in random
                            orientations drawn from --orientation-seed S (default 0)
  --orientations FILE       a series of stills, one orientation a line: 9 numbers
                            (a rotation matrix, row by row) or 3 angles about x, y, z (deg)
  --spectra FILE            per-shot spectra: lines 'shot energy_eV weight'
output:
  --format npy|smv|cbf|nxs  npy: float32 expected photons, (panels, slow, fast), one
                            file per image; smv: the original's noise image (photons + 40);
                            cbf: Pilatus miniCBF photon counts; nxs: one NXmx file
                            (bitshuffle-LZ4) of photon counts. Counts are Poisson draws
                            with the original's generator, image k seeded with
                            -seed + k - 1 (default -seed 1; k is the scan's image
                            number for one sweep, else 1, 2, ...); -nonoise: expected
                            photons rounded
  --resume                  skip images whose file is already complete
  --workers N               spread images over N local processes
  --ray [ADDRESS]           spread images over a Ray cluster (a local one without
                            ADDRESS); each worker uses a GPU when it has one
  --quiet                   no progress bar or per-image lines
"""

def parse(argv: list[str]) -> dict:
    opts = dict(expt=None, out=None, images=None, experiment=None, format="npy", quiet=False, resume=False,
                stills=None, orientation_seed=None, orientations=None, spectra=None, workers=1, ray=None,
                flags=[])
    valued = ("--out", "--images", "--experiment", "--format", "--stills", "--orientation-seed", "--orientations",
              "--spectra", "--workers")
    # --ray takes an optional cluster address (host:port or 'auto'); none: a local cluster
    optional = {"--ray": (lambda w: ":" in w or w == "auto", "local")}
    positionals = split_options(argv, opts, valued, ("--quiet", "--resume"), "simulate", 1, optional)
    opts["expt"] = positionals[0] if positionals else None
    if opts["expt"] is None:
        raise InputError("no experiment file given")
    if opts["out"] is None:
        raise InputError("--out PREFIX is required")
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
    folder = os.path.dirname(os.path.abspath(opts["out"]))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {opts['out']}: folder {folder} does not exist")

    from .. import dataset as ds
    from ..io.dials import read_experiments, write_experiments
    experiments = read_experiments(opts["expt"])
    orientations = ds.read_orientations(opts["orientations"]) if opts["orientations"] else None
    spectra = ds.read_spectra(opts["spectra"]) if opts["spectra"] else None
    shots = ds.plan(experiments, images=opts["images"], experiment=opts["experiment"], stills=opts["stills"],
                    orientation_seed=opts["orientation_seed"], orientations=orientations, spectra=spectra)
    data = ds.Dataset(os.path.abspath(opts["expt"]), opts["flags"], shots, os.path.abspath(opts["out"]),
                      opts["format"], seed=1 if cfg.output.seed is None else cfg.output.seed,
                      noise=cfg.output.calculate_noise)
    if data.format == "nxs":
        os.makedirs(data.prefix + "_work", exist_ok=True)
    renderer = ds.Renderer(experiments, cfg)
    truth = [renderer.truth(s) for s in shots] if orientations is not None or opts["stills"] else \
        [experiments[k] for k in dict.fromkeys(s.experiment for s in shots)]

    if data.format == "cbf":  # refuse geometry a miniCBF header cannot hold before rendering anything
        from ..io.cbf import pilatus_header
        for shot in shots[:1]:
            pilatus_header(renderer.truth(shot), shot.image if shot.image is not None else 1)
    todo = ds.pending(data, opts["resume"])
    if len(todo) < len(shots):
        print(f"resuming: {len(shots) - len(todo)} of {len(shots)} images already written", file=out)
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

    if opts["ray"] is not None:
        _run_ray(data, todo, opts["ray"], opts["workers"], advance)
    elif opts["workers"] > 1:
        _run_local(data, todo, opts["workers"], advance)
    else:
        for shot in todo:
            advance([ds.write_shot(data, renderer, shot)])
    if bar is not None:
        bar.close()
    if data.format == "nxs":
        _assemble_nxs(data, renderer, out)
    write_experiments(data.prefix + ".expt", truth, history=["torchbragg simulate " + " ".join(argv)])
    print(f"wrote {len(shots)} images with prefix {opts['out']} and the experiment {opts['out']}.expt", file=out)
    return 0


def _chunks(todo, n):
    """Contiguous runs of shots, a few per worker, so each rebuilds its simulator rarely."""
    size = max(1, -(-len(todo) // (n * 2)))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _run_local(data, todo, workers, advance) -> None:
    import multiprocessing as mp

    from ..dataset import _worker
    threads = max(1, (os.cpu_count() or 1) // workers)
    with mp.get_context("spawn").Pool(workers) as pool:
        for paths in pool.starmap(_worker, [(data, c, threads) for c in _chunks(todo, workers)]):
            advance(paths)


def _run_ray(data, todo, address, workers, advance) -> None:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'torchbragg[ray]'") from None
    from ..dataset import _worker
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
        task = ray.remote(num_gpus=gpus)(_worker)
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
