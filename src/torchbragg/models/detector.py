"""The detector: panels (pixel arrays with a sensor) placed by frames, and
an optional hierarchy of panel groups whose frames compose down to the
panels, as dxtbx describes detectors. Lengths in mm."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import physics as ph
from ..units import DEG, unit_vector
from ._base import Model



class Frame(Model):
    """A right-handed frame: `origin` (mm) and fast and slow axes, each the
    starting axis turned by the rotation vector `orientation` (radians) about
    the origin. The normal is fast x slow."""

    def __init__(self, origin=(0.0, 0.0, 0.0), fast_axis=(1.0, 0.0, 0.0), slow_axis=(0.0, 1.0, 0.0), *,
                 orientation=(0.0, 0.0, 0.0), dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self._param("origin", origin)
        self._param("orientation", orientation)
        self._buffer("fast0", unit_vector(fast_axis))
        self._buffer("slow0", unit_vector(slow_axis))

    def forward(self, incident=None):
        """(origin, fast, slow, normal) in the parent frame."""
        rot = ph.rotation_vector_matrix(self.orientation)
        fast, slow = ph.rotate(rot, self.fast0.to(rot)), ph.rotate(rot, self.slow0.to(rot))
        return self.origin, fast, slow, ph.cross(fast, slow)


class DistanceMount(Model):
    """A detector placed the nanoBragg way: at `distance` (mm) along the beam,
    turned by `rotation` (degrees about x, y, z, in that order) and then by
    `twotheta` about `twotheta_axis`, pivoting about the direct-beam spot
    ("BEAM": the beam meets the detector at `beam_center`, (fast, slow) mm
    from the origin) or about the sample ("SAMPLE": before the rotations the
    point nearest the sample is at `close_center`). With `close_distance`
    given, the distance along the normal is that instead of derived."""

    def __init__(self, fast_axis, slow_axis, normal, twotheta_axis, *, distance=100.0, beam_center=(0.0, 0.0),
                 close_center=(0.0, 0.0), rotation=(0.0, 0.0, 0.0), twotheta=0.0, close_distance=None,
                 pivot: str = "BEAM", dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        if pivot not in ("BEAM", "SAMPLE"):
            raise ValueError(f"pivot must be BEAM or SAMPLE, not {pivot!r}")
        self.pivot = pivot
        for name, v in (("fast0", fast_axis), ("slow0", slow_axis), ("normal0", normal),
                        ("twotheta_axis", twotheta_axis)):
            self._buffer(name, unit_vector(v), dtype=torch.float64)
        self._param("distance", distance)
        self._param("beam_center", beam_center)
        self._param("close_center", close_center)
        self._param("rotation", rotation)
        self._param("twotheta", twotheta)
        self.has_close_distance = close_distance is not None
        if self.has_close_distance:
            self._param("close_distance", close_distance)

    def geometry(self, incident) -> dict[str, torch.Tensor]:
        """Frame, origin (pix0) and the derived beam centre, near point and
        distances the original reports, in mm, float64."""
        beam = incident.double()
        rot = ph.rotation_xyz(self.rotation.double() * DEG)
        tt = ph.rotation_axis_angle(self.twotheta_axis.double(), self.twotheta.double() * DEG)
        f0, s0, o0 = self.fast0.double(), self.slow0.double(), self.normal0.double()
        ratio = ph.dot(beam, ph.rotate(rot, o0))
        ratio = torch.where(ratio == 0, torch.full_like(ratio, 2.2250738585072014e-308), ratio)
        if self.has_close_distance:
            close = self.close_distance.double()
        else:
            close = torch.abs(ratio * self.distance.double())
        full = tt @ rot
        fdet, sdet, odet = ph.rotate(full, f0), ph.rotate(full, s0), ph.rotate(full, o0)
        if self.pivot == "SAMPLE":
            fclose, sclose = self.close_center.double()
            pix0 = ph.rotate(full, -fclose * f0 - sclose * s0 + close * o0)
        else:
            fbeam, sbeam = self.beam_center.double()
            pix0 = -fbeam * fdet - sbeam * sdet + close / ratio * beam
        close_out = ph.dot(pix0, odet)
        hit = close_out / ratio * beam - pix0
        return dict(fdet=fdet, sdet=sdet, odet=odet, pix0=pix0, beam=beam,
                    Fbeam=ph.dot(fdet, hit), Sbeam=ph.dot(sdet, hit),
                    Fclose=-ph.dot(pix0, fdet), Sclose=-ph.dot(pix0, sdet), close_distance=close_out,
                    distance=close_out / ratio, ratio=ratio)

    def forward(self, incident):
        g = self.geometry(incident)
        return tuple(g[k].to(self.dtype) for k in ("pix0", "fdet", "sdet", "odet"))




class Panel(Model):
    """A pixel array: `frame` places its first pixel's outer corner (origin)
    and its fast and slow axes; `image_size` (fast, slow) pixels of
    `pixel_size` (fast, slow) mm; a sensor `thickness` (mm) with attenuation
    coefficient `mu` (1/mm); optional `mask` (slow, fast) of pixels to skip.
    `extras` keeps file fields torchbragg does not use."""

    def __init__(self, frame: nn.Module, image_size: Sequence[int], pixel_size=(0.1, 0.1), *, thickness=0.0,
                 mu=0.0, trusted_range=(-1.0, 1e9), name: str = "", material: str = "", mask=None,
                 extras: dict | None = None, dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self.frame = frame
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if min(self.image_size) <= 0:
            raise ValueError(f"panel {name!r} has {self.image_size[0]}x{self.image_size[1]} pixels; "
                             "both must be positive")
        self._param("pixel_size", pixel_size)
        self._param("thickness", thickness)
        self._param("mu", mu)
        self.trusted_range = tuple(float(x) for x in trusted_range)
        self.name, self.material = name, material
        self.extras = dict(extras or {})
        self.register_buffer("mask", None)
        if mask is not None:
            self.set_mask(mask)

    def set_mask(self, mask) -> None:
        """Pixels to render (non-zero) and to skip (0), shape (slow, fast) or flat."""
        mask = np.asarray(mask)
        if mask.size != self.image_size[0] * self.image_size[1]:
            raise ValueError(f"mask has {mask.size} pixels but panel {self.name!r} has "
                             f"{self.image_size[0]}x{self.image_size[1]}")
        self.mask = torch.as_tensor(mask != 0, device=self.device).reshape(self.image_size[1], self.image_size[0])

    @property
    def fpixels(self) -> int:
        return self.image_size[0]

    @property
    def spixels(self) -> int:
        return self.image_size[1]


class PanelGroup(Model):
    """A node of the hierarchy: a frame and children, each a PanelGroup or the
    index of a panel. A child's origin and axes are given in this group's
    frame (columns fast, slow, normal), as dxtbx stores them."""

    def __init__(self, frame: nn.Module, children: Sequence, *, name: str = "", extras: dict | None = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        self.frame = frame
        self.groups = nn.ModuleList([c for c in children if isinstance(c, PanelGroup)])
        # the children in file order: panel indices and ("group", k) for self.groups[k]
        order, gi = [], 0
        for c in children:
            if isinstance(c, PanelGroup):
                order.append(("group", gi))
                gi += 1
            else:
                order.append(int(c))
        self.children_order = order
        self.name = name
        self.extras = dict(extras or {})


def _compose(parent, child):
    """Child frame given in the parent's frame -> lab frame."""
    po, pf, ps, pn = parent
    o, f, s, n = child
    m = torch.stack([pf, ps, pn], -1)  # columns
    return po + m @ o, m @ f, m @ s, m @ n


