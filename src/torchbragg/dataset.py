"""Whole datasets in one run: every image of a rotation sweep, or a series of
still shots, rendered by simulators built once and reused, with Poisson noise
from a per-image seed, written one file per image (atomically; or one NXmx
file), resumable, and spread over local processes or a Ray cluster with the
same files whatever the number of workers.

Numbers and seeds: the images of one sweep are numbered as its scan numbers
them; stills and several experiments are numbered 1, 2, ... in the order
rendered. Image number k draws its noise with the original's generator
seeded with `seed + k - 1` (`-seed`, default 1), so a dataset image equals a
`nanoBragg ... -seed S` run with that seed; panel p > 0 of a multi-panel
detector adds 1000003 * p. Files are named PREFIX_kkkkk.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

FORMATS = ("npy", "smv", "cbf", "nxs")
PANEL_SEED_STRIDE = 1000003
HC_EV_A = 12398.42  # h c in eV Angstrom, as the -energy flag uses


@dataclass
class Shot:
    """One image of the dataset."""
    number: int  # 1-based position in the dataset; names the file
    experiment: int  # index in the experiment list
    image: int | None = None  # scan image; None for a still
    orientation: np.ndarray | None = None  # rotation applied to the crystal (stills series)
    spectrum: tuple | None = None  # (wavelengths in Angstrom, weights)


@dataclass
class Dataset:
    """Everything a worker needs to render and write its shots (picklable)."""
    expt_path: str
    flags: list[str]
    shots: list[Shot]
    prefix: str
    format: str = "npy"
    seed: int = 1
    noise: bool = True
    dtype: str | None = None
    device: str | None = None
    extras: dict = field(default_factory=dict)

    def path(self, shot: Shot) -> str:
        ext = {"npy": "npy", "smv": "img", "cbf": "cbf", "nxs": "npy"}[self.format]
        folder = self.prefix + "_work" if self.format == "nxs" else None
        name = f"{os.path.basename(self.prefix)}_{shot.number:05d}.{ext}"
        return os.path.join(folder, name) if folder else f"{self.prefix}_{shot.number:05d}.{ext}"


# ----------------------------------------------------------------------------- planning

def random_rotations(n: int, seed: int) -> np.ndarray:
    """(n, 3, 3) rotations drawn uniformly (unit quaternions) from a seeded generator."""
    q = np.random.default_rng(seed).normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _numbers(path: str, line_no: int, text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split()]
    except ValueError:
        raise InputError(f"{path}:{line_no}: expected numbers, got '{text.strip()}'") from None
    if not all(math.isfinite(v) for v in vals):
        raise InputError(f"{path}:{line_no}: values must be finite")
    return vals


def _lines(path: str):
    try:
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                text = line.split("#", 1)[0].strip()
                if text:
                    yield i, text
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def read_orientations(path: str) -> list[np.ndarray]:
    """One shot a line: nine numbers (a rotation matrix, row by row) or three
    (rotations about x, y, z in degrees, applied in that order)."""
    out = []
    for i, text in _lines(path):
        v = _numbers(path, i, text)
        if len(v) == 9:
            m = np.array(v).reshape(3, 3)
            if not np.allclose(m @ m.T, np.eye(3), atol=1e-6) or np.linalg.det(m) < 0:
                raise InputError(f"{path}:{i}: the matrix is not a rotation")
        elif len(v) == 3:
            rx, ry, rz = (math.radians(a) for a in v)
            cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
            m = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
                 @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
        else:
            raise InputError(f"{path}:{i}: give 9 numbers (a rotation matrix) or 3 angles (degrees)")
        out.append(m)
    if not out:
        raise InputError(f"{path} holds no orientations")
    return out


def read_spectra(path: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Lines `shot energy_eV weight` (shot numbers from 1): each shot's spectrum."""
    rows: dict[int, list] = {}
    for i, text in _lines(path):
        v = _numbers(path, i, text)
        if len(v) != 3 or v[0] < 1 or v[0] != int(v[0]) or v[1] <= 0 or v[2] < 0:
            raise InputError(f"{path}:{i}: expected 'shot energy_eV weight' with shot >= 1, energy > 0, "
                             "weight >= 0")
        rows.setdefault(int(v[0]), []).append((HC_EV_A / v[1], v[2]))
    out = {}
    for shot, r in rows.items():
        lam, w = np.array(r).T
        if not w.sum() > 0:
            raise InputError(f"{path}: the weights of shot {shot} add up to zero")
        out[shot] = (lam, w)
    return out


