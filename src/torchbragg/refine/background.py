"""A smooth background for measured frames: a radial profile.

Air, solvent and sample-holder scatter fall off with the scattering angle,
so on a real detector the background varies several times from the beam to
the corners; one constant per panel fits it badly and leaves the spots on a
tilted floor. `RadialBackground` is a piecewise-linear function of the
scattering angle 2theta, its values at `knots` angles spread over the
detector's range, shared by every panel (the same scatter reaches them
all), 1 photon per pixel per unit, starting from the medians of the data
outside the spots (`start_from`).
"""

from __future__ import annotations

import torch

from .centroids import geometry
from .parameters import Group


def pixel_two_theta(sim) -> torch.Tensor:
    """Scattering angle (radians) of every pixel centre, (panels, slow, fast),
    from the simulator's current geometry (no gradient)."""
    with torch.no_grad():
        _, inc, _, _, origin, fast, slow, _, pixel = geometry(sim, {})
        out = []
        for k, panel in enumerate(sim.detector.panels):
            dtype = origin.dtype
            f = (torch.arange(panel.fpixels, dtype=dtype) + 0.5) * pixel[k, 0].to(dtype)
            s = (torch.arange(panel.spixels, dtype=dtype) + 0.5) * pixel[k, 1].to(dtype)
            pos = origin[k] + s[:, None, None] * slow[k] + f[None, :, None] * fast[k]
            cos = (pos @ inc.to(dtype)) / torch.linalg.norm(pos, dim=-1)
            out.append(torch.arccos(torch.clamp(cos, -1.0, 1.0)))
        return torch.stack(out).double()


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
