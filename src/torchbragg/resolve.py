"""Resolution: a configuration becomes the numbers a run will use, once.

The original derives pixel counts, the beam centre, the pivot, sensor layers,
mosaic domains, sources, rotation steps and oversampling from its flags by
rules of precedence and defaults. Those rules live here, in plain floats (no
torch), so that `validate` checks the resolved numbers before any work starts
and the builders (`build.nanobragg`, `build.experiment`) consume them.

`resolve` takes nanoBragg flags (a SimulationConfig, plus SMV headers of -img
or -mask); `resolve_experiment` takes an experiment's geometry, reduced to
plain numbers by the experiment builder, plus the flags for what an
experiment file does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import CONVENTION_VECTORS, CUSTOM_START, FORCED_PIVOT, SimulationConfig, auto_steps, sweep_is_off
from .errors import InputError
from .units import unit_vector

# Bytes held per rendered pixel: the float image, its copies for the
# statistics, and the int, noise and PGM images.
BYTES_PER_PIXEL = 4 * 6
# A divergence grid is trimmed point by point; beyond this it is no sampling any run could finish.
MAX_DIVERGENCE_POINTS = 10**6


@dataclass
class RenderOptions:
    """How the sums are sampled, and the original's per-pixel rules.

    oversample: sub-pixels per pixel edge (None: chosen from the crystal size).
    phisteps: rotation steps per image. sensor_layers: depth samples of the
    sensor (0: a thin detector that absorbs everything); the layers are
    thickness / layer_divisor apart. With oversample_thick/polar/omega off,
    capture fraction, polarization and solid angle are evaluated once per
    pixel as the original does. absorbed_layers: the sensor is cut into
    sensor_layers equal slabs, each sampled at its mid-depth and weighted by
    the photons it absorbs along each ray (the parallax a real sensor shows)
    instead of the original's rule; parallax "dials" instead shifts spots by
    DIALS's depth (the mean absorption depth times the absorbed fraction,
    which DIALS's parallax correction uses) with one more layer at the surface.
    phi_midpoints: rotation steps sampled at their middles (DIALS's frame
    convention) instead of their starts (the original's). roi: (fast min,
    fast max, slow min, slow max) inclusive, on every panel. dmin: skip points
    whose resolution is finer."""
    oversample: int | None = None
    phisteps: int = 1
    sensor_layers: int = 0
    layer_divisor: int = 1
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    absorbed_layers: bool = False
    parallax: str = "physical"
    phi_midpoints: bool = False
    point_pixel: bool = False
    curved: bool = False
    polarization: bool = True
    dmin: float = 0.0
    roi: tuple[int, int, int, int] | None = None
    chunk_elements: int | None = None


@dataclass(frozen=True)
class Placement:
    """The original's single detector: size, beam centre and pivot as its
    conventions resolve them. Lengths in mm; `distance` is the sample to
    beam-spot distance along the beam in metres."""
    fpixels: int
    spixels: int
    pixel_size: float
    detsize: tuple[float, float]
    convention: str
    pivot: str
    beam_center: tuple[float, float]  # Xbeam, Ybeam in the convention's terms
    near_point: tuple[float, float]  # Xclose, Yclose
    beam_spot: tuple[float, float]  # (fast, slow) of the beam spot from the first pixel's corner
    close_spot: tuple[float, float]  # (fast, slow) of the near point
    vectors: dict  # beam, f, s, o, tt, pol, spindle
    distance: float


@dataclass(frozen=True)
class Sampling:
    """How many points a run sums per image: the product is its work."""
    pixels: int
    oversample: float  # sub-pixels per pixel edge (float: an absurd automatic value stays reportable)
    oversample_auto: bool
    layers: int
    layer_divisor: int
    sources: int
    phisteps: int
    domains: int

    def counts(self) -> dict:
        return dict(pixels=self.pixels, subpixels=self.oversample ** 2, layers=max(self.layers, 1),
                    sources=self.sources, phisteps=self.phisteps, domains=self.domains)

    @property
    def work(self) -> float:
        return math.prod(float(v) for v in self.counts().values())


@dataclass(frozen=True)
class BeamSampling:
    """The beam's wavelengths and divergence grid as the original samples them."""
    dispersion: tuple[int, float]  # (wavelength steps, full width as a fraction)
    divergence: dict  # per axis 'h', 'v': n, range, step (radians), step_given
    divergence_points: tuple[tuple[int, int], ...]  # grid points kept inside the ellipse


