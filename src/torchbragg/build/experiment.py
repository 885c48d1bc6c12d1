"""Factory: a DIALS experiment plus nanoBragg flags (for the physics an
experiment file does not hold) -> Simulator."""

from __future__ import annotations

import copy

from ..config import SimulationConfig
from ..errors import InputError


def build_from_experiment(experiment, cfg: SimulationConfig | None = None, dtype=None, device=None,
                          chunk_elements=None):
    """A Simulator for a dials.Experiment; `cfg` (nanoBragg flags parsed into a
    SimulationConfig) supplies what the experiment does not say. Returns
    (simulator, BuildInfo)."""
    import torch

    from ..models import Crystal
    from .nanobragg import BuildInfo, _device, make_beam, make_crystal, read_inputs, render_options
    from ..simulator import Simulator

    cfg = cfg or SimulationConfig()
    dtype, device = _device(cfg, dtype, device)
    info = BuildInfo(cfg, messages=list(cfg.notes))
    if experiment.crystal is None:
        raise InputError("the experiment has no crystal: index it first, or give one in the file")
    table, sources, mask = read_inputs(cfg, info)
    f64 = torch.float64
    src = experiment.beam
    with torch.no_grad():
        travel, e_vector = src.incident().cpu().numpy(), src.e_vector().cpu().numpy()
        fraction = float(src.polarization_fraction)
    beam = make_beam(cfg, info, sources, travel, e_vector, float(src.wavelength), fraction, device)
    given = experiment.crystal
    probe = Crystal(given.cell, given.U, misset=given.misset, space_group=given.space_group, setting=given.setting,
                    dtype=f64, device=device)
    crystal = make_crystal(cfg, info, probe, table, device)
    # copies: the experiment's own models keep their precision whatever the render dtype
    detector = copy.deepcopy(experiment.detector).to(device=device, dtype=f64)
    if mask is not None:
        if len(detector.panels) != 1:
            raise InputError("-mask applies to single-panel detectors; this one has %d panels" % len(detector.panels))
        try:
            detector.panels[0].set_mask(mask)
        except ValueError as exc:
            raise InputError(f"-mask {cfg.detector.mask_file}: {exc}") from None
    with torch.no_grad():
        absorbing = all(float(p.thickness) > 0 and float(p.mu) > 0 for p in detector.panels)
        depth = max(float(p.thickness * p.mu) for p in detector.panels)
    # a DIALS panel's thickness and mu: the physical parallax by default; rotation steps at their middles,
    # DIALS's frame convention
    options = render_options(cfg, absorbing, chunk_elements, default_parallax="physical", optical_depth=depth)
    options.phisteps = max(cfg.crystal.phisteps or 1, 1)
    options.phi_midpoints = True
    goniometer = None if experiment.goniometer is None else copy.deepcopy(experiment.goniometer).to(device, f64)
    scan = None if experiment.scan is None else copy.deepcopy(experiment.scan).to(device, f64)
    sim = Simulator(beam, crystal, detector, goniometer, scan, options)
    return sim.to(dtype), info