class Detector(Model):
    """Panels and an optional hierarchy of groups above them."""

    def __init__(self, panels: Sequence[Panel], hierarchy: PanelGroup | None = None, *, extras: dict | None = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(dtype, device)
        if not panels:
            raise ValueError("a detector needs at least one panel")
        self.panels = nn.ModuleList(panels)
        self.hierarchy = hierarchy
        self.extras = dict(extras or {})
        if hierarchy is not None:
            found = sorted(self._panels_under(hierarchy))
            if found != list(range(len(panels))):
                raise ValueError(f"the hierarchy names panels {found}, the detector has 0..{len(panels) - 1}")

    def _panels_under(self, group):
        for c in group.children_order:
            if isinstance(c, int):
                yield c
            else:
                yield from self._panels_under(group.groups[c[1]])

    def __len__(self) -> int:
        return len(self.panels)

    def panel_frames(self, incident) -> tuple[torch.Tensor, ...]:
        """(origin, fast, slow, normal), each (panels, 3), in the lab frame (mm);
        the normal points away from the sample."""
        frames: list = [None] * len(self.panels)

        def walk(group, parent):
            here = group.frame(incident)
            if parent is not None:
                here = _compose(parent, here)
            for c in group.children_order:
                if isinstance(c, int):
                    frames[c] = _compose(here, self.panels[c].frame(incident))
                else:
                    walk(group.groups[c[1]], here)

        if self.hierarchy is None:
            frames = [p.frame(incident) for p in self.panels]
        else:
            walk(self.hierarchy, None)
        origin, fast, slow, normal = (torch.stack(x) for x in zip(*frames))
        away = torch.where(ph.dot(origin, normal) < 0, -1.0, 1.0).to(normal)
        return origin, fast, slow, normal * away.unsqueeze(-1)