@dataclass(frozen=True)
class Resolved:
    panels: tuple[tuple[int, int], ...]  # (fast, slow) pixels of every panel
    placement: Placement | None  # the nanoBragg detector; None for an experiment's own
    n_cells: tuple[float, float, float]
    mosaic_spread: float  # degrees
    mosaic_domains: int
    beam: BeamSampling
    phi: tuple[int, float, float]  # (steps, width covered, osc reported) in degrees
    sampling: Sampling
    parallax: str = "original"  # the sensor depth rule (parallax_rule)

    @property
    def memory(self) -> int:
        return sum(f * s for f, s in self.panels) * BYTES_PER_PIXEL


@dataclass(frozen=True)
class ExperimentGeometry:
    """What resolution needs of an experiment, as plain numbers."""
    panels: tuple[tuple[int, int], ...]
    wavelength: float  # Angstrom
    cell_lengths: tuple[float, float, float]  # Angstrom
    nearest: tuple[float, float]  # (distance m, pixel m) of the panel needing the finest sampling
    absorbing: bool  # every panel has a thickness and an attenuation
    optical_depth: float | None = None  # the largest mu * thickness of the panels


# ----------------------------------------------------------------------------- shared rules

def absorbed_slabs(optical_depth: float | None) -> int:
    """Slabs of an absorbing sensor: each at most half an attenuation length
    thick (optical depth mu * thickness), 2 to 16; 10 when mu is unknown."""
    if optical_depth is None or not optical_depth > 0:
        return 10
    return int(min(max(math.ceil(2.0 * optical_depth), 2), 16))


def parallax_rule(cfg: SimulationConfig, default: str) -> str:
    """The sensor depth rule: physical (slabs weighted by what they absorb),
    dials (DIALS's correction depth) or original (the original's layers);
    `default` when no flag names one."""
    d = cfg.detector
    rule = d.parallax or ("physical" if d.absorbed_layers else "original" if d.oversample_thick else default)
    if rule != "original" and d.oversample_thick:
        raise InputError(f"-parallax {rule} (or -absorbed_layers) and -oversample_thick both weight the sensor "
                         "layers; give one of them")
    return rule


def sensor_sampling(thicksteps: int | None, has_thickness: bool, absorbed: bool = False,
                    optical_depth: float | None = None, surface: bool = False) -> tuple[int, int]:
    """(layers, divisor): the layers are thickness / divisor apart. Absorbed
    slabs: `thicksteps` slabs of thickness / n (default `absorbed_slabs`),
    after one surface layer with `surface` (DIALS's rule). The original's
    rule: with a count the layers span the thickness end to end (thickness /
    (n - 1) apart), without one two layers half the thickness apart."""
    if not has_thickness:
        return 0, 1
    if absorbed:
        n = thicksteps if thicksteps and thicksteps > 0 else absorbed_slabs(optical_depth)
        return n + int(surface), n
    n = -1 if thicksteps is None else thicksteps
    return (2, 2) if n <= 0 else (max(n, 2), max(n, 2) - 1)


def automatic_oversample(extent: float, wavelength: float, distance: float, pixel: float) -> float:
    """The original's automatic oversampling: three sub-pixels per reciprocal
    pixel (wavelength * distance / pixel) across the largest crystal extent.
    Extent, distance and pixel in metres, wavelength in Angstrom; the
    arithmetic is the original's so that the integer comes out the same. A
    float, so an absurd value can be reported instead of overflowing."""
    recip_px = wavelength / 1e10 * distance / pixel
    if not recip_px > 0:
        return 1  # a detector facing away (pivoting about the sample): nothing to resolve
    return max(math.ceil(3.0 * extent / recip_px), 1)


def crystal_extent(lengths, n_cells) -> float:
    """The largest crystal dimension (m) from cell lengths (A) and cell counts."""
    return max(length * 1e-10 * n for length, n in zip(lengths, n_cells))


def clipped_sizes(cfg: SimulationConfig) -> tuple[list, list[int]]:
    """Sample sizes (mm) after the beam clips the height and width, and the
    axes it clipped."""
    c, b = cfg.crystal, cfg.beam
    sizes, clipped = list(c.sample_size), []
    beamsize_m = b.beamsize * 1e-3
    for i in (1, 2):
        if sizes[i] is not None and beamsize_m >= 0 and beamsize_m < sizes[i] * 1e-3:
            sizes[i] = b.beamsize
            clipped.append(i)
    return sizes, clipped


