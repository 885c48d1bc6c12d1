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
| spectrum | shift of every wavelength; log of the spread about the weighted mean wavelength | 1e-4 of the mean wavelength (shift), 1 % (spread) |
| structure_factors | log of the amplitude F of each unique reflection (asymmetric unit, Friedel mates merged) | 1 % |
| psf_width | log of the FWHM of the detector response's point-spread function | 1 % |

`physical(sim, x)` gives the values a user reads (degrees, Angstrom, mm,
photons/m^2, ...) for reports and for propagating uncertainties.
"""

from __future__ import annotations


import numpy as np
import torch

from .. import physics as ph
from ..models import DistanceMount, Frame
from ..units import DEG


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
    additive = False  # adds photons through image_term only, substituting nothing of the render
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

    def region_term(self, sim, x, mask):
        """image_term over the pixels of the boolean `mask` (1-D), or None."""
        term = self.image_term(sim, x, mask.shape)
        return None if term is None else term[mask]

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


def space_group_ops(space_group: str):
    """gemmi GroupOps of a space group given as a Hall symbol (how crystals
    store it) or, where that reading fails, as a Hermann-Mauguin name."""
    import gemmi
    try:
        return gemmi.symops_from_hall(space_group)
    except Exception as exc:
        sg = gemmi.find_spacegroup_by_name(space_group.strip()) if space_group.strip() else None
        if sg is None:
            raise ValueError(f"cannot read the space group {space_group!r}: {exc}") from None
        return sg.operations()


def crystal_system(space_group: str) -> str:
    """Crystal system of a Hall symbol (or Hermann-Mauguin name)
    ("rhombohedral" for R groups on rhombohedral axes, "trigonal" for other
    trigonal groups)."""
    import gemmi
    sg = gemmi.find_spacegroup_by_ops(space_group_ops(space_group))
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


class DomainSize(LogGroup):
    """The size of a coherent crystal domain, N unit cells along a, b, c (the
    width of the spots): log of N, 1 % per unit; one value for all three axes
    (`isotropic`, the default) or one per axis."""

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


class Spectrum(Group):
    """Shift and width of the beam's spectrum, the wavelengths of a source
    table or of -dispersion's steps, with the source weights: every
    wavelength l_i becomes m + exp(width * 1 %) (l_i - m) + shift * 1e-4 m,
    m the weighted mean wavelength, so the shift moves the mean and the
    width scales the spread about it. Needs a spectrum of several
    wavelengths. Reported as the weighted mean wavelength and the weighted
    RMS bandwidth."""

    name = "spectrum"
    labels = ["spectrum.shift", "spectrum.width"]
    physical_labels = ["wavelength_mean", "bandwidth_rms"]
    units = ["A", "A"]
    shift_step = 1e-4  # of the mean wavelength
    width_step = 0.01

    def bind(self, sim):
        self.table = sim.beam.has_source_table
        several = self.table or sim.beam.dispersion_steps > 1
        if several:
            with torch.no_grad():
                mean, rms = self._moments(*self._lines(sim, {}, torch.float64))
            several = float(rms) > 1e-9 * float(mean)
        if not several:
            raise ValueError("the spectrum group needs a spectrum of several wavelengths (a source table, or "
                             "-dispersion with -dispsteps above 1): a single wavelength has no width to refine; "
                             "refine 'wavelength' instead")
        return self

    def _lines(self, sim, subs, dtype):
        """Wavelength (Angstrom) and weight of every source, in the simulator's order."""
        beam = sim.beam
        wl = _get(sim, subs, "beam.wavelength").to(dtype)
        if self.table:
            lam = _get(sim, subs, "beam.source_wavelengths").to(dtype)
            lam = torch.where(torch.isnan(lam), wl.expand_as(lam), lam)  # NaN: the beam's wavelength
        else:
            n = beam.dispersion_steps  # above 1 (bind)
            # Beam.sources(): wl * (1 + dispersion * u), u evenly from -1/2 to 1/2, per divergence point
            u = torch.arange(n, dtype=dtype, device=wl.device) / (n - 1) - 0.5
            lam = (wl * (1.0 + _get(sim, subs, "beam.dispersion").to(dtype) * u)).repeat(len(beam.divergence_points))
        if beam.weighted:
            w = _get(sim, subs, "beam.source_weights").to(dtype)
        else:
            w = torch.ones_like(lam)
        return lam, w

    @staticmethod
    def _moments(lam, w):
        mean = (w * lam).sum() / w.sum()
        rms = torch.sqrt((w * (lam - mean) ** 2).sum() / w.sum())
        return mean, rms

    def substitute(self, sim, x, subs):
        lam, w = self._lines(sim, subs, x.dtype)
        mean = (w * lam).sum() / w.sum()
        spread = torch.exp(x[1] * self.width_step)
        shift = x[0] * self.shift_step * mean
        wl = _get(sim, subs, "beam.wavelength").to(x.dtype)
        new_wl = mean + spread * (wl - mean) + shift
        subs["beam.wavelength"] = new_wl
        if self.table:
            subs["beam.source_wavelengths"] = mean + spread * (lam - mean) + shift
        else:
            # wl (1 + D u) maps onto new_wl (1 + D' u) with D' = spread wl D / new_wl
            subs["beam.dispersion"] = spread * wl * _get(sim, subs, "beam.dispersion").to(x.dtype) / new_wl

    def physical(self, sim, x):
        mean, rms = self._moments(*self._lines(sim, {}, x.dtype))
        return torch.stack([mean * (1.0 + x[0] * self.shift_step), rms * torch.exp(x[1] * self.width_step)])


