"""The nanoBragg factory: a configuration (or the original's flags) becomes
models and a Simulator. The original's conventions, defaults, beam-centre
rules and random draws live here, not in the models."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import rng
from ..config import SimulationConfig
from ..errors import InputError
from ..flags import parse_args
from ..models import Beam, Crystal, Detector, DistanceMount, Goniometer, Panel, Scan, StructureFactors
from ..resolve import BeamSampling, Placement, RenderOptions, Resolved, clipped_sizes, crystal_cells
from ..units import DEG, unit_vector
from ..validate import check_config, check_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}

@dataclass
class BuildInfo:
    """What the command line reports about a run besides the image: messages,
    seeds, and the values as the original resolved and prints them."""
    config: SimulationConfig
    messages: list[str] = field(default_factory=list)
    noise_seed: int = 0  # stored (negative) value
    hkl_count: int = 0
    random_misset: tuple | None = None
    convention: str = "MOSFLM"
    detsize: tuple[float, float] = (0.0, 0.0)  # mm
    beam_center: tuple[float, float] = (0.0, 0.0)  # Xbeam, Ybeam as given or defaulted, mm
    near_point: tuple[float, float] = (0.0, 0.0)  # Xclose, Yclose, mm
    mu_reported: float = -1.0  # 1/m
    divergence: dict = field(default_factory=dict)  # per axis: n, range, step (radians)
    n_divergence: int = 1
    phi_range: tuple[float, float] = (0.0, 0.0)  # phi0, osc (degrees)
    auto_interpolate: bool = False
    roi: tuple[int, int, int, int] = (0, 0, 0, 0)
    dtype: object = None  # the torch dtype to render in


# ----------------------------------------------------------------------------- headers

def header_defaults(argv: list[str]) -> SimulationConfig:
    """Geometry from the headers of -mask and -img files; the flags are applied
    on top. The mask is read first, so the image header wins."""
    cfg = SimulationConfig()
    pre = parse_args(argv)  # only to learn the file names
    for path, is_mask in ((pre.detector.mask_file, True), (pre.detector.img_file, False)):
        if path is None:
            continue
        from ..io.smv import read_smv
        header, data = read_smv(path)
        apply_header(cfg, header, data.shape, is_mask)
    return cfg


def _header_float(header, key):
    try:
        return float(header[key])
    except (KeyError, ValueError):
        return None


def apply_header(cfg: SimulationConfig, header: dict, shape, is_mask: bool) -> None:
    d = cfg.detector
    spix, fpix = shape
    d.fpixels, d.spixels = int(fpix), int(spix)
    v = _header_float(header, "PIXEL_SIZE")
    if v is not None:
        d.pixel_size = v
    detsize_s = d.pixel_size * d.spixels
    for key, attr in (("DISTANCE", "distance"), ("CLOSE_DISTANCE", "close_distance"),
                      ("BEAM_CENTER_X", "Xbeam"), ("ORGX", "ORGX"), ("ORGY", "ORGY")):
        v = _header_float(header, key)
        if v is not None:
            setattr(d, attr, v)
    v = _header_float(header, "BEAM_CENTER_Y")
    if v is not None:
        # a mask's Y centre is counted from the other edge
        d.Ybeam = detsize_s - v if is_mask else v
    v = _header_float(header, "WAVELENGTH")
    if v is not None:
        cfg.beam.wavelength = v
    v = _header_float(header, "PHI")
    if v is not None:
        cfg.crystal.phi0 = v
    v = _header_float(header, "OSC_RANGE")
    if v is not None:
        cfg.crystal.osc = v
    # TWOTHETA in a header is read by the original into a variable it never uses.


# ----------------------------------------------------------------------------- models

def make_detector(cfg: SimulationConfig, info: BuildInfo, placement: Placement, mask, dtype, device) -> Detector:
    """One panel placed by a DistanceMount at the resolved beam centre and pivot."""
    d = cfg.detector
    px = placement.pixel_size
    fpixels, spixels = placement.fpixels, placement.spixels
    if placement.convention == "CUSTOM":
        if d.pix0_vector is not None:
            info.messages.append("note: -pix0_vector selects the CUSTOM convention (no half-pixel offset); as in "
                                 "the original, the detector origin is still derived from the beam centre and distance")
        else:
            info.messages.append("note: a custom detector or beam vector selects the CUSTOM convention, which "
                                 "drops the MOSFLM half-pixel beam-centre offset")
    vecs = placement.vectors
    fast, slow = unit_vector(vecs["f"]), unit_vector(vecs["s"])
    normal = np.asarray(vecs["o"], dtype=np.float64)
    if np.linalg.norm(normal) == 0:
        normal = np.cross(fast, slow)
    normal = unit_vector(normal)
    info.convention, info.detsize = placement.convention, placement.detsize
    info.beam_center, info.near_point = placement.beam_center, placement.near_point

    thick = d.thickness * 1e-3  # um -> mm
    mu = None
    if d.attenuation_depth is not None:
        mu = 0.0 if d.attenuation_depth == 0 else 1.0 / (d.attenuation_depth * 1e-3)
    if thick <= 0.0:
        thick = 0.0
    elif mu is None:
        mu = 1.0 / thick
        info.messages.append(f"WARNING: setting detector attenuation depth to {mu * 1e3:g} m")
    info.mu_reported = -1.0 if mu is None else mu * 1e3

    mount = DistanceMount(fast, slow, normal, vecs["tt"], distance=d.distance, beam_center=placement.beam_spot,
                          close_center=placement.close_spot, rotation=d.rotation, twotheta=d.twotheta,
                          close_distance=d.close_distance, pivot=placement.pivot, dtype=dtype, device=device)
    if mask is not None and mask.size != fpixels * spixels:
        raise InputError(f"mask {d.mask_file} has {mask.size} pixels but the detector has {fpixels}x{spixels}")
    panel = Panel(mount, (fpixels, spixels), (px, px), thickness=thick, mu=mu or 0.0, mask=mask,
                  dtype=dtype, device=device)
    return Detector([panel], dtype=dtype, device=device)


def make_beam(cfg: SimulationConfig, info: BuildInfo, sampling: BeamSampling, sources, travel, e_vector,
              wavelength: float, polarization_fraction: float, device) -> Beam:
    """A beam travelling along `travel` with E-vector `e_vector`, with the
    resolved spectrum and divergence and the configuration's fluence and
    water (float64)."""
    b = cfg.beam
    n, disp = sampling.dispersion
    div, kept = sampling.divergence, list(sampling.divergence_points)
    info.divergence = div
    info.n_divergence = -1 if sources is not None else len(kept)
    fluence = b.fluence
    if b.flux != 0.0 and b.exposure > 0.0 and b.beamsize >= 0:
        size = b.beamsize * 1e-3
        fluence = b.flux * b.exposure / (size * size)
    table = {}
    if sources is not None:
        rows = np.asarray(sources, dtype=np.float64).reshape(-1, 5)
        table = dict(source_positions=rows[:, :3], source_wavelengths=rows[:, 4] * 1e10)
    return Beam(-travel, wavelength, polarization_fraction=polarization_fraction,
                polarization_normal=np.cross(travel, e_vector), fluence=fluence, dispersion=disp,
                dispersion_steps=n, divergence=(div["h"]["range"], div["v"]["range"]),
                divergence_steps=(div["h"]["n"], div["v"]["n"]),
                divergence_step=tuple(div[a]["step"] if div[a]["step_given"] else None for a in "hv"),
                divergence_points=kept, water_size=b.water_size * 1e-6, dtype=torch.float64, device=device,
                **table)


def models_from_args(argv: list[str], dtype=None, device=None, **kw):
    base = header_defaults(argv) if any(a in ("-img", "-mask") for a in argv) else None
    cfg = parse_args(argv) if base is None else parse_args(argv, base)
    return models_from_config(cfg, dtype=dtype, device=device, **kw)


def resolve_device(cfg, dtype=None, device=None):
    """(dtype, device) of a build: the arguments, else the configuration's."""
    check_device(str(device if device is not None else cfg.device))
    dtype = dtype or DTYPES[cfg.dtype]
    device = torch.device(device or cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available")
    return dtype, device


def read_inputs(cfg: SimulationConfig, info: BuildInfo, write_dump: bool = False, space_group: str | None = None):
    """(structure-factor table or None, source rows or None, mask or None) from
    the files the configuration names. `space_group`: the crystal's, when an
    experiment gives it: a DIALS reflection table is expanded over it."""
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    table = None
    given = [(flag, path) for flag, path in (("-hkl", c.hkl_file), ("-mtz", c.mtz_file), ("-model", c.model_file))
             if path is not None]
    if len(given) > 1:
        raise InputError(f"give one source of structure factors, not {' and '.join(f for f, _ in given)}")
    if c.mtz_column is not None and c.mtz_file is None:
        raise InputError("-mtz_column selects a column of -mtz FILE; give -mtz")
    if c.model_dmin is not None and c.model_file is None:
        raise InputError("-model_dmin sets the resolution of -model FILE; give -model")
    if given:
        from ..io.hkl import write_fdump
        if c.hkl_file is not None and c.hkl_file.lower().endswith((".refl", ".json")):
            from ..io.structure_factors import read_dials_reflections
            table = read_dials_reflections(c.hkl_file, default_F=c.default_F, space_group=space_group)
            info.messages.append(f"reading {table.read} reflections from the DIALS table {c.hkl_file}, "
                                 f"F = sqrt(<{table.columns[0]}>), {table.count} with symmetry (space group "
                                 f"{table.space_group}) and Friedel mates")
        elif c.hkl_file is not None:
            from ..io.hkl import read_hkl
            table = read_hkl(c.hkl_file, default_F=c.default_F)
        else:
            from ..io import structure_factors as sfio
            if c.mtz_file is not None:
                table = sfio.read_mtz(c.mtz_file, c.mtz_column, default_F=c.default_F)
                what = "column " + "/".join(table.columns) + (" (anomalous pair)" if table.anomalous else "")
                info.messages.append(f"reading {table.read} reflections from {c.mtz_file}, {what}, "
                                     f"space group {table.space_group}")
            else:
                dmin = c.model_dmin if c.model_dmin is not None else (
                    d.dmin if d.dmin and d.dmin > 0 else sfio.DEFAULT_MODEL_DMIN)
                table = sfio.model_structure_factors(c.model_file, dmin, default_F=c.default_F)
                info.messages.append(f"computed {table.read} structure factors of {c.model_file} to {dmin:g} A, "
                                     f"space group {table.space_group}")
            info.messages.append(f"  {table.count} reflections in P1 after symmetry expansion")
            if c.cell is not None and sfio.cell_mismatch(table.cell, c.cell):
                info.messages.append("WARNING: the structure factors' cell %s differs from -cell %s"
                                     % (" ".join("%g" % x for x in table.cell), " ".join("%g" % x for x in c.cell)))
        info.hkl_count = table.count
        info.messages.extend(table.warnings)
        source = given[0][1]
        if write_dump and os.path.realpath(c.dump_file) == os.path.realpath(source):
            info.messages.append(f"WARNING: not writing the dump file over the input {source}")
        elif write_dump:
            try:
                write_fdump(c.dump_file, table)
                info.messages.append(f"writing dump file for next time: {c.dump_file}")
            except OSError as exc:
                info.messages.append(f"WARNING: unable to open dump file: {c.dump_file} ({exc.strerror})")
    elif os.path.exists(c.dump_file):
        from ..io.hkl import read_fdump
        table = read_fdump(c.dump_file)
        info.hkl_count = int(np.prod(table.grid.shape))
        info.messages.append(f"reading Fs from {c.dump_file}")
    elif c.default_F == 0.0:
        raise InputError("no structure factors: give -hkl FILE, -mtz FILE, -model FILE, -default_F F, "
                         "or run where Fdump.bin exists")

    sources = None
    if b.source_file is not None:
        from ..io.sources import read_sources
        sources = read_sources(b.source_file)

    mask = None
    if d.mask_file is not None:
        from ..io.smv import read_smv
        _, mask_data = read_smv(d.mask_file)
        mask = np.asarray(mask_data).reshape(-1)
    return table, sources, mask


def make_crystal(cfg: SimulationConfig, info: BuildInfo, resolved: Resolved, probe: Crystal, table,
                 device) -> Crystal:
    """The crystal of `probe` (cell, U and misset, float64) with the size,
    resolved mosaic domains, spot shape and structure factors the
    configuration asks for."""
    c, b = cfg.crystal, cfg.beam
    sizes, clipped = clipped_sizes(cfg)
    for i in clipped:
        info.messages.append("WARNING: clipping sample (%g m %s) with beam (%g m)"
                             % (c.sample_size[i] * 1e-3, "high" if i == 1 else "wide", b.beamsize * 1e-3))
    # the cell counts are integer decisions taken from the model's own cell lengths, as the original's
    n_cells = c.N
    if any(s is not None and s > 0 for s in sizes):
        with torch.no_grad():
            n_cells = crystal_cells(cfg, torch.linalg.norm(probe.real_vectors(), dim=-1).tolist())
    n_cells = tuple(max(x, 1.0) for x in n_cells)

    spread, domains = resolved.mosaic_spread, resolved.mosaic_domains
    axes = factors = None
    if spread > 0.0 and domains > 1:
        draws = rng.mosaic_domain_draws(c.mosaic_spread * math.pi / 180.0, domains, -c.mosaic_seed)
        axes = np.array([np.asarray(a, dtype=np.float64) for a, _ in draws])
        factors = np.array([0.0] + [float(f) for _, f in draws[1:]])
        axes[0] = (1.0, 0.0, 0.0)

    # the original picks interpolation from the -N flags, before a sample size sets N
    interpolate = c.interpolate if c.interpolate is not None else min(c.N) <= 2
    info.auto_interpolate = c.interpolate is None
    f64 = torch.float64
    if table is not None:
        sf = StructureFactors(table.grid, (table.h_min, table.k_min, table.l_min), c.default_F,
                              "tricubic" if interpolate else "nearest", dtype=f64, device=device)
    else:
        sf = StructureFactors(default_F=c.default_F, dtype=f64, device=device)
    return Crystal(probe.cell, probe.U, misset=probe.misset, N=n_cells, mosaic_spread=spread, mosaic_axes=axes,
                   mosaic_factors=factors, shape=c.shape, fudge=c.fudge, structure_factors=sf,
                   space_group=probe.space_group, setting=probe.setting, dtype=f64, device=device)


def render_options(cfg: SimulationConfig, resolved: Resolved, chunk_elements=None) -> RenderOptions:
    d, sampling = cfg.detector, resolved.sampling
    rule = resolved.parallax
    absorbed = rule != "original"
    return RenderOptions(oversample=d.oversample, phisteps=resolved.phi[0], sensor_layers=sampling.layers,
                         layer_divisor=sampling.layer_divisor, oversample_thick=d.oversample_thick,
                         oversample_polar=d.oversample_polar, oversample_omega=d.oversample_omega,
                         absorbed_layers=absorbed, parallax="dials" if rule == "dials" else "physical",
                         point_pixel=d.point_pixel, curved=d.curved, polarization=not cfg.beam.nopolar,
                         dmin=d.dmin, roi=d.roi, chunk_elements=chunk_elements)


def models_from_config(cfg: SimulationConfig, dtype=None, device=None, chunk_elements=None,
                       write_dump: bool = False):
    """The models and render options of a configuration, in float64, as the
    keyword arguments of a Simulator, and the BuildInfo (whose dtype is the
    one to render in): `Simulator(**models).to(info.dtype)`. The
    configuration gets the command line's checks (ValueError subclasses)."""
    resolved = check_config(cfg)
    dtype, device = resolve_device(cfg, dtype, device)
    info = BuildInfo(cfg, messages=list(cfg.notes))
    c, b, d = cfg.crystal, cfg.beam, cfg.detector

    # seeds: the original negates what the user typed; the noise seed defaults to the clock
    info.noise_seed = -int(time.time()) if cfg.output.seed is None else -cfg.output.seed
    misset_seed = info.noise_seed if c.misset_seed is None else -c.misset_seed
    misset = c.misset if c.misset is not None else (0.0, 0.0, 0.0)
    if c.misset_random:
        drawn = rng.random_misset_angles(misset_seed)
        info.random_misset = drawn
        misset = tuple(x / DEG for x in drawn)
        info.messages.append("random orientation misset angles: %f %f %f deg"
                             % tuple(x * 180.0 / math.pi for x in drawn))

    A_matrix = None
    if c.mat_file is not None:
        from ..io.matrix import read_mosflm_matrix
        A_matrix = read_mosflm_matrix(c.mat_file)
        info.messages.append(f"reading {c.mat_file}")
    table, sources, mask = read_inputs(cfg, info, write_dump)

    f64 = torch.float64
    placement = resolved.placement
    detector = make_detector(cfg, info, placement, mask, f64, device)
    vecs = placement.vectors
    travel, e_vector = unit_vector(vecs["beam"]), unit_vector(vecs["pol"])
    beam = make_beam(cfg, info, resolved.beam, sources, travel, e_vector, b.wavelength, (1.0 + b.polarization) / 2.0,
                     device)
    spindle = vecs["spindle"]
    _, width, osc = resolved.phi
    info.phi_range = (c.phi0, osc)
    goniometer = Goniometer([spindle], dtype=f64, device=device)
    scan = Scan((1, 1), (c.phi0, width), dtype=f64, device=device)

    if A_matrix is not None:
        recip = np.asarray(A_matrix, dtype=np.float64) / b.wavelength  # the matrix carries its wavelength
        probe = Crystal.from_reciprocal_vectors(*recip, misset=misset, dtype=f64)
    else:
        probe = Crystal(c.cell, misset=misset, setting="nanobragg", dtype=f64)
    crystal = make_crystal(cfg, info, resolved, probe, table, device)

    panel = detector.panels[0]
    roi = d.roi or (-1, -1, -1, -1)
    info.roi = (roi[0] if roi[0] >= 0 else 0, roi[1] if roi[1] >= 0 else panel.fpixels,
                roi[2] if roi[2] >= 0 else 0, roi[3] if roi[3] >= 0 else panel.spixels)
    options = render_options(cfg, resolved, chunk_elements)
    # models are built in float64 so the automatic oversampling (an integer
    # decision) is taken from exact values, then cast to the render dtype
    with torch.no_grad():
        distance = float(panel.frame.geometry(beam.incident())["distance"]) / 1000.0
    info.dtype = dtype
    recommended = crystal.automatic_oversample(b.wavelength, distance, d.pixel_size / 1000.0)
    return dict(beam=beam, crystal=crystal, detector=detector, goniometer=goniometer, scan=scan, options=options,
                recommended=recommended), info


def write_experiment(path: str, argv: list[str], info: BuildInfo) -> None:
    """The DIALS experiment list of this run, from float64 models: beam,
    the detector as one panel in the lab frame (the convention's), spindle,
    a one-image scan, the crystal at phi = 0, and the SMV image (the noise
    image when there is one) as its imageset. The command samples each
    rotation step at its start, the experiment path (DIALS's convention) at
    its middle: the scan starts half a step before -phi, so that rendering
    the file gives the same image."""
    from ..io.dials import Experiment, write_experiments
    from ..validate import output_paths
    models, _ = models_from_args(argv, dtype=torch.float64)
    paths = output_paths(info.config)
    images = [os.path.abspath(paths.get("noisefile", paths["intfile"]))]  # what a detector would record
    given = models["scan"]
    with torch.no_grad():
        start, width = (float(x) for x in given.oscillation)
    scan = Scan(given.image_range, (start - width / (2 * models["options"].phisteps), width), dtype=torch.float64)
    expt = Experiment(beam=models["beam"], detector=models["detector"], crystal=models["crystal"],
                      goniometer=models["goniometer"], scan=scan,
                      extras={"imageset": {"__id__": "ImageSet", "images": images}})
    write_experiments(path, [expt], history=["torchbragg nanoBragg " + " ".join(argv)])
