"""Factory: a DIALS experiment plus nanoBragg flags (for the physics an
experiment file does not hold) -> Simulator."""

from __future__ import annotations

import copy
import math

import torch

from ..config import SimulationConfig
from ..errors import InputError
from ..models import Crystal
from ..resolve import ExperimentGeometry, Resolved
from ..simulator import Simulator, nearest_panel
from ..validate import check_experiment
from .nanobragg import BuildInfo, make_beam, make_crystal, read_inputs, render_options, resolve_device


# the domain size is continuous in the model (a refinement writes -N 9.69); the
# nanoBragg command keeps the original's integer reading
DOMAIN_FLAGS = ("-N", "-Na", "-Nb", "-Nc")


def parse_experiment_flags(argv: list[str]) -> SimulationConfig:
    """nanoBragg flags for the experiment path (simulate, refine, datasets):
    as the nanoBragg command reads them, except that -N, -Na, -Nb and -Nc
    take any number >= 1."""
    from ..flags import COUNT_RULE, parse_args
    argv = list(argv)
    given = []
    for i, name in enumerate(argv[:-1]):
        if name in DOMAIN_FLAGS:
            text = argv[i + 1]
            try:
                v = float(text)
            except ValueError:
                raise InputError(f"{name} expects a number, got '{text}'") from None
            if not math.isfinite(v):
                raise InputError(f"{name} expects a finite number, got '{text}'")
            if v < 1:
                raise InputError(f"{name} {v:g} is not allowed ({COUNT_RULE})")
            given.append((name, v))
            argv[i + 1] = "1"  # parsed here; the registry checks the rest
    cfg = parse_args(argv)
    if given:
        n = list(SimulationConfig().crystal.N)
        for name, v in given:
            for axis in (range(3) if name == "-N" else ["abc".index(name[-1])]):
                n[axis] = v
        cfg.crystal.N = tuple(n)
    return cfg


def experiment_geometry(experiment) -> ExperimentGeometry:
    """What resolution needs of an experiment, in plain numbers (float64)."""
    if experiment.crystal is None:
        raise InputError("the experiment has no crystal: index it first, or give one in the file")
    with torch.no_grad():
        detector = experiment.detector
        distance, pixel = nearest_panel(experiment.beam, detector)
        lengths = torch.linalg.norm(experiment.crystal.real_vectors().double(), dim=-1).tolist()
        absorbing = all(float(p.thickness) > 0 and float(p.mu) > 0 for p in detector.panels)
        depth = max(float(p.thickness * p.mu) for p in detector.panels)
        return ExperimentGeometry(panels=tuple((p.fpixels, p.spixels) for p in detector.panels),
                                  wavelength=float(experiment.beam.wavelength), cell_lengths=tuple(lengths),
                                  nearest=(distance / 1000.0, pixel / 1000.0), absorbing=absorbing,
                                  optical_depth=depth)


def check_experiment_flags(experiment, cfg: SimulationConfig | None = None) -> Resolved:
    """Refuse what the nanoBragg command refuses, with the same message, for
    this experiment and these flags; return the resolved numbers."""
    return check_experiment(cfg or SimulationConfig(), experiment_geometry(experiment))


def build_from_experiment(experiment, cfg: SimulationConfig | None = None, dtype=None, device=None,
                          chunk_elements=None, background: dict | None = None, direct_beam: bool = True):
    """A Simulator for a dials.Experiment; `cfg` (nanoBragg flags parsed into a
    SimulationConfig) supplies what the experiment does not say; `background`:
    keywords of `Background.from_stol` (path, thickness, ...) for an amorphous
    background added to the Bragg image. direct_beam=False gives the 0 0 0
    reflection no amplitude (-default_F gives it one, as nanoBragg does): a
    model fitted to measured frames must not put a spot where the beamstop
    is. Returns (simulator, BuildInfo)."""
    cfg = cfg or SimulationConfig()
    resolved = check_experiment_flags(experiment, cfg)
    dtype, device = resolve_device(cfg, dtype, device)
    info = BuildInfo(cfg, messages=list(cfg.notes))
    table, sources, mask = read_inputs(cfg, info, space_group=experiment.crystal.space_group)
    f64 = torch.float64
    src = experiment.beam
    with torch.no_grad():
        travel, e_vector = src.incident().cpu().numpy(), src.e_vector().cpu().numpy()
        fraction = float(src.polarization_fraction)
    beam = make_beam(cfg, info, resolved.beam, sources, travel, e_vector, float(src.wavelength), fraction, device)
    given = experiment.crystal
    probe = Crystal(given.cell, given.U, misset=given.misset, space_group=given.space_group, setting=given.setting,
                    dtype=f64, device=device)
    crystal = make_crystal(cfg, info, resolved, probe, table, device)
    if not direct_beam:
        crystal.structure_factors = crystal.structure_factors.without_direct_beam()
    # copies: the experiment's own models keep their precision whatever the render dtype
    detector = copy.deepcopy(experiment.detector).to(device=device, dtype=f64)
    if mask is not None:
        if len(detector.panels) != 1:
            raise InputError("-mask applies to single-panel detectors; this one has %d panels" % len(detector.panels))
        try:
            detector.panels[0].set_mask(mask)
        except ValueError as exc:
            raise InputError(f"-mask {cfg.detector.mask_file}: {exc}") from None
    options = render_options(cfg, resolved, chunk_elements)
    options.phi_midpoints = True  # DIALS's frame convention: rotation steps sampled at their middles
    goniometer = None if experiment.goniometer is None else copy.deepcopy(experiment.goniometer).to(device, f64)
    scan = None if experiment.scan is None else copy.deepcopy(experiment.scan).to(device, f64)
    amorphous = None
    if background is not None:
        from ..models import Background
        amorphous = Background.from_stol(**background, dtype=f64, device=device)
        info.messages.extend(f"WARNING: {w}" for w in amorphous.warnings)
    sim = Simulator(beam, crystal, detector, goniometer, scan, options, background=amorphous)
    return sim.to(dtype), info