def crystal_cells(cfg: SimulationConfig, lengths) -> tuple[float, float, float]:
    """Unit cells along a, b, c: -N, or the crystal size over the cell length."""
    sizes, _ = clipped_sizes(cfg)
    n_cells = list(cfg.crystal.N)
    for i in range(3):
        if sizes[i] is not None and sizes[i] > 0:
            n_cells[i] = float(math.ceil(sizes[i] * 1e7 / lengths[i]))
    return tuple(max(x, 1.0) for x in n_cells)


def mosaic(cfg: SimulationConfig) -> tuple[float, int]:
    """(spread in degrees, domains): ten domains by default when there is a
    spread, one (and no spread) when either is missing or zero."""
    c = cfg.crystal
    spread = c.mosaic_spread
    domains = c.mosaic_domains if c.mosaic_domains is not None else -1
    if domains <= 0:
        return (spread or 0.0), (1 if spread is None or spread == 0.0 else 10)
    if spread is None or spread == 0.0:
        return 0.0, 1
    return spread, domains


def dispersion(cfg: SimulationConfig) -> tuple[int, float]:
    b = cfg.beam
    n, disp, _ = auto_steps(b.dispsteps, b.dispersion / 100.0, None, 1.0, endpoints=True)
    if sweep_is_off(n, disp, 1.0 if n > 0 else 0.0) or disp <= 0.0:
        return 1, 0.0
    return n, disp


def beam_sampling(cfg: SimulationConfig) -> BeamSampling:
    div, kept = divergence(cfg)
    return BeamSampling(dispersion(cfg), div, kept)


def divergence(cfg: SimulationConfig) -> tuple[dict, tuple]:
    """Per-axis (n, range, step) in radians and the grid points the original
    keeps after trimming the grid to an ellipse."""
    b = cfg.beam
    div = {}
    for axis in ("h", "v"):
        span, st = getattr(b, f"{axis}divrange"), getattr(b, f"{axis}divstep")
        n, r, s = auto_steps(getattr(b, f"{axis}divsteps"), None if span is None else span / 1000.0,
                             None if st is None else st / 1000.0, 1.0, endpoints=True)
        if sweep_is_off(n, r, s):
            n, r, s = 1, 0.0, 0.0
        div[axis] = dict(n=n, range=r, step=s, step_given=st is not None and st > 0)
    h, v = div["h"], div["v"]
    if h["n"] * v["n"] > MAX_DIVERGENCE_POINTS:
        raise InputError(f"a divergence grid of {h['n']} x {v['n']} points is beyond any sensible sampling "
                         f"(limit {MAX_DIVERGENCE_POINTS:.0e} points); give fewer -hdivsteps/-vdivsteps or "
                         "larger -hdivstep/-vdivstep")
    kept = []
    for ih in range(h["n"]):
        for iv in range(v["n"]):
            if b.round_div and _outside_ellipse(h, v, ih, iv):
                continue
            kept.append((ih, iv))
    return div, tuple(kept)


def _outside_ellipse(h, v, ih, iv) -> bool:
    # the original's test, including its division by a zero range (nan or inf)
    hd = h["step"] * ih - h["range"] / 2.0
    vd = v["step"] * iv - v["range"] / 2.0
    test = _ratio(hd * hd - h["step"] ** 2 / 4.0 * (1 - h["n"] % 2), h["range"] ** 2)
    test += _ratio(vd * vd - v["step"] ** 2 / 4.0 * (1 - v["n"] % 2), v["range"] ** 2)
    return test * 4.0 > 1.1


def _ratio(a: float, b: float) -> float:
    if b != 0.0:
        return a / b
    return math.nan if a == 0.0 else math.copysign(math.inf, a)


def phi_sampling(cfg: SimulationConfig) -> tuple[int, float, float]:
    """(steps, width, osc) of the one image: the width covers all steps; osc
    is the range the original reports."""
    c = cfg.crystal
    n, osc, step = auto_steps(None if c.phisteps is None else max(c.phisteps, 1), c.osc, c.phistep, 1.0,
                              endpoints=False)
    given = c.phistep is not None and c.phistep > 0
    return n, (step * n if given else osc), osc


def source_count(cfg: SimulationConfig, points: int, wavelengths: int) -> int:
    if cfg.beam.source_file is not None:
        from .io.sources import read_sources
        return max(len(read_sources(cfg.beam.source_file)), 1)
    return max(points, 1) * wavelengths


