"""Crystal, Beam and Detector: each owns its parameters as tensors (in the
units of the command line) and derives everything else on demand, so any of
them can be made trainable. Discrete choices (step counts, conventions,
shapes) are plain Python values fixed at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import physics as ph
from .config import (BeamConfig, CrystalConfig, DetectorConfig, auto_steps,
                     sweep_is_off)
from .errors import InputError

DEG = math.pi / 180.0

# Detector frames of the beam-centre conventions: beam, fast, slow, normal,
# two-theta axis, polarization E-vector, spindle.
CONVENTION_VECTORS = {
    "ADXV": dict(beam=(0, 0, 1), f=(1, 0, 0), s=(0, -1, 0), o=(0, 0, 1), tt=(-1, 0, 0), pol=(1, 0, 0), spindle=(1, 0, 0)),
    "MOSFLM": dict(beam=(1, 0, 0), f=(0, 0, 1), s=(0, -1, 0), o=(1, 0, 0), tt=(0, 0, -1), pol=(0, 0, 1), spindle=(0, 0, 1)),
    "DENZO": dict(beam=(1, 0, 0), f=(0, 0, 1), s=(0, -1, 0), o=(1, 0, 0), tt=(0, 0, -1), pol=(0, 0, 1), spindle=(0, 0, 1)),
    "XDS": dict(beam=(0, 0, 1), f=(1, 0, 0), s=(0, 1, 0), o=(0, 0, 1), tt=(1, 0, 0), pol=(1, 0, 0), spindle=(1, 0, 0)),
    "DIALS": dict(beam=(0, 0, 1), f=(1, 0, 0), s=(0, 1, 0), o=(0, 0, 1), tt=(0, 1, 0), pol=(0, 1, 0), spindle=(0, 1, 0)),
}
# Vectors a CUSTOM run starts from before the user's own replace them.
CUSTOM_START = dict(beam=(1, 0, 0), f=(0, 0, 1), s=(0, -1, 0), o=(1, 0, 0), tt=(0, 1, 0), pol=(0, 0, 1), spindle=(0, 0, 1))
# Conventions whose rules force the pivot whatever the flags said.
FORCED_PIVOT = {"ADXV": "BEAM", "MOSFLM": "BEAM", "DENZO": "BEAM", "XDS": "SAMPLE", "DIALS": "SAMPLE"}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if n == 0:
        raise InputError(f"zero-length vector {tuple(v)}")
    return v / n


class _Model:
    dtype: torch.dtype
    device: torch.device

    def _t(self, value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every floating-point tensor attribute: what an optimiser may train."""
        return {k: v for k, v in vars(self).items() if torch.is_tensor(v) and v.is_floating_point()}


# ----------------------------------------------------------------------------- beam

