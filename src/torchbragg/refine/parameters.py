"""Parametrisations: each group maps an internal vector x (starting at 0, of
order one per unit step) onto model parameters of a `Simulator` by
substitution, so a fit never mutates the models until `write` is called.

A group's `substitute(sim, x, subs)` adds or updates entries of `subs`, a
dict {parameter or buffer name under the simulator: tensor}, which the
refiner hands to `torch.func.functional_call`. Groups compose: a group that
changes a tensor another group already changed starts from that value.

Internal units (one unit step):

| group | internal vector | one unit |
| --- | --- | --- |
| orientation | rotation vector about lab x, y, z, applied after the current orientation | 0.01 degree |
| cell | free cell constants of the crystal system: lengths as log-ratios, angles as shifts | 0.1 % (lengths), 0.01 degree (angles) |
| N | log of N (one value, or one per axis) | 1 % |
| scale | log of the fluence | 1 % |
| mosaic | log of the mosaic spread | 1 % |
| background | per panel: a constant, optionally slopes along fast and slow (over the half panel) | 1 photon per pixel |
| distance | detector distance (DistanceMount) or shift of the detector along its normal (frames) | 0.01 mm |
| beam_centre | beam centre along fast and slow | 0.01 pixel |
| panels | per panel: frame origin shift (x, y, z of the parent frame), rotation vector added to the frame's | 0.01 mm, 0.01 degree |
| wavelength | relative shift of every wavelength | 0.1 % |

`physical(sim, x)` gives the values a user reads (degrees, Angstrom, mm,
photons/m^2, ...) for reports and for propagating uncertainties.
"""

from __future__ import annotations

import math

import torch

from .. import physics as ph
from ..models import DistanceMount, Frame

DEG = math.pi / 180.0

CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic",
                   "rhombohedral")


def _get(sim, subs, name):
    """The current value of a parameter or buffer: substituted, else the model's."""
    if name in subs:
        return subs[name]
    mod = sim
    *path, leaf = name.split(".")
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, leaf)


class Group:
    """A parametrisation. Subclasses set `name`, `labels` (one per internal
    element) and `units` (one per physical value) and implement `substitute`
    and `physical`. `image_term` (optional) adds photons to the model image."""

    name = "group"
    labels: list[str] = []
    physical_labels: list[str] = []
    units: list[str] = []

    def bind(self, sim) -> "Group":
        """Read what the parametrisation needs from the simulator's start values."""
        return self

    @property
    def size(self) -> int:
        return len(self.labels)

    def substitute(self, sim, x, subs) -> None:
        raise NotImplementedError

    def image_term(self, sim, x, shape):
        return None

    def physical(self, sim, x) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.labels)})"


# ----------------------------------------------------------------------------- crystal