def plan(experiments, images: str | None = None, experiment: int | None = None, stills: int | None = None,
         orientation_seed: int | None = None, orientations: list | None = None,
         spectra: dict | None = None) -> list[Shot]:
    """The shots of a dataset: the images of one experiment's scan (or all
    experiments of the file, one after the other), or a series of stills of
    one experiment in orientations drawn from a seed or listed."""
    chosen = range(len(experiments)) if experiment is None else [experiment]
    for k in chosen:
        if not 0 <= k < len(experiments):
            raise InputError(f"--experiment {k}: the file holds experiments 0..{len(experiments) - 1}")
    shots: list[Shot] = []
    if stills is not None or orientations is not None:
        k = chosen[0]
        if experiment is None and len(experiments) > 1:
            raise InputError("a still series turns one crystal: choose it with --experiment K")
        rots = orientations if orientations is not None else list(random_rotations(stills, orientation_seed or 0))
        if stills is not None and orientations is not None and stills != len(orientations):
            raise InputError(f"--stills {stills} but the orientation file lists {len(orientations)} shots")
        shots = [Shot(n + 1, k, None, np.asarray(r)) for n, r in enumerate(rots)]
    else:
        for k in chosen:
            scan = experiments[k].scan
            numbers = [None] if scan is None else list(range(scan.image_range[0], scan.image_range[1] + 1))
            if images is not None:
                if len(chosen) > 1:
                    raise InputError("--images selects images of one experiment: add --experiment K")
                numbers = _image_range(images, scan)
            base = len(shots)
            # one sweep: files and seeds follow the scan's image numbers; several: the dataset order
            shots += [Shot(i if len(chosen) == 1 and i is not None else base + n + 1, k, i)
                      for n, i in enumerate(numbers)]
    if spectra:
        unknown = sorted(set(spectra) - {s.number for s in shots})
        if unknown:
            raise InputError(f"the spectra file names shot {unknown[0]}, the dataset has {len(shots)}")
        for s in shots:
            s.spectrum = spectra.get(s.number)
    return shots


def _image_range(text: str, scan) -> list:
    first, last = (scan.image_range if scan is not None else (1, 1))
    try:
        a, _, b = text.partition(":")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise InputError(f"--images expects FIRST:LAST (image numbers), got '{text}'") from None
    if not (first <= lo <= hi <= last):
        raise InputError(f"--images {text} is outside the scan's images {first}:{last}")
    return list(range(lo, hi + 1)) if scan is not None else [None]


# ----------------------------------------------------------------------------- rendering

class Renderer:
    """Simulators built once per experiment and reused for every shot, never
    changed: a still's orientation is substituted for the crystal's (through
    functional_call), a spectrum's beam is passed to the render."""

    def __init__(self, experiments, cfg, dtype=None, device=None):
        self.experiments, self.cfg, self.dtype, self.device = experiments, cfg, dtype, device
        self._sims: dict = {}

    def simulator(self, k: int):
        if k not in self._sims:
            from .build.experiment import build_from_experiment
            self._sims[k] = build_from_experiment(self.experiments[k], self.cfg, self.dtype, self.device)[0]
        return self._sims[k]

    def render(self, shot: Shot) -> np.ndarray:
        import torch
        from torch.func import functional_call
        sim = self.simulator(shot.experiment)
        subs = {}
        if shot.orientation is not None:
            U0 = sim.crystal.U
            subs["crystal.U"] = torch.as_tensor(shot.orientation, dtype=torch.float64).to(U0) @ U0
        beam = None if shot.spectrum is None else spectrum_beam(sim.beam, *shot.spectrum)
        with torch.no_grad():  # a still: no rotation, whatever the experiment's goniometer
            image = functional_call(sim, subs, (shot.image,), dict(still=shot.image is None, beam=beam))
        return image.to("cpu", torch.float32).numpy()

    def truth(self, shot: Shot):
        """The experiment of a shot as rendered (crystal turned for stills)."""
        import torch

        from .io.dials import Experiment
        from .models import Crystal
        e = self.experiments[shot.experiment]
        if shot.image is None and e.scan is not None:
            e = Experiment(beam=e.beam, detector=e.detector, crystal=e.crystal, identifier=e.identifier,
                           extras=e.extras)
        if shot.orientation is None or e.crystal is None:
            return e
        c = e.crystal
        with torch.no_grad():
            U = torch.as_tensor(shot.orientation, dtype=torch.float64) @ c.U.double().cpu()
        crystal = Crystal(c.cell.detach().double().cpu(), U, misset=c.misset.detach().double().cpu(),
                          space_group=c.space_group, setting=c.setting, dtype=torch.float64)
        return Experiment(beam=e.beam, detector=e.detector, crystal=crystal, identifier=e.identifier,
                          extras=e.extras)


def spectrum_beam(beam, wavelengths, weights):
    """The beam with its sources replaced by a spectrum along its direction."""
    import torch

    from .models import Beam
    n = len(wavelengths)
    with torch.no_grad():
        return Beam(beam.direction.detach(), float(np.average(wavelengths, weights=weights)),
                    polarization_fraction=beam.polarization_fraction.detach(),
                    polarization_normal=beam.polarization_normal, fluence=beam.fluence.detach(),
                    source_positions=np.full((n, 3), np.nan), source_wavelengths=np.asarray(wavelengths),
                    source_weights=np.asarray(weights), water_size=beam.water_size.detach(),
                    dtype=beam.dtype, device=beam.device)


def image_seed(seed: int, number: int, panel: int = 0) -> int:
    return seed + number - 1 + PANEL_SEED_STRIDE * panel


