"""From a configuration (or nanoBragg flags) to ready models and a Simulator:
reads the input files, draws the random orientations like the original and
resolves the original's defaults."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import rng
from .config import SimulationConfig
from .errors import InputError
from .flags import parse_args
from .models import CONVENTION_VECTORS, CUSTOM_START, Beam, Crystal, Detector, StructureFactors
from .simulator import Simulator

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class BuildInfo:
    """What the command line reports about a run besides the image."""
    config: SimulationConfig
    messages: list[str] = field(default_factory=list)
    noise_seed: int = 0  # stored (negative) value
    hkl_count: int = 0
    random_misset: tuple | None = None


def header_defaults(argv: list[str]) -> SimulationConfig:
    """Geometry from the headers of -mask and -img files; the flags are applied
    on top. The mask is read first, so the image header wins."""
    cfg = SimulationConfig()
    pre = parse_args(argv)  # only to learn the file names
    for path, is_mask in ((pre.detector.mask_file, True), (pre.detector.img_file, False)):
        if path is None:
            continue
        from .io.smv import read_smv
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


def build_from_args(argv: list[str], dtype=None, device=None, **kw):
    base = header_defaults(argv) if any(a in ("-img", "-mask") for a in argv) else None
    cfg = parse_args(argv) if base is None else parse_args(argv, base)
    return build_from_config(cfg, dtype=dtype, device=device, **kw)


def build_from_config(cfg: SimulationConfig, dtype=None, device=None, chunk_elements=None,
                      write_dump: bool = False):
    """Models and Simulator for a configuration; returns (simulator, BuildInfo)."""
    dtype = dtype or DTYPES[cfg.dtype]
    device = torch.device(device or cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available")
    info = BuildInfo(cfg, messages=list(cfg.notes))
    c, b, d = cfg.crystal, cfg.beam, cfg.detector
    conv = d.convention

    # seeds: the original negates what the user typed; the noise seed defaults to the clock
    info.noise_seed = -int(time.time()) if cfg.output.seed is None else -cfg.output.seed
    misset_seed = info.noise_seed if c.misset_seed is None else -c.misset_seed
    random_misset = None
    if c.misset_random:
        random_misset = rng.random_misset_angles(misset_seed)
        info.random_misset = random_misset
        info.messages.append("random orientation misset angles: %f %f %f deg"
                             % tuple(x * 180.0 / math.pi for x in random_misset))

    A_matrix = None
    if c.mat_file is not None:
        from .io.matrix import read_mosflm_matrix
        A_matrix = read_mosflm_matrix(c.mat_file)
        info.messages.append(f"reading {c.mat_file}")

    hkl = None
    if c.hkl_file is not None:
        from .io.hkl import read_hkl, write_fdump
        table = read_hkl(c.hkl_file, default_F=c.default_F)
        hkl = StructureFactors(table.grid, table.h_min, table.k_min, table.l_min)
        info.hkl_count = table.count
        info.messages.extend(table.warnings)
        if write_dump:
            try:
                write_fdump(c.dump_file, table)
                info.messages.append(f"writing dump file for next time: {c.dump_file}")
            except OSError as exc:
                info.messages.append(f"WARNING: unable to open dump file: {c.dump_file} ({exc.strerror})")
    elif os.path.exists(c.dump_file):
        from .io.hkl import read_fdump
        table = read_fdump(c.dump_file)
        hkl = StructureFactors(table.grid, table.h_min, table.k_min, table.l_min)
        info.hkl_count = int(np.prod(table.grid.shape))
        info.messages.append(f"reading Fs from {c.dump_file}")
    elif c.default_F == 0.0:
        raise InputError("no structure factors: give -hkl FILE, -default_F F, or run where Fdump.bin exists")

    sources = None
    if b.source_file is not None:
        from .io.sources import read_sources
        sources = read_sources(b.source_file)

    mask = None
    if d.mask_file is not None:
        from .io.smv import read_smv
        _, mask_data = read_smv(d.mask_file)
        mask = np.asarray(mask_data).reshape(-1)

    detector = Detector(d, dtype=dtype, device=device, mask=mask, notes=info.messages)
    if mask is not None and mask.size != detector.fpixels * detector.spixels:
        raise InputError(f"mask {d.mask_file} has {mask.size} pixels but the detector has "
                         f"{detector.fpixels}x{detector.spixels}")
    beam = Beam(b, conv, dtype=dtype, device=device, sources=sources)
    with torch.no_grad():
        ratio = float(detector.geometry(beam.beam_direction, torch.float64)["ratio"])
    if abs(ratio) < 1e-9:
        raise InputError("impossible geometry: the detector plane contains the beam (check rotations and vectors)")

    vecs = CONVENTION_VECTORS.get(conv, CUSTOM_START)
    spindle = c.spindle_axis if conv == "CUSTOM" and c.spindle_axis is not None else vecs["spindle"]

    # crystal size from the sample dimensions needs the cell lengths first
    sizes = list(c.sample_size)
    beamsize_m = b.beamsize * 1e-3
    for i in (1, 2):
        if sizes[i] is not None and beamsize_m >= 0 and beamsize_m < sizes[i] * 1e-3:
            info.messages.append("WARNING: clipping sample (%g m %s) with beam (%g m)"
                                 % (sizes[i] * 1e-3, "high" if i == 1 else "wide", beamsize_m))
            sizes[i] = b.beamsize
    probe = Crystal(c, spindle, b.wavelength, dtype=torch.float64, A_matrix=A_matrix,
                    random_misset=random_misset)
    mosaic_draws = None
    if probe._mosaic_on and probe.mosaic_domains > 1:
        mosaic_draws = rng.mosaic_domain_draws(c.mosaic_spread * math.pi / 180.0, probe.mosaic_domains,
                                               -c.mosaic_seed)
    n_cells = list(c.N)
    if any(s is not None and s > 0 for s in sizes):
        lengths = torch.linalg.norm(probe.real_vectors(), dim=-1).tolist()
        for i in range(3):
            if sizes[i] is not None and sizes[i] > 0:
                n_cells[i] = float(math.ceil(sizes[i] * 1e7 / lengths[i]))
    # the original picks interpolation from the -N flags, before a sample size sets N
    interpolate = c.interpolate if c.interpolate is not None else min(c.N) <= 2
    sized = dataclasses.replace(c, N=tuple(max(x, 1.0) for x in n_cells), interpolate=interpolate)
    crystal = Crystal(sized, spindle, b.wavelength, dtype=dtype, device=device, hkl=hkl,
                      A_matrix=A_matrix, mosaic_draws=mosaic_draws, random_misset=random_misset)
    crystal.auto_interpolate = c.interpolate is None
    # the automatic oversampling is an integer decision: take it in float64 from the config values
    probe.N = torch.tensor(sized.N, dtype=torch.float64)
    from .simulator import recommended_oversample
    recommended = recommended_oversample(probe, Beam(b, conv, dtype=torch.float64, sources=sources),
                                         Detector(d, dtype=torch.float64, mask=mask, notes=[]))
    sim = Simulator(crystal, beam, detector, chunk_elements=chunk_elements, recommended=recommended)
    return sim, info