def rendered_pixels(cfg: SimulationConfig, panels) -> int:
    """Pixels the -roi leaves on every panel."""
    roi = cfg.detector.roi
    total = 0
    for fpix, spix in panels:
        if roi is None:
            total += fpix * spix
            continue
        xmin, xmax, ymin, ymax = roi
        f = (min(xmax, fpix - 1) if xmax >= 0 else fpix - 1) - max(xmin, 0) + 1
        s = (min(ymax, spix - 1) if ymax >= 0 else spix - 1) - max(ymin, 0) + 1
        total += max(f, 1) * max(s, 1)
    return total


def _resolved(cfg, panels, placement, lengths, wavelength, nearest, has_sensor, phi, default_parallax="original",
              optical_depth=None) -> Resolved:
    """What both paths share: cells, mosaic, spectrum, divergence and the
    sampling. `nearest`: (distance, pixel) in metres of the panel needing the
    finest sampling; `phi`: (steps, width, osc)."""
    d = cfg.detector
    spread, domains = mosaic(cfg)
    beam = beam_sampling(cfg)
    n_cells = crystal_cells(cfg, lengths)
    rule = parallax_rule(cfg, default_parallax)
    layers, divisor = sensor_sampling(d.thicksteps, has_sensor, rule != "original", optical_depth, rule == "dials")
    given = bool(d.oversample and d.oversample > 0)
    oversample = d.oversample if given else automatic_oversample(crystal_extent(lengths, n_cells), wavelength,
                                                                 *nearest)
    sampling = Sampling(pixels=rendered_pixels(cfg, panels), oversample=oversample, oversample_auto=not given,
                        layers=layers, layer_divisor=divisor, sources=source_count(cfg, len(beam.divergence_points), beam.dispersion[0]),
                        phisteps=max(phi[0], 1), domains=domains)
    return Resolved(panels=tuple(panels), placement=placement, n_cells=n_cells, mosaic_spread=spread,
                    mosaic_domains=domains, beam=beam, phi=phi,
                    sampling=sampling, parallax=rule)


# ----------------------------------------------------------------------------- nanoBragg flags

def resolve(cfg: SimulationConfig, headers=()) -> Resolved:
    """The numbers of a nanoBragg run. `headers`: (path, SMV header) of -mask
    and -img when their values are not yet applied to `cfg`. The cell lengths
    come from -cell or -mat in plain floats; the builder takes the integer
    decisions that depend on them (cells from a crystal size, automatic
    oversampling) again from its float64 models, with the same functions."""
    placement = place_detector(cfg, headers)
    d = cfg.detector
    # the sensor's optical depth; without -detector_abs the attenuation depth is the thickness
    depth = 1.0 if d.attenuation_depth is None else (d.thickness / d.attenuation_depth if d.attenuation_depth else 0.0)
    return _resolved(cfg, [(placement.fpixels, placement.spixels)], placement, _cell_lengths(cfg),
                     cfg.beam.wavelength, (placement.distance, d.pixel_size / 1000.0),
                     d.thickness > 0, phi_sampling(cfg), optical_depth=depth)


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


def detector_size(cfg: SimulationConfig, headers=()) -> tuple[int, int, float, float]:
    """(fast pixels, slow pixels, fast size mm, slow size mm): a pixel count
    (flag or header) sets the size, else the size sets the count."""
    d = cfg.detector
    px = d.pixel_size
    hf = max((int(float(h["SIZE1"])) for _, h in headers), default=None)
    hs = max((int(float(h["SIZE2"])) for _, h in headers), default=None)
    fgiven, sgiven = d.fpixels or hf, d.spixels or hs
    detsize_f = px * fgiven if fgiven else d.detsize_f
    detsize_s = px * sgiven if sgiven else d.detsize_s
    fpix, spix = math.ceil(detsize_f / px - 0.5), math.ceil(detsize_s / px - 0.5)
    if not (fpix < 1e15 and spix < 1e15):
        raise InputError(f"-detsize {d.detsize_f:g} x {d.detsize_s:g} mm with -pixel {px:g} mm is an absurd "
                         "number of pixels")
    if fpix <= 0 or spix <= 0:
        raise InputError(f"detector has {fpix}x{spix} pixels; both must be positive")
    return int(fpix), int(spix), detsize_f, detsize_s