class Beam(_Model):
    """Incident beam: wavelength, spectral and angular spread, fluence,
    polarization, and the water background around the crystal."""

    def __init__(self, cfg: BeamConfig, convention: str, dtype=torch.float32, device="cpu", sources=None):
        self.dtype, self.device = dtype, torch.device(device)
        vecs = CONVENTION_VECTORS.get(convention, CUSTOM_START)
        self.beam_direction = _unit(cfg.beam_vector if convention == "CUSTOM" and cfg.beam_vector else vecs["beam"])
        self.polar_direction = _unit(cfg.polar_vector if convention == "CUSTOM" and cfg.polar_vector else vecs["pol"])
        self.wavelength = self._t(cfg.wavelength)
        self.polarization = self._t(cfg.polarization)
        self.nopolar = cfg.nopolar
        self.water_size = self._t(cfg.water_size * 1e-6)
        self.use_flux = cfg.flux != 0.0 and cfg.exposure > 0.0 and cfg.beamsize >= 0
        self.fluence = self._t(cfg.fluence)
        self.flux = self._t(cfg.flux)
        self.exposure = self._t(cfg.exposure)
        self.beamsize = self._t(cfg.beamsize)

        n, disp, step = auto_steps(cfg.dispsteps, cfg.dispersion / 100.0, None, 1.0, endpoints=True)
        if sweep_is_off(n, disp, step):
            n, disp, step = 1, 0.0, 0.0
        self.dispsteps = n
        self.dispersion = self._t(disp)

        self.div = {}
        for axis in ("h", "v"):
            rng = getattr(cfg, f"{axis}divrange")
            st = getattr(cfg, f"{axis}divstep")
            n, r, s = auto_steps(getattr(cfg, f"{axis}divsteps"),
                                 None if rng is None else rng / 1000.0,
                                 None if st is None else st / 1000.0, 1.0, endpoints=True)
            if sweep_is_off(n, r, s):
                n, r, s = 1, 0.0, 0.0
            # the step follows the range unless the user fixed it
            self.div[axis] = dict(n=n, range=r, step=s, step_given=st is not None and st > 0)
        self.hdivrange = self._t(self.div["h"]["range"])
        self.vdivrange = self._t(self.div["v"]["range"])
        self.round_div = cfg.round_div
        self.source_table = sources  # (X, Y, Z, I, lambda) rows from -sourcefile, or None
        self._grid = self._divergence_grid()

    def effective_fluence(self) -> torch.Tensor:
        if self.use_flux:
            size = self.beamsize * 1e-3
            return self.flux * self.exposure / (size * size)
        return self.fluence

    def _divergence_grid(self) -> list[tuple[int, int]]:
        """(h, v) step indices kept after the original's elliptical trimming;
        the choice of points is structural, decided once from the config."""
        h, v = self.div["h"], self.div["v"]
        kept = []
        for ih in range(h["n"]):
            for iv in range(v["n"]):
                hd = h["step"] * ih - h["range"] / 2.0
                vd = v["step"] * iv - v["range"] / 2.0
                with np.errstate(divide="ignore", invalid="ignore"):
                    test = np.float64(hd * hd - h["step"] ** 2 / 4.0 * (1 - h["n"] % 2)) / np.float64(h["range"]) ** 2
                    test += np.float64(vd * vd - v["step"] ** 2 / 4.0 * (1 - v["n"] % 2)) / np.float64(v["range"]) ** 2
                if self.round_div and test * 4.0 > 1.1:
                    continue
                kept.append((ih, iv))
        return kept

    def _step(self, axis: str, rng: torch.Tensor) -> torch.Tensor:
        d = self.div[axis]
        if d["step_given"] or d["n"] < 2:
            return self._t(d["step"])
        return rng / (d["n"] - 1)

    @property
    def n_divergence(self) -> int:
        return len(self._grid) if self.source_table is None else -1  # the original reports -1 here

    def sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit incident directions (n, 3) and wavelengths (n,) in Angstrom, in
        the original's order (horizontal, vertical, then wavelength)."""
        beam = self._t(self.beam_direction)
        if self.source_table is not None:
            rows = self.source_table
            dirs, lams = [], []
            for x, y, z, _w, lam in rows:
                pos = [(-10.0 * self.beam_direction[i]) if math.isnan(c) else c for i, c in enumerate((x, y, z))]
                dirs.append(pos)
                lams.append(None if math.isnan(lam) else lam * 1e10)
            src = ph.unitize(self._t(np.array(dirs)))
            lam_t = torch.stack([self.wavelength if l is None else self._t(l) for l in lams])
            return -src, lam_t
        polar = self._t(self.polar_direction)
        vert = ph.unitize(ph.cross(beam, polar))
        hstep = self._step("h", self.hdivrange)
        vstep = self._step("v", self.vdivrange)
        ih = self._t([g[0] for g in self._grid])
        iv = self._t([g[1] for g in self._grid])
        hdiv = hstep * ih - self.hdivrange / 2.0
        vdiv = vstep * iv - self.vdivrange / 2.0
        toward_source = -10.0 * beam
        rot = ph.rotation_axis_angle(vert, hdiv) @ ph.rotation_axis_angle(polar, vdiv)
        src = ph.unitize(ph.rotate(rot, toward_source))
        n = self.dispsteps
        dstep = self.dispersion / (n - 1) if n > 1 else torch.zeros_like(self.dispersion)
        tic = self._t(list(range(n)))
        lam = self.wavelength * (1.0 + dstep * tic - self.dispersion / 2.0)
        incident = (-src).repeat_interleave(n, dim=0)
        lams = lam.repeat(len(self._grid))
        return incident, lams