def photon_counts(image: np.ndarray, seed: int, number: int, noise: bool = True) -> np.ndarray:
    """What a counting detector records: Poisson draws of the expected photons
    with the original's generator (per-image seed; 16-bit range), or, without
    noise, the expected photons rounded. (panels, slow, fast) int32."""
    if not noise:
        return np.rint(np.clip(image, 0, 2 ** 31 - 1)).astype(np.int32)
    from .noise import noise_image
    out = np.empty(image.shape, dtype=np.int32)
    for p in range(image.shape[0]):
        out[p] = noise_image(image[p], -image_seed(seed, number, p), adc_offset=0.0)[0]
    return out


# ----------------------------------------------------------------------------- writing

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _smv_file(image: np.ndarray, experiment, shot: Shot, seed: int, noise: bool) -> bytes:
    """The original's noise image (Poisson photons plus the ADC offset of 40) with
    a header from the panel's frame; single flat panels only."""
    from .io.smv import smv_bytes
    from .noise import noise_image
    if image.shape[0] != 1:
        raise InputError("SMV holds one panel; write multi-panel detectors as nxs or npy")
    if noise:
        counts = noise_image(image[0], -image_seed(seed, shot.number), adc_offset=40.0)[0]
    else:
        counts = np.clip(np.rint(image[0] + 40.0), 0, 65535).astype(np.uint16)
    return smv_bytes(counts, smv_geometry(experiment, shot), denzo_sign=1.0)


def smv_geometry(experiment, shot: Shot):
    """SMV header values (metres, radians) of a flat panel from its frame: the
    beam centre is where the beam meets the panel, given as (fast, slow)."""
    import torch

    from .io.smv import SMVGeometry
    e = experiment
    with torch.no_grad():
        b = e.beam.incident().double()
        o, f, s, n = (t[0].double() for t in e.detector.panel_frames(e.beam.incident()))
        close = float(o @ n)
        t = close / float(b @ n)
        hit = t * b - o
        fbeam, sbeam = float(hit @ f), float(hit @ s)
        px = float(e.detector.panels[0].pixel_size[0])
        nf, ns = e.detector.panels[0].image_size
        phi0 = width = 0.0
        if e.scan is not None and shot.image is not None:
            start, width = (float(x) for x in e.scan.oscillation)
            phi0 = start + (shot.image - e.scan.image_range[0]) * width
        lam = float(e.beam.wavelength)
        origin = o.tolist()
    m = 1e-3
    return SMVGeometry(fpixels=nf, spixels=ns, pixel_size=px * m, distance=t * m, wavelength=lam * 1e-10,
                       Xbeam=fbeam * m, Ybeam=sbeam * m, Fbeam=fbeam * m, Sbeam=sbeam * m, detsize_s=ns * px * m,
                       dials_origin=tuple(origin), ORGX=-float(o @ f) / px + 0.5, ORGY=-float(o @ s) / px + 0.5,
                       close_distance=close * m, phi0=math.radians(phi0), osc=math.radians(width), twotheta=0.0)


def write_shot(dataset: Dataset, renderer: Renderer, shot: Shot) -> str:
    """Render one shot and write its file (atomically); returns the path."""
    from .io.atomic import atomic_write
    image = renderer.render(shot)
    if not np.isfinite(image).all():
        raise InputError(f"image {shot.number} is not finite; check the fluence and structure factors")
    path = dataset.path(shot)
    fmt = dataset.format
    if fmt == "npy":
        data = _npy_bytes(image)
    elif fmt == "nxs":
        data = _npy_bytes(photon_counts(image, dataset.seed, shot.number, dataset.noise))
    elif fmt == "smv":
        data = _smv_file(image, renderer.truth(shot), shot, dataset.seed, dataset.noise)
    else:
        from .io.cbf import write_minicbf
        counts = photon_counts(image, dataset.seed, shot.number, dataset.noise)
        write_minicbf(path, counts, renderer.truth(shot), shot.image if shot.image is not None else 1)
        return path
    atomic_write(path, data)
    return path


def _worker(dataset: Dataset, shots: list[Shot], threads: int | None = None) -> list[str]:
    """Render and write `shots` in this process (local workers and Ray tasks)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    from .io.dials import read_experiments
    from .build.experiment import parse_experiment_flags
    renderer = Renderer(read_experiments(dataset.expt_path), parse_experiment_flags(dataset.flags), dataset.dtype,
                        dataset.device)
    return [write_shot(dataset, renderer, s) for s in shots]


def pending(dataset: Dataset, resume: bool) -> list[Shot]:
    if not resume:
        return list(dataset.shots)
    return [s for s in dataset.shots if not os.path.exists(dataset.path(s))]


def images(expt_path: str, flags: list[str] | None = None, **plan_kw):
    """The dataset as a generator of (shot, float image (panels, slow, fast)),
    for code that consumes images directly."""
    from .io.dials import read_experiments
    from .build.experiment import parse_experiment_flags
    experiments = read_experiments(expt_path)
    renderer = Renderer(experiments, parse_experiment_flags(list(flags or [])))
    for shot in plan(experiments, **plan_kw):
        yield shot, renderer.render(shot)