def convention_vectors(cfg: SimulationConfig) -> dict:
    """The frame vectors of a run: the convention's, or the user's for CUSTOM."""
    d, b = cfg.detector, cfg.beam
    if d.convention != "CUSTOM":
        return dict(CONVENTION_VECTORS[d.convention])
    chosen = dict(CUSTOM_START)
    for key, vec in (("f", d.fdet_vector), ("s", d.sdet_vector), ("o", d.odet_vector), ("tt", d.twotheta_axis),
                     ("beam", b.beam_vector), ("pol", b.polar_vector), ("spindle", cfg.crystal.spindle_axis)):
        if vec is not None:
            chosen[key] = vec
    return chosen


def place_detector(cfg: SimulationConfig, headers=()) -> Placement:
    """Detector size, beam centre and pivot by the original's conventions,
    and the sample-to-beam-spot distance; refuses a detector the beam cannot
    reach from the front."""
    d = cfg.detector
    px = d.pixel_size
    fpix, spix, detsize_f, detsize_s = detector_size(cfg, headers)
    conv = d.convention
    # near point and beam centre as the original defaults them (mm)
    fclose = (d.ORGX - 0.5) * px if d.ORGX is not None else detsize_f / 2.0
    sclose = (d.ORGY - 0.5) * px if d.ORGY is not None else detsize_s / 2.0
    xclose = d.Xclose if d.Xclose is not None else fclose
    yclose = d.Yclose if d.Yclose is not None else sclose
    xb, yb = d.Xbeam, d.Ybeam
    if conv == "ADXV":
        xb = (detsize_f + px) / 2.0 if xb is None else xb
        yb = (detsize_s - px) / 2.0 if yb is None else yb
    elif conv in ("MOSFLM", "DENZO"):
        xb = (detsize_s + px) / 2.0 if xb is None else xb
        yb = (detsize_f + px) / 2.0 if yb is None else yb
    else:
        xb = xclose if xb is None else xb
        yb = yclose if yb is None else yb
    # the convention's (Xbeam, Ybeam) -> (fast, slow) distances of the beam spot from the origin
    if conv == "ADXV":
        fbeam, sbeam = xb, detsize_s - yb
    elif conv == "MOSFLM":
        fbeam, sbeam = yb + 0.5 * px, xb + 0.5 * px
    elif conv == "DENZO":
        fbeam, sbeam = yb, xb
    else:
        fbeam, sbeam = xb, yb
    if conv == "CUSTOM":
        fclose, sclose = xb, yb
    vectors = convention_vectors(cfg)
    # a convention's own rule on the pivot is applied after all flags, as in the original
    pivot = FORCED_PIVOT.get(conv, d.pivot)
    return Placement(fpixels=fpix, spixels=spix, pixel_size=px, detsize=(detsize_f, detsize_s), convention=conv,
                     pivot=pivot, beam_center=(xb, yb), near_point=(xclose, yclose), beam_spot=(fbeam, sbeam),
                     close_spot=(fclose, sclose), vectors=vectors,
                     distance=_beam_spot_distance(cfg, vectors, pivot))


def _beam_spot_distance(cfg, vectors, pivot) -> float:
    """Sample to beam spot along the beam (m), the way the detector mount
    derives it; refuses a detector plane containing the beam or behind the sample."""
    d = cfg.detector
    o = vectors["o"] if any(vectors["o"]) else _cross(unit_vector(vectors["f"]), unit_vector(vectors["s"]))
    beam, o0, tt = unit_vector(vectors["beam"]), unit_vector(o), unit_vector(vectors["tt"])
    rot = _rotation_xyz(*(math.radians(x) for x in d.rotation))
    full = _matmul(_rotation_axis_angle(tt, math.radians(d.twotheta)), rot)
    ratio = _dot(beam, _matvec(rot, o0))
    cos_full = _dot(beam, _matvec(full, o0))
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
    return close / ratio


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


# ----------------------------------------------------------------------------- experiments

def resolve_experiment(cfg: SimulationConfig, geometry: ExperimentGeometry) -> Resolved:
    """The numbers of a run of an experiment: its detector and crystal, the
    flags' sampling (rotation steps per image, domains, sources, layers)."""
    return _resolved(cfg, list(geometry.panels), None, geometry.cell_lengths, geometry.wavelength,
                     geometry.nearest, geometry.absorbing, (max(cfg.crystal.phisteps or 1, 1), 0.0, 0.0),
                     default_parallax="physical", optical_depth=geometry.optical_depth)