# ----------------------------------------------------------------------------- crystal

@dataclass
class StructureFactors:
    """A P1 structure-factor grid and the index of its first element."""
    grid: np.ndarray  # (h_range, k_range, l_range) float64
    h_min: int
    k_min: int
    l_min: int


class Crystal(_Model):
    """Unit cell and orientation, spindle sweep, mosaic domains, size and spot
    shape, and the structure factors."""

    def __init__(self, cfg: CrystalConfig, spindle_axis, wavelength_A: float,
                 dtype=torch.float32, device="cpu", hkl: StructureFactors | None = None,
                 A_matrix: np.ndarray | None = None, mosaic_draws=None, random_misset=None):
        self.dtype, self.device = dtype, torch.device(device)
        self.spindle_axis = _unit(spindle_axis)
        if cfg.cell is None and A_matrix is None:
            raise InputError("no unit cell: give -cell a b c alpha beta gamma or -mat file")
        self.from_matrix = A_matrix is not None
        cell = cfg.cell or (1, 1, 1, 90, 90, 90)
        self.cell_a, self.cell_b, self.cell_c = (self._t(x) for x in cell[:3])
        self.cell_alpha, self.cell_beta, self.cell_gamma = (self._t(x) for x in cell[3:])
        if self.from_matrix:
            # the A matrix carries the wavelength it was indexed with
            self.reciprocal_matrix = torch.as_tensor(np.asarray(A_matrix) / wavelength_A, dtype=torch.float64,
                                                     device=self.device)
        self.A_orientation = self._t([0.0, 0.0, 0.0])
        misset = cfg.misset
        if random_misset is not None:
            misset = tuple(x / DEG for x in random_misset)
        self.misset = self._t(misset if misset is not None else (0.0, 0.0, 0.0))

        n, osc, step = auto_steps(None if cfg.phisteps is None else max(cfg.phisteps, 1),
                                  None if cfg.osc is None else cfg.osc,
                                  None if cfg.phistep is None else cfg.phistep, 1.0, endpoints=False)
        self.phisteps = n
        self.phi0 = self._t(cfg.phi0)
        self.osc = self._t(osc)
        self._phistep_given = cfg.phistep is not None and cfg.phistep > 0 or (cfg.osc is None and n > 1)
        self._phistep_value = step

        spread = cfg.mosaic_spread
        domains = cfg.mosaic_domains if cfg.mosaic_domains is not None else -1
        if domains <= 0:
            domains = 1 if spread is None or spread == 0.0 else 10
            spread = spread or 0.0
        elif spread is None or spread == 0.0:
            spread, domains = 0.0, 1
        self.mosaic_domains = domains
        self.mosaic_spread = self._t(spread)
        self._mosaic_on = spread > 0.0
        self._mosaic_draws = mosaic_draws  # [(axis, factor)] per domain, domain 0 is identity

        self.N = self._t(cfg.N)
        self.shape = cfg.shape
        self.fudge = self._t(cfg.fudge)
        self.default_F = self._t(cfg.default_F)
        self.hkl = hkl
        if hkl is not None:
            self.Fhkl = self._t(hkl.grid)
            self._hkl_min = (hkl.h_min, hkl.k_min, hkl.l_min)
        else:
            self.Fhkl = None
        interp = cfg.interpolate
        if interp is None:
            interp = bool(min(cfg.N) <= 2)
        self.interpolate = interp and hkl is not None
        self.auto_interpolate = cfg.interpolate is None

    # -- orientation
    def _cell_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real, reciprocal, volume) cell vectors as rows, after misset and before the
        spindle, in float64 (Angstrom, 1/Angstrom), built the original's way:
        for a -cell the real vectors get exactly the given lengths and the
        reciprocal ones follow from the cell-formula volume."""
        rot = ph.rotation_xyz(self.misset.double() * DEG) @ ph.rotation_vector_matrix(self.A_orientation.double())
        if self.from_matrix:
            recip = self.reciprocal_matrix.double() @ rot.transpose(-1, -2)
            real = ph.real_from_reciprocal(recip)
            v_star = ph.dot(recip[0], ph.cross(recip[1], recip[2]))
            recip = torch.stack([ph.cross(real[1], real[2]), ph.cross(real[2], real[0]),
                                 ph.cross(real[0], real[1])]) * v_star
            return real, recip, 1.0 / v_star
        lengths = torch.stack([self.cell_a, self.cell_b, self.cell_c]).double()
        angles = torch.stack([self.cell_alpha, self.cell_beta, self.cell_gamma]).double() * DEG
        recip, volume = ph.reciprocal_cell(lengths[0], lengths[1], lengths[2], angles[0], angles[1], angles[2])
        recip = recip @ rot.transpose(-1, -2)
        crosses = torch.stack([ph.cross(recip[1], recip[2]), ph.cross(recip[2], recip[0]),
                               ph.cross(recip[0], recip[1])])
        real = crosses / ph.norm(crosses).unsqueeze(-1) * lengths.unsqueeze(-1)
        recip = torch.stack([ph.cross(real[1], real[2]), ph.cross(real[2], real[0]),
                             ph.cross(real[0], real[1])]) / volume
        return real, recip, volume

    def volume(self) -> torch.Tensor:
        """Cell volume (A^3) the original uses: from the cell formula for -cell."""
        return self._cell_vectors()[2]

    def reciprocal_vectors(self) -> torch.Tensor:
        """a*, b*, c* (rows, 1/Angstrom, float64) after misset, before the spindle."""
        return self._cell_vectors()[1]

    def real_vectors(self) -> torch.Tensor:
        """a, b, c (rows, Angstrom, float64) after misset, before the spindle."""
        return self._cell_vectors()[0]

    def phi_angles(self) -> torch.Tensor:
        step = self._t(self._phistep_value) if self._phistep_given else self.osc / self.phisteps
        tic = self._t(list(range(self.phisteps)))
        return (self.phi0 + step * tic) * DEG

    def mosaic_matrices(self) -> torch.Tensor:
        eye = torch.eye(3, dtype=self.dtype, device=self.device)
        if not self._mosaic_on or self.mosaic_domains == 1:
            return eye.unsqueeze(0)
        mats = [eye]
        for axis, factor in self._mosaic_draws[1:]:
            angle = self.mosaic_spread * DEG * float(factor)
            mats.append(ph.rotation_axis_angle(self._t(axis), angle))
        return torch.stack(mats)

    def lattice_orientations(self) -> torch.Tensor:
        """Real cell vectors for every (phi step, mosaic domain): (phi*mos, 3, 3),
        rows a, b, c in Angstrom; mosaic applied after the spindle rotation."""
        real = self.real_vectors()
        axis = torch.as_tensor(self.spindle_axis, dtype=torch.float64, device=self.device)
        spin = ph.rotation_axis_angle(axis, self.phi_angles().double())  # (phi,3,3)
        mos = self.mosaic_matrices().double()  # (mos,3,3)
        full = mos.unsqueeze(0) @ spin.unsqueeze(1)  # (phi, mos, 3, 3)
        oriented = real.unsqueeze(0).unsqueeze(0) @ full.transpose(-1, -2)
        return oriented.reshape(-1, 3, 3).to(self.dtype)


# ----------------------------------------------------------------------------- detector

class Detector(_Model):
    """Pixel array, placement (conventions, pivots, rotations, two-theta),
    sensor absorption and sampling options."""

    def __init__(self, cfg: DetectorConfig, dtype=torch.float32, device="cpu", mask: np.ndarray | None = None,
                 notes: list[str] | None = None):
        self.dtype, self.device = dtype, torch.device(device)
        notes = notes if notes is not None else []
        px = cfg.pixel_size
        if not px > 0:
            raise InputError(f"pixel size must be positive, got {px:g} mm")
        detsize_f = px * cfg.fpixels if cfg.fpixels else cfg.detsize_f
        detsize_s = px * cfg.spixels if cfg.spixels else cfg.detsize_s
        self.fpixels = int(math.ceil(detsize_f / px - 0.5))
        self.spixels = int(math.ceil(detsize_s / px - 0.5))
        if self.fpixels <= 0 or self.spixels <= 0:
            raise InputError(f"detector has {self.fpixels}x{self.spixels} pixels; both must be positive")
        self.detsize_f, self.detsize_s = detsize_f, detsize_s
        self.convention = cfg.convention
        self.pivot = FORCED_PIVOT.get(cfg.convention, cfg.pivot)
        vecs = CONVENTION_VECTORS.get(cfg.convention, CUSTOM_START)
        if cfg.convention == "CUSTOM":
            chosen = dict(CUSTOM_START)
            for key, attr in (("f", "fdet_vector"), ("s", "sdet_vector"), ("o", "odet_vector"), ("tt", "twotheta_axis")):
                if getattr(cfg, attr) is not None:
                    chosen[key] = getattr(cfg, attr)
            vecs = chosen
            if cfg.pix0_vector is not None:
                notes.append("note: -pix0_vector selects the CUSTOM convention (no half-pixel offset); as in the "
                             "original, the detector origin is still derived from the beam centre and distance")
            else:
                notes.append("note: a custom detector or beam vector selects the CUSTOM convention, which drops "
                             "the MOSFLM half-pixel beam-centre offset")
        self.fdet0 = _unit(vecs["f"])
        self.sdet0 = _unit(vecs["s"])
        o = np.asarray(vecs["o"], dtype=np.float64)
        if np.linalg.norm(o) != 1.0:
            if np.linalg.norm(o) == 0:
                o = np.cross(self.fdet0, self.sdet0)
            o = _unit(o)
        self.odet0 = o
        self.twotheta_axis = _unit(vecs["tt"])

        # continuous parameters, in mm / degrees
        self.pixel_size = self._t(px)
        self.distance = self._t(cfg.distance)
        self.close_distance = None if cfg.close_distance is None else self._t(cfg.close_distance)
        self.rotation = self._t(cfg.rotation)
        self.twotheta = self._t(cfg.twotheta)

        # beam centre and near point, resolved per convention (mm)
        fclose = (cfg.ORGX - 0.5) * px if cfg.ORGX is not None else detsize_f / 2.0
        sclose = (cfg.ORGY - 0.5) * px if cfg.ORGY is not None else detsize_s / 2.0
        self.Xclose = cfg.Xclose if cfg.Xclose is not None else fclose
        self.Yclose = cfg.Yclose if cfg.Yclose is not None else sclose
        xb, yb = cfg.Xbeam, cfg.Ybeam
        conv = cfg.convention
        if conv == "ADXV":
            xb = (detsize_f + px) / 2.0 if xb is None else xb
            yb = (detsize_s - px) / 2.0 if yb is None else yb
        elif conv in ("MOSFLM", "DENZO"):
            xb = (detsize_s + px) / 2.0 if xb is None else xb
            yb = (detsize_f + px) / 2.0 if yb is None else yb
        else:
            xb = self.Xclose if xb is None else xb
            yb = self.Yclose if yb is None else yb
        self.beam_center = self._t([xb, yb])
        self.close_center = self._t([fclose, sclose])

        # sensor
        thick = cfg.thickness * 1e-6
        mu = None
        if cfg.attenuation_depth is not None:
            mu = 0.0 if cfg.attenuation_depth == 0 else 1.0 / (cfg.attenuation_depth * 1e-6)
        n = cfg.thicksteps if cfg.thicksteps is not None else -1
        # with a count the layers span the thickness end to end; without, two half-thickness layers
        layers, divisor = (2, 2) if n <= 0 else (max(n, 2), max(n, 2) - 1)
        if thick <= 0.0:
            layers, divisor, thick = 1, 1, 0.0
        self._layer_divisor = divisor
        if thick > 0.0 and mu is None:
            mu = 1.0 / thick
            notes.append(f"WARNING: setting detector attenuation depth to {mu:g} m")
        self.thicksteps = layers
        self.thickness = self._t(thick)
        self.attenuation_depth = self._t(1.0 / mu if mu else 0.0)
        self._mu_zero = mu == 0.0 if mu is not None else False
        self.mu_reported = -1.0 if mu is None else mu

        self.has_sensor = thick > 0.0
        self.curved = cfg.curved
        self.point_pixel = cfg.point_pixel
        self.oversample_thick = cfg.oversample_thick
        self.oversample_polar = cfg.oversample_polar
        self.oversample_omega = cfg.oversample_omega
        self.oversample = cfg.oversample  # resolved by the simulator when None or <= 0
        roi = cfg.roi or (-1, -1, -1, -1)
        self.roi = (roi[0] if roi[0] >= 0 else 0, roi[1] if roi[1] >= 0 else self.fpixels,
                    roi[2] if roi[2] >= 0 else 0, roi[3] if roi[3] >= 0 else self.spixels)
        self.mask = mask
        self.dmin = cfg.dmin

    # -- geometry
    def layer_step(self) -> torch.Tensor:
        return self.thickness / self._layer_divisor

    def mu(self) -> torch.Tensor:
        if self._mu_zero:
            return torch.zeros_like(self.thickness)
        return 1.0 / self.attenuation_depth

    def initial_centres(self):
        """(Fbeam, Sbeam, Fclose, Sclose) in metres before any rotation."""
        px = self.pixel_size.double() / 1000.0
        bc, cc = self.beam_center.double() / 1000.0, self.close_center.double() / 1000.0
        xb, yb, fclose, sclose = bc[0], bc[1], cc[0], cc[1]
        conv = self.convention
        if conv == "ADXV":
            return xb, self.detsize_s / 1000.0 - yb, fclose, sclose
        if conv == "MOSFLM":
            return yb + 0.5 * px, xb + 0.5 * px, fclose, sclose
        if conv == "DENZO":
            return yb, xb, fclose, sclose
        if conv == "CUSTOM":
            return xb, yb, xb, yb
        return xb, yb, fclose, sclose

    def geometry(self, beam_direction, dtype=None) -> dict[str, torch.Tensor]:
        """Detector frame, origin and derived beam centres, all in metres;
        derived in float64 and returned in `dtype` (default: the model's)."""
        f64 = torch.float64
        t = lambda v: torch.as_tensor(v, dtype=f64, device=self.device)
        beam = t(beam_direction)
        rot = ph.rotation_xyz(self.rotation.double() * DEG)
        tt = ph.rotation_axis_angle(t(self.twotheta_axis), self.twotheta.double() * DEG)
        f0, s0, o0 = t(self.fdet0), t(self.sdet0), t(self.odet0)
        ratio = ph.dot(beam, ph.rotate(rot, o0))
        ratio = torch.where(ratio == 0, torch.full_like(ratio, 2.2250738585072014e-308), ratio)
        if self.close_distance is None:
            close = torch.abs(ratio * self.distance.double() / 1000.0)
        else:
            close = self.close_distance.double() / 1000.0
        distance = close / ratio
        fbeam, sbeam, fclose, sclose = self.initial_centres()
        full = tt @ rot
        fdet, sdet, odet = ph.rotate(full, f0), ph.rotate(full, s0), ph.rotate(full, o0)
        if self.pivot == "SAMPLE":
            pix0 = ph.rotate(full, -fclose * f0 - sclose * s0 + close * o0)
        else:
            pix0 = -fbeam * fdet - sbeam * sdet + distance * beam
        fclose_out = -ph.dot(pix0, fdet)
        sclose_out = -ph.dot(pix0, sdet)
        close_out = ph.dot(pix0, odet)
        hit = close_out / ratio * beam - pix0
        geo = dict(fdet=fdet, sdet=sdet, odet=odet, pix0=pix0, beam=beam,
                   Fbeam=ph.dot(fdet, hit), Sbeam=ph.dot(sdet, hit),
                   Fclose=fclose_out, Sclose=sclose_out, close_distance=close_out,
                   distance=close_out / ratio, ratio=ratio)
        return {k: v.to(dtype or self.dtype) for k, v in geo.items()}