# ----------------------------------------------------------------------------- structure factors

FHKL = "crystal.structure_factors.Fhkl"


def _canonical(hkl: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """Per row of hkl (n, 3): the lexicographically largest of its symmetry
    mates (h @ R for every rotation R) and their Friedel mates, so that all
    reflections one unique reflection stands for share one row."""
    best = hkl.copy()
    for R in mats:
        e = hkl @ R
        for m in (e, -e):
            gt = (m[:, 0] > best[:, 0]) | ((m[:, 0] == best[:, 0]) & (
                (m[:, 1] > best[:, 1]) | ((m[:, 1] == best[:, 1]) & (m[:, 2] > best[:, 2]))))
            best[gt] = m[gt]
    return best


def _keys(hkl: np.ndarray, bound: int) -> np.ndarray:
    """One integer per row of hkl (|indices| <= bound)."""
    w = 2 * bound + 1
    return ((hkl[:, 0] + bound) * w + (hkl[:, 1] + bound)) * w + (hkl[:, 2] + bound)


class StructureFactorGroup(Group):
    """Structure factors of unique reflections: log |F| of each, 1 % per
    unit. A reflection stands for all its symmetry mates under the space
    group (the crystal's, or `space_group`: a Hall symbol or a
    Hermann-Mauguin name) and their Friedel mates (no anomalous signal):
    every cell of the crystal's dense table that one of them falls on takes
    its value (the sign of a negative start value kept), the other cells keep
    theirs, and reflections outside the table keep default_F. The gradient
    reaches only the unique reflections' values.

    reflections: the ones to refine, any symmetry mate of each (e.g. those
    `reflections_in_view` finds); default: every unique reflection with a
    nonzero |F| in the table. The table must give one |F| to all mates of a
    refined reflection (as a table expanded from an asymmetric unit does).
    Labelled and reported as F(h,k,l) in the asymmetric unit."""

    name = "structure_factors"
    step = 0.01

    def __init__(self, reflections=None, space_group: str | None = None):
        self.wanted = None if reflections is None else [tuple(int(v) for v in r) for r in reflections]
        self.space_group = space_group
        self.labels = []
        self.reflections = []

    def bind(self, sim):
        import gemmi

        from ..io.structure_factors import rotations
        sf = sim.crystal.structure_factors
        if not sf.has_grid:
            raise ValueError("the structure_factors group needs a table of structure factors (-hkl, -mtz, "
                             "-model or a StructureFactors grid); this crystal has only default_F")
        symbol = self.space_group if self.space_group is not None else sim.crystal.space_group
        ops = space_group_ops(symbol)
        with torch.no_grad():
            grid = sf.Fhkl.detach().double().cpu().numpy()
            lo = np.array(sf.hkl_min.cpu().tolist(), dtype=np.int64)
        self._shape, self._lo = tuple(grid.shape), tuple(int(v) for v in lo)
        self._symbol = symbol
        absF = np.abs(grid).reshape(-1)
        cells = np.indices(grid.shape).reshape(3, -1).T.astype(np.int64) + lo
        mats = rotations(ops)
        canon = _canonical(cells, mats)
        bound = int(np.abs(canon).max(initial=0))
        keys, first, inverse = np.unique(_keys(canon, bound), return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        n_unique = len(keys)
        fmax = np.zeros(n_unique)
        np.maximum.at(fmax, inverse, absF)
        fmin = np.full(n_unique, np.inf)
        np.minimum.at(fmin, inverse, absF)
        sg = gemmi.find_spacegroup_by_ops(ops)
        asu = gemmi.ReciprocalAsu(sg) if sg is not None else None

        def label(u):  # the reflection in the standard asymmetric unit where gemmi knows the group
            h = [int(v) for v in canon[first[u]]]
            return tuple(asu.to_asu(h, ops)[0]) if asu is not None else tuple(h)

        if self.wanted is None:
            chosen = np.nonzero(fmax > 0)[0]
            if len(chosen) == 0:
                raise ValueError("structure_factors: every |F| in the table is zero; nothing to refine")
        else:
            if not self.wanted:
                raise ValueError("structure_factors: the list of reflections to refine is empty")
            wanted = np.array(self.wanted, dtype=np.int64).reshape(-1, 3)
            wc = _canonical(wanted, mats)
            inside = (np.abs(wc) <= bound).all(1)
            pos = np.searchsorted(keys, _keys(np.clip(wc, -bound, bound), bound))
            pos = np.minimum(pos, n_unique - 1)
            found = inside & (keys[pos] == _keys(np.clip(wc, -bound, bound), bound))
            for r, ok in zip(self.wanted, found):
                if not ok:
                    raise ValueError(f"structure_factors: reflection {r} (and its symmetry mates) is not in the "
                                     f"table (h from {lo[0]} to {lo[0] + grid.shape[0] - 1}, k from {lo[1]} to "
                                     f"{lo[1] + grid.shape[1] - 1}, l from {lo[2]} to {lo[2] + grid.shape[2] - 1})")
            chosen = np.array(list(dict.fromkeys(pos.tolist())), dtype=np.int64)  # mates given twice: once
            for u in chosen:
                if not fmax[u] > 0:
                    raise ValueError(f"structure_factors: F{label(u)} is zero in the table; its log cannot be "
                                     f"refined")
        bad = chosen[~np.isclose(fmin[chosen], fmax[chosen], rtol=1e-6, atol=0.0)]
        if len(bad):
            u = bad[0]
            mates = np.nonzero(inverse == u)[0]
            vals = ", ".join(f"F{tuple(int(v) for v in cells[c])} = {absF[c]:g}" for c in mates[:4])
            raise ValueError(f"structure_factors: the table gives different |F| to symmetry or Friedel mates of "
                             f"{len(bad)} reflections under space group {symbol.strip()!r} (e.g. {vals}); expand "
                             f"it over the group's symmetry and Friedel mates, give the space group it has, or "
                             f"leave those reflections out of `reflections`")
        self.reflections = [label(u) for u in chosen]
        order = sorted(range(len(chosen)), key=lambda j: self.reflections[j])
        chosen = chosen[order]
        self.reflections = [self.reflections[j] for j in order]
        self.labels = [f"F({h},{k},{l})" for h, k, l in self.reflections]
        self.physical_labels = list(self.labels)
        self.units = ["electrons"] * len(self.labels)
        # grid cell -> position in the refined list (-1: not refined); one cell per reflection for its start value
        where = np.full(n_unique, -1, dtype=np.int64)
        where[chosen] = np.arange(len(chosen))
        self._index = {torch.device("cpu"): torch.as_tensor(where[inverse].reshape(grid.shape))}
        self._first = {torch.device("cpu"): torch.as_tensor(first[chosen].astype(np.int64))}
        return self

    def _on(self, device):
        """The index tensors on `device` (copied once per device)."""
        if device not in self._index:
            cpu = torch.device("cpu")
            self._index[device] = self._index[cpu].to(device)
            self._first[device] = self._first[cpu].to(device)
        return self._index[device], self._first[device]

    def _check(self, sim):
        """The table must be the one the group was set up for (a group shared
        by several simulators is set up from the first)."""
        sf = sim.crystal.structure_factors
        same = sf.has_grid and tuple(sf.Fhkl.shape) == self._shape and tuple(sf.hkl_min.tolist()) == self._lo
        if not same:
            raise ValueError(f"structure_factors: this simulator's table differs from the one the group was set "
                             f"up for (indices from {self._lo}, shape {self._shape}); simulators sharing the group "
                             f"need tables of one shape")
        if self.space_group is None and sim.crystal.space_group != self._symbol:
            raise ValueError(f"structure_factors: this crystal's space group {sim.crystal.space_group!r} differs "
                             f"from {self._symbol!r}, the one the group was set up for")

    def _amplitudes(self, grid, x):
        """|F| of the refined reflections: the start value of each times exp(x * step)."""
        _, first = self._on(grid.device)
        return grid.reshape(-1)[first].abs() * torch.exp(x * self.step)

    def substitute(self, sim, x, subs):
        self._check(sim)
        grid = _get(sim, subs, FHKL).to(x.dtype)
        index, _ = self._on(grid.device)
        f = self._amplitudes(grid, x)[index.clamp(min=0)]
        subs[FHKL] = torch.where(index >= 0, torch.where(grid < 0, -f, f), grid)

    def physical(self, sim, x):
        return self._amplitudes(_get(sim, {}, FHKL).to(x.dtype), x)


def reflections_in_view(sim, mask=None, fraction: float = 1e-3, space_group: str | None = None) -> list:
    """The unique reflections whose structure factors the image (the pixels
    of `mask`, a (panels, slow, fast) boolean, or all) depends on: those whose
    log |F| moves the photons summed over the mask by more than `fraction` of
    the largest such change, most telling first. For the structure_factors
    group's `reflections`."""
    from torch.func import functional_call

    g = StructureFactorGroup(space_group=space_group).bind(sim)
    x = torch.zeros(g.size, dtype=sim.dtype, device=sim.device, requires_grad=True)
    subs = {}
    g.substitute(sim, x, subs)
    pixels = None if mask is None else torch.as_tensor(mask, dtype=torch.bool, device=sim.device)
    (grad,) = torch.autograd.grad(functional_call(sim, subs, (), dict(pixels=pixels)).sum(), x)
    sens = grad.detach().abs().double().cpu()
    order = torch.argsort(sens, descending=True).tolist()
    top = float(sens.max()) if len(order) else 0.0
    return [g.reflections[i] for i in order if float(sens[i]) > fraction * top]


# ----------------------------------------------------------------------------- background

class Background(Group):
    """Photons added to every pixel of the model image: per panel a constant
    and, with `linear`, slopes along fast and slow (photons per half panel,
    i.e. the change from the panel centre to its edge). 1 photon per unit;
    the constant starts at `start` (a float or one per panel, default 0)."""

    name = "background"
    additive = True

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

    def start_from(self, data, model, mask) -> None:
        """Unless a start was given, start each panel's constant at the median
        difference of `data` and `model` over the faint half of the pixels of
        `mask` (all (panels, slow, fast))."""
        if not bool((self._start == 0).all()):
            return
        starts = []
        for k in range(model.shape[0]):
            region = mask[k]
            faint = region & (model[k] <= torch.quantile(model[k][region], 0.5)) if region.any() else region
            starts.append(max(float((data[k] - model[k])[faint].median()), 0.0) if faint.any() else 0.0)
        self._start = torch.tensor(starts, dtype=torch.float64)

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


# A smooth background for measured frames: air, solvent and sample-holder
# scatter fall off with the scattering angle, so on a real detector the
# background varies several times from the beam to the corners, and one
# constant per panel leaves the spots on a tilted floor.

def pixel_two_theta(sim) -> torch.Tensor:
    """Scattering angle (radians) of every pixel centre, (panels, slow, fast),
    from the simulator's current geometry (no gradient)."""
    with torch.no_grad():
        inc = sim.beam.incident().double()
        origin, fast, slow, _ = (t.double() for t in sim.detector.panel_frames(sim.beam.incident()))
        out = []
        for k, panel in enumerate(sim.detector.panels):
            pixel = panel.pixel_size.double()
            f = (torch.arange(panel.fpixels, dtype=torch.float64) + 0.5) * pixel[0]
            s = (torch.arange(panel.spixels, dtype=torch.float64) + 0.5) * pixel[1]
            pos = origin[k] + s[:, None, None] * slow[k] + f[None, :, None] * fast[k]
            cos = (pos @ inc) / torch.linalg.norm(pos, dim=-1)
            out.append(torch.arccos(torch.clamp(cos, -1.0, 1.0)))
        return torch.stack(out)


class RadialBackground(Group):
    """Photons per pixel as a piecewise-linear function of 2theta: `knots`
    values (at least 2) at angles from the smallest to the largest 2theta of
    the detector; `start`: their start values (a float or one per knot)."""

    name = "radial_background"
    additive = True

    def __init__(self, knots: int = 8, start=0.0):
        if knots < 2:
            raise ValueError("a radial background needs at least 2 knots")
        self.knots = int(knots)
        self.start = start
        self.labels = [f"radial_background.{i}" for i in range(self.knots)]
        self.units = ["photons"] * self.knots

    def bind(self, sim):
        tth = pixel_two_theta(sim)
        lo, hi = float(tth.min()), float(tth.max())
        self.angles = torch.linspace(lo, hi * (1 + 1e-9) + 1e-12, self.knots, dtype=torch.float64)
        step = float(self.angles[1] - self.angles[0])
        pos = (tth - lo) / step
        self._index = torch.clamp(pos.floor().long(), 0, self.knots - 2)
        self._frac = torch.clamp(pos - self._index, 0.0, 1.0)
        self.physical_labels = [f"radial_background.{d:.2f}deg" for d in torch.rad2deg(self.angles).tolist()]
        start = torch.as_tensor(self.start, dtype=torch.float64).reshape(-1)
        self._start = start.expand(self.knots).clone() if start.numel() == 1 else start.clone()
        if self._start.numel() != self.knots:
            raise ValueError(f"radial background start has {self._start.numel()} values for {self.knots} knots")
        return self

    def start_from(self, data, model, mask) -> None:
        """Start each knot at the median of data minus model over the faint
        half of the pixels of `mask` nearest to it (all (panels, slow, fast))."""
        d = (torch.as_tensor(data).double() - torch.as_tensor(model).double())
        nearest = torch.where(self._frac < 0.5, self._index, self._index + 1)
        faint = mask & (torch.as_tensor(model).double() <= torch.quantile(torch.as_tensor(model).double()[mask], 0.5))
        values = []
        for i in range(self.knots):
            sel = faint & (nearest == i)
            values.append(float(d[sel].median()) if bool(sel.any()) else float("nan"))
        v = torch.tensor(values, dtype=torch.float64)
        if bool(torch.isnan(v).all()):
            return
        known = ~torch.isnan(v)
        # knots without pixels take their nearest known neighbour's value
        idx = torch.arange(self.knots)
        for i in torch.nonzero(~known).flatten().tolist():
            j = idx[known][torch.argmin((idx[known] - i).abs())]
            v[i] = v[j]
        self._start = torch.clamp(v, min=0.0)

    def substitute(self, sim, x, subs):
        pass

    def image_term(self, sim, x, shape):
        values = x + self._start.to(x)
        idx, frac = self._index.to(x.device), self._frac.to(x)
        return values[idx] * (1 - frac) + values[idx + 1] * frac

    def region_term(self, sim, x, mask):
        kept = self.__dict__.setdefault("_regions", {})  # the knots of each region's pixels
        if id(mask) not in kept or kept[id(mask)][0] is not mask:
            if len(kept) > 64:
                kept.clear()
            m = mask.to(self._index.device)
            kept[id(mask)] = (mask, self._index[m], self._frac[m])
        values = x + self._start.to(x)
        idx, frac = kept[id(mask)][1].to(x.device), kept[id(mask)][2].to(x)
        return values[idx] * (1 - frac) + values[idx + 1] * frac

    def physical(self, sim, x):
        return x + self._start.to(x)


# ----------------------------------------------------------------------------- detector

class PsfWidth(LogGroup):
    """Width (FWHM, mm) of the point-spread function of the simulator's
    detector response (`sim.response`, a DetectorResponse with a PSF): log,
    1 % per unit. The model image is the response's expectation of the
    photons (`sim.detector_counts(photons, sample=False)`)."""

    name = "psf_width"
    target = "response.psf_fwhm"
    labels = ["psf_width"]
    physical_labels = ["psf_fwhm"]
    units = ["mm"]

    def bind(self, sim):
        response = getattr(sim, "response", None)
        if response is None or getattr(response, "psf", None) is None or not float(response.psf_fwhm) > 0:
            raise ValueError("the psf_width group needs a detector response with a point-spread function of "
                             "positive width (Simulator(..., response=DetectorResponse(psf='gauss', psf_fwhm=...)))")
        return self


class AmorphousScale(LogGroup):
    """Scale of the simulator's amorphous background (`sim.background`, a
    models.Background: solvent, air, ice from a .stol table): log, 1 % per
    unit. Its photons are linear in the scale."""

    name = "amorphous"
    target = "background.scale"
    labels = ["amorphous"]
    physical_labels = ["amorphous_scale"]
    units = [""]

    def bind(self, sim):
        if getattr(sim, "background", None) is None:
            raise ValueError("the amorphous group needs an amorphous background (Simulator(..., background="
                             "Background.from_stol(...)) or torchbragg refine --background FILE.stol)")
        return self


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


def _background_plane():
    return Background(linear=True)


GROUPS = {
    "orientation": Orientation,
    "cell": Cell,
    "N": DomainSize,
    "scale": Scale,
    "mosaic": Mosaic,
    "background": Background,
    "background_plane": _background_plane,
    "radial_background": RadialBackground,
    "distance": Distance,
    "beam_centre": BeamCentre,
    "panels": Panels,
    "wavelength": Wavelength,
    "spectrum": Spectrum,
    "structure_factors": StructureFactorGroup,
    "psf_width": PsfWidth,
    "amorphous": AmorphousScale,
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