def small_rotation(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (radians), smooth (with all higher
    derivatives) at zero."""
    return torch.linalg.matrix_exp(ph.skew(rotvec))


class Orientation(Group):
    """Small rotations about lab x, y, z (a rotation vector, 0.01 degree per
    unit) applied after the crystal's current orientation (misset after U):
    the substituted U is R_m^T dR R_m U, so the crystal turns by dR in the lab
    whatever its misset. Reported as the rotation vector in degrees."""

    name = "orientation"
    labels = ["orientation.x", "orientation.y", "orientation.z"]
    physical_labels = ["rotation.x", "rotation.y", "rotation.z"]
    units = ["deg", "deg", "deg"]
    step = 0.01  # degree

    def substitute(self, sim, x, subs):
        misset = _get(sim, subs, "crystal.misset").to(x.dtype)
        U = _get(sim, subs, "crystal.U").to(x.dtype)
        rm = ph.rotation_xyz(misset * DEG)
        dr = small_rotation(x * (self.step * DEG))
        subs["crystal.U"] = rm.transpose(-1, -2) @ dr @ rm @ U

    def physical(self, sim, x):
        return x * self.step


def crystal_system(space_group: str) -> str:
    """Crystal system of a Hall symbol ("rhombohedral" for R groups on
    rhombohedral axes, "trigonal" for other trigonal groups)."""
    import gemmi
    try:
        sg = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(space_group))
    except Exception as exc:
        raise ValueError(f"cannot read the space group {space_group!r}: {exc}") from None
    if sg is None:
        raise ValueError(f"space group {space_group!r} is not a standard one; give the crystal system")
    system = sg.crystal_system_str()
    if system == "trigonal" and sg.ext == "R":
        return "rhombohedral"
    if system == "monoclinic":
        return "monoclinic-" + (sg.monoclinic_unique_axis() or "b")
    return system


# free parameters per system: (label, which cell constants it moves)
_CELL_FREE = {
    "triclinic": [("a", [0]), ("b", [1]), ("c", [2]), ("alpha", [3]), ("beta", [4]), ("gamma", [5])],
    "monoclinic-a": [("a", [0]), ("b", [1]), ("c", [2]), ("alpha", [3])],
    "monoclinic-b": [("a", [0]), ("b", [1]), ("c", [2]), ("beta", [4])],
    "monoclinic-c": [("a", [0]), ("b", [1]), ("c", [2]), ("gamma", [5])],
    "orthorhombic": [("a", [0]), ("b", [1]), ("c", [2])],
    "tetragonal": [("a", [0, 1]), ("c", [2])],
    "hexagonal": [("a", [0, 1]), ("c", [2])],
    "trigonal": [("a", [0, 1]), ("c", [2])],
    "rhombohedral": [("a", [0, 1, 2]), ("alpha", [3, 4, 5])],
    "cubic": [("a", [0, 1, 2])],
}


class Cell(Group):
    """Unit cell constrained by the crystal system (from the crystal's space
    group unless `system` is given: triclinic, monoclinic[-a|-b|-c],
    orthorhombic, tetragonal, trigonal/hexagonal (a = b, c), rhombohedral
    (a = b = c, alpha = beta = gamma), cubic). Lengths move as log-ratios,
    0.1 % per unit; free angles by 0.01 degree per unit; constrained angles
    keep their start values. Reported as a, b, c, alpha, beta, gamma."""

    name = "cell"
    physical_labels = ["a", "b", "c", "alpha", "beta", "gamma"]
    units = ["A", "A", "A", "deg", "deg", "deg"]
    length_step = 1e-3
    angle_step = 0.01

    def __init__(self, system: str | None = None):
        if system is not None:
            system = "monoclinic-b" if system == "monoclinic" else system
            if system not in _CELL_FREE:
                raise ValueError(f"unknown crystal system {system!r}; known: {', '.join(_CELL_FREE)}")
        self.system = system
        self.labels = []
        self.free = []

    def bind(self, sim):
        if self.system is None:
            self.system = crystal_system(sim.crystal.space_group)
        self.free = _CELL_FREE[self.system]
        self.labels = [f"cell.{n}" for n, _ in self.free]
        nfree = len(self.free)
        m_len = torch.zeros(6, nfree, dtype=torch.float64)
        m_ang = torch.zeros(6, nfree, dtype=torch.float64)
        for j, (n, idx) in enumerate(self.free):
            for i in idx:
                (m_len if i < 3 else m_ang)[i, j] = 1.0
        self._m_len, self._m_ang = m_len, m_ang
        return self

    def _cell(self, sim, x, subs):
        cell = _get(sim, subs, "crystal.cell").to(x.dtype)
        dlen = (self._m_len.to(x) @ x) * self.length_step
        dang = (self._m_ang.to(x) @ x) * self.angle_step
        ratio = torch.cat([torch.exp(dlen[:3]), torch.ones(3, dtype=x.dtype, device=x.device)])
        return cell * ratio + torch.cat([torch.zeros(3, dtype=x.dtype, device=x.device), dang[3:]])

    def substitute(self, sim, x, subs):
        subs["crystal.cell"] = self._cell(sim, x, subs)

    def physical(self, sim, x):
        return self._cell(sim, x, {})


class LogGroup(Group):
    """A positive parameter (or several) times exp(x * step)."""

    target = ""
    step = 0.01

    def substitute(self, sim, x, subs):
        v = _get(sim, subs, self.target).to(x.dtype)
        subs[self.target] = v * torch.exp(self._expand(x, v) * self.step)

    def _expand(self, x, v):
        return x.reshape(v.shape) if x.numel() == v.numel() else x.expand_as(v)

    def physical(self, sim, x):
        v = _get(sim, {}, self.target).to(x.dtype)
        return (v * torch.exp(self._expand(x, v) * self.step)).reshape(-1)


class SpotSize(LogGroup):
    """Cells along a, b, c: log of N, 1 % per unit; one value for all three
    axes (`isotropic`, the default) or one per axis."""

    name = "N"
    target = "crystal.N"
    units = ["cells"] * 3
    physical_labels = ["Na", "Nb", "Nc"]

    def __init__(self, isotropic: bool = True):
        self.isotropic = isotropic
        self.labels = ["N"] if isotropic else ["N.a", "N.b", "N.c"]


class Scale(LogGroup):
    """Overall scale: log of the beam fluence, 1 % per unit."""

    name = "scale"
    target = "beam.fluence"
    labels = ["scale"]
    physical_labels = ["fluence"]
    units = ["photons/m^2"]


class Mosaic(LogGroup):
    """Mosaic spread: log, 1 % per unit (the spread must start above zero
    and the crystal must have mosaic domains)."""

    name = "mosaic"
    target = "crystal.mosaic_spread"
    labels = ["mosaic"]
    physical_labels = ["mosaic_spread"]
    units = ["deg"]

    def bind(self, sim):
        if not float(sim.crystal.mosaic_spread) > 0 or sim.crystal.mosaic_domains < 2:
            raise ValueError("the mosaic group needs a mosaic spread above zero and several mosaic domains "
                             "(e.g. -mosaic 0.05 -mosaic_domains 25)")
        return self


class Wavelength(Group):
    """Relative shift of every wavelength (the beam's and a source table's),
    0.1 % per unit. Reported as the central wavelength."""

    name = "wavelength"
    labels = ["wavelength"]
    physical_labels = ["wavelength"]
    units = ["A"]
    step = 1e-3

    def substitute(self, sim, x, subs):
        f = 1.0 + x[0] * self.step
        subs["beam.wavelength"] = _get(sim, subs, "beam.wavelength").to(x.dtype) * f
        if sim.beam.has_source_table:
            subs["beam.source_wavelengths"] = _get(sim, subs, "beam.source_wavelengths").to(x.dtype) * f

    def physical(self, sim, x):
        return (sim.beam.wavelength.to(x.dtype) * (1.0 + x[0] * self.step)).reshape(1)


# ----------------------------------------------------------------------------- background

class Background(Group):
    """Photons added to every pixel of the model image: per panel a constant
    and, with `linear`, slopes along fast and slow (photons per half panel,
    i.e. the change from the panel centre to its edge). 1 photon per unit;
    the constant starts at `start` (a float or one per panel, default 0)."""

    name = "background"

    def __init__(self, linear: bool = False, start=0.0):
        self.linear = linear
        self.start = start
        self.labels = []

    def bind(self, sim):
        n = len(sim.detector.panels)
        self.panels = n
        per = ["const", "fast", "slow"] if self.linear else ["const"]
        self.labels = [f"background.{k}.{p}" for k in range(n) for p in per]
        self.physical_labels = list(self.labels)
        self.units = ["photons"] * len(self.labels)
        start = torch.as_tensor(self.start, dtype=torch.float64).reshape(-1)
        self._start = start.expand(n).clone() if start.numel() == 1 else start
        if self._start.numel() != n:
            raise ValueError(f"background start has {self._start.numel()} values for {n} panels")
        return self

    def substitute(self, sim, x, subs):
        pass

    def image_term(self, sim, x, shape):
        P, S, F = shape
        per = 3 if self.linear else 1
        c = x.reshape(P, per)
        out = (c[:, 0] + self._start.to(x)).reshape(P, 1, 1).expand(P, S, F)
        if self.linear:
            fs = torch.linspace(-1.0, 1.0, F, dtype=x.dtype, device=x.device)
            ss = torch.linspace(-1.0, 1.0, S, dtype=x.dtype, device=x.device)
            out = out + c[:, 1].reshape(P, 1, 1) * fs.reshape(1, 1, F) + c[:, 2].reshape(P, 1, 1) * ss.reshape(1, S, 1)
        return out

    def physical(self, sim, x):
        per = 3 if self.linear else 1
        c = x.reshape(self.panels, per).clone()
        c[:, 0] = c[:, 0] + self._start.to(x)
        return c.reshape(-1)


# ----------------------------------------------------------------------------- detector

def _detector_kind(sim):
    frames = [p.frame for p in sim.detector.panels]
    if all(isinstance(f, DistanceMount) for f in frames):
        return "mount"
    if all(isinstance(f, Frame) for f in frames):
        return "frame"
    raise ValueError("the detector mixes DistanceMount and Frame panels; refine its panels one by one")


def _lab_axes(sim):
    """Detector fast, slow and normal of panel 0 in the lab (float64, fixed)."""
    with torch.no_grad():
        _, fast, slow, normal = (t[0].double() for t in sim.detector.panel_frames(sim.beam.incident()))
    return fast, slow, normal


def _shift_detector(sim, subs, shift):
    """Move the whole detector by `shift` (lab frame, mm): the root group's
    origin when there is a hierarchy, else every panel's origin."""
    if sim.detector.hierarchy is not None:
        name = "detector.hierarchy.frame.origin"
        subs[name] = _get(sim, subs, name).to(shift.dtype) + shift
    else:
        for k in range(len(sim.detector.panels)):
            name = f"detector.panels.{k}.frame.origin"
            subs[name] = _get(sim, subs, name).to(shift.dtype) + shift


class Distance(Group):
    """Detector distance, 0.01 mm per unit: a DistanceMount's distance (or
    close distance when it has one), or for frame detectors a shift of the
    whole detector along its normal. Reported as the shift in mm."""

    name = "distance"
    labels = ["distance"]
    physical_labels = ["distance_shift"]
    units = ["mm"]
    step = 0.01

    def bind(self, sim):
        self.kind = _detector_kind(sim)
        if self.kind == "mount" and len(sim.detector.panels) > 1:
            raise ValueError("distance refinement of several DistanceMount panels is not supported")
        if self.kind == "frame":
            self._normal = _lab_axes(sim)[2]
        return self

    def substitute(self, sim, x, subs):
        d = x[0] * self.step
        if self.kind == "mount":
            frame = sim.detector.panels[0].frame
            name = "detector.panels.0.frame." + ("close_distance" if frame.has_close_distance else "distance")
            subs[name] = _get(sim, subs, name).to(x.dtype) + d
        else:
            _shift_detector(sim, subs, self._normal.to(x) * d)

    def physical(self, sim, x):
        return x * self.step


class BeamCentre(Group):
    """Beam centre along fast and slow, 0.01 pixel per unit: a DistanceMount's
    beam_center (close_center with the SAMPLE pivot), or for frame detectors
    the detector moved the opposite way along its fast and slow axes.
    Reported as the shift in pixels."""

    name = "beam_centre"
    labels = ["beam_centre.fast", "beam_centre.slow"]
    physical_labels = ["beam_centre_shift.fast", "beam_centre_shift.slow"]
    units = ["px", "px"]
    step = 0.01

    def bind(self, sim):
        self.kind = _detector_kind(sim)
        self._pixel = sim.detector.panels[0].pixel_size.detach().double().clone()
        if self.kind == "mount" and len(sim.detector.panels) > 1:
            raise ValueError("beam-centre refinement of several DistanceMount panels is not supported")
        if self.kind == "frame":
            self._fast, self._slow, _ = _lab_axes(sim)
        return self

    def substitute(self, sim, x, subs):
        mm = x * self.step * self._pixel.to(x)
        if self.kind == "mount":
            frame = sim.detector.panels[0].frame
            name = "detector.panels.0.frame." + ("close_center" if frame.pivot == "SAMPLE" else "beam_center")
            subs[name] = _get(sim, subs, name).to(x.dtype) + mm
        else:
            _shift_detector(sim, subs, -(mm[0] * self._fast.to(x) + mm[1] * self._slow.to(x)))

    def physical(self, sim, x):
        return x * self.step


class Panels(Group):
    """Per panel (all, or those in `panels`): a shift of the frame origin in
    its parent frame (0.01 mm per unit) and a rotation vector added to the
    frame's orientation (0.01 degree per unit). Frame panels only."""

    name = "panels"
    shift_step = 0.01
    angle_step = 0.01

    def __init__(self, panels=None):
        self.which = panels
        self.labels = []

    def bind(self, sim):
        if _detector_kind(sim) != "frame":
            raise ValueError("the panels group moves DIALS-style panel frames; a DistanceMount detector "
                             "refines 'distance' and 'beam_centre' instead")
        n = len(sim.detector.panels)
        self.which = list(range(n)) if self.which is None else [int(k) for k in self.which]
        for k in self.which:
            if not 0 <= k < n:
                raise ValueError(f"no panel {k}: the detector has panels 0..{n - 1}")
        self.labels = [f"panel.{k}.{p}" for k in self.which for p in ("x", "y", "z", "rx", "ry", "rz")]
        self.physical_labels = list(self.labels)
        self.units = ["mm", "mm", "mm", "deg", "deg", "deg"] * len(self.which)
        return self

    def substitute(self, sim, x, subs):
        x = x.reshape(-1, 6)
        for j, k in enumerate(self.which):
            o, r = f"detector.panels.{k}.frame.origin", f"detector.panels.{k}.frame.orientation"
            subs[o] = _get(sim, subs, o).to(x.dtype) + x[j, :3] * self.shift_step
            subs[r] = _get(sim, subs, r).to(x.dtype) + x[j, 3:] * (self.angle_step * DEG)

    def physical(self, sim, x):
        x = x.reshape(-1, 6)
        return torch.cat([x[:, :3] * self.shift_step, x[:, 3:] * self.angle_step], 1).reshape(-1)


GROUPS = {
    "orientation": Orientation,
    "cell": Cell,
    "N": SpotSize,
    "scale": Scale,
    "mosaic": Mosaic,
    "background": Background,
    "distance": Distance,
    "beam_centre": BeamCentre,
    "panels": Panels,
    "wavelength": Wavelength,
}


def make_group(spec) -> Group:
    """A group from its name (see GROUPS) or a Group instance (returned as is)."""
    if isinstance(spec, Group):
        return spec
    if isinstance(spec, str):
        key = "beam_centre" if spec in ("beam_center", "beam_centre") else spec
        if key in GROUPS:
            return GROUPS[key]()
    raise ValueError(f"unknown parameter group {spec!r}; known: {', '.join(GROUPS)} (or a Group instance)")


class Parametrisation:
    """Several groups over one internal vector: `split(x)` gives each group's
    slice; `substitutions(sim, x)` the dict for functional_call;
    `image_terms(sim, x, shape)` the photons added to the image."""

    def __init__(self, groups, sim):
        self.groups = []
        seen = set()
        for spec in groups:
            g = make_group(spec)
            if g.name in seen:
                raise ValueError(f"parameter group {g.name!r} given twice")
            seen.add(g.name)
            self.groups.append(g.bind(sim))
        self.sizes = [g.size for g in self.groups]
        self.size = sum(self.sizes)
        self.labels = [lab for g in self.groups for lab in g.labels]

    def split(self, x):
        return dict(zip((g.name for g in self.groups), torch.split(x, self.sizes)))

    def substitutions(self, sim, x, subs=None):
        subs = dict(subs or {})
        for g, xi in zip(self.groups, torch.split(x, self.sizes)):
            g.substitute(sim, xi, subs)
        return subs

    def image_terms(self, sim, x, shape):
        total = None
        for g, xi in zip(self.groups, torch.split(x, self.sizes)):
            t = g.image_term(sim, xi, shape)
            if t is not None:
                total = t if total is None else total + t
        return total

    def physical(self, sim, x):
        return torch.cat([g.physical(sim, xi).reshape(-1) for g, xi in zip(self.groups, torch.split(x, self.sizes))])

    def physical_labels(self):
        return [(g.name, lab, unit) for g in self.groups for lab, unit in zip(g.physical_labels, g.units)]
