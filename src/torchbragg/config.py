"""Plain configuration of a run, in the units of the nanoBragg command line.

No torch here: the command line builds and checks this quickly, and the
Python API takes the same objects. `None` means "not given": the original's
defaults and derivations are applied when the models are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Vec3 = tuple[float, float, float]

CONVENTIONS = ("MOSFLM", "XDS", "ADXV", "DENZO", "DIALS", "CUSTOM")

# Lab-frame vectors of the beam-centre conventions: beam (travel), fast, slow,
# normal, two-theta axis, polarization E-vector, spindle.
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

SHAPES = ("square", "round", "gauss", "tophat")


@dataclass
class CrystalConfig:
    cell: tuple[float, ...] | None = None  # a b c (A) alpha beta gamma (deg)
    mat_file: str | None = None  # MOSFLM A matrix
    misset: Vec3 | None = None  # degrees about x, y, z
    misset_random: bool = False
    misset_seed: int | None = None  # as typed; the stored seed is its negative
    phi0: float = 0.0  # degrees
    osc: float | None = None  # degrees
    phistep: float | None = None  # degrees
    phisteps: int | None = None
    spindle_axis: Vec3 | None = None
    mosaic_spread: float | None = None  # degrees
    mosaic_domains: int | None = None
    mosaic_seed: int = 12345678
    N: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sample_size: tuple[float | None, float | None, float | None] = (None, None, None)  # mm
    shape: str = "square"
    fudge: float = 1.0
    hkl_file: str | None = None
    mtz_file: str | None = None  # MTZ file (merged), expanded to P1
    mtz_column: str | None = None  # label, or 'PLUS,MINUS'; None: first amplitude, else intensity
    model_file: str | None = None  # PDB or mmCIF model
    model_dmin: float | None = None  # Angstrom; None: -dmin if set, else 2
    dump_file: str = "Fdump.bin"
    default_F: float = 0.0
    interpolate: bool | None = None  # None: automatic


@dataclass
class BeamConfig:
    wavelength: float = 1.0  # Angstrom
    dispersion: float = 0.0  # percent
    dispsteps: int | None = None
    hdivrange: float | None = None  # mrad
    vdivrange: float | None = None
    hdivstep: float | None = None
    vdivstep: float | None = None
    hdivsteps: int | None = None
    vdivsteps: int | None = None
    round_div: bool = True
    source_file: str | None = None
    polarization: float = 0.0  # Kahn factor
    nopolar: bool = False
    fluence: float = 125932015286227086360700780544.0  # photons/m^2
    flux: float = 0.0  # photons/s
    exposure: float = 1.0  # s
    beamsize: float = 0.1  # mm
    water_size: float = 0.0  # um
    beam_vector: Vec3 | None = None
    polar_vector: Vec3 | None = None


@dataclass
class DetectorConfig:
    pixel_size: float = 0.1  # mm
    fpixels: int | None = None
    spixels: int | None = None
    detsize_f: float = 102.4  # mm
    detsize_s: float = 102.4
    distance: float = 100.0  # mm
    close_distance: float | None = None  # mm
    Xbeam: float | None = None  # mm
    Ybeam: float | None = None
    Xclose: float | None = None
    Yclose: float | None = None
    ORGX: float | None = None  # pixels
    ORGY: float | None = None
    convention: str = "MOSFLM"
    pivot: str = "BEAM"  # as set while reading flags; conventions may override
    fdet_vector: Vec3 | None = None
    sdet_vector: Vec3 | None = None
    odet_vector: Vec3 | None = None
    pix0_vector: Vec3 | None = None
    twotheta_axis: Vec3 | None = None
    rotation: Vec3 = (0.0, 0.0, 0.0)  # degrees about x, y, z
    twotheta: float = 0.0  # degrees
    curved: bool = False
    point_pixel: bool = False
    thickness: float = 0.0  # um
    attenuation_depth: float | None = None  # um; 0 means infinite (no absorption)
    thicksteps: int | None = None
    oversample: int | None = None
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    absorbed_layers: bool = False  # slabs weighted by what they absorb (torchbragg)
    parallax: str | None = None  # physical | dials | original; None: the command's default
    roi: tuple[int, int, int, int] | None = None  # xmin xmax ymin ymax, inclusive
    mask_file: str | None = None
    img_file: str | None = None
    dmin: float = 0.0  # Angstrom


@dataclass
class OutputConfig:
    write_expt: str | None = None  # DIALS experiment list describing the run
    floatfile: str | None = None
    intfile: str | None = None
    noisefile: str | None = None
    pgmfile: str | None = None
    write_pgm: bool = True
    calculate_noise: bool = True
    pgm_scale: float = 0.0
    int_scale: float = 0.0
    adc_offset: float = 40.0
    seed: int | None = None  # as typed; None: from the clock, like the original
    printout: bool = False
    printout_pixel: tuple[int, int] | None = None
    progress: bool = False


@dataclass
class SimulationConfig:
    crystal: CrystalConfig = field(default_factory=CrystalConfig)
    beam: BeamConfig = field(default_factory=BeamConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dtype: str = "float32"
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


# --- step auto-selection: the original's rules, shared by every swept quantity ---

def auto_steps(steps: int | None, span: float | None, step: float | None,
               default_span: float, endpoints: bool) -> tuple[int, float, float]:
    """Resolve (number of steps, range, step size) the way the original does for
    phi, divergence, dispersion and sensor layers. `endpoints` is True where a
    range given with a count is split into count-1 intervals (divergence,
    dispersion, thickness) and False where it is split into count (phi)."""
    n = -1 if steps is None else steps
    rng = -1.0 if span is None else span
    st = -1.0 if step is None else step
    if n <= 0:
        if rng < 0:
            if st <= 0:
                return 1, 0.0, 0.0
            return 2, st, st
        if st <= 0:
            if endpoints:
                return 2, rng, rng
            return 2, rng, rng / 2.0
        return int(math.ceil(rng / st)), rng, st
    if rng < 0:
        if st <= 0:
            return n, default_span, default_span / n
        return 2, st, st
    if st <= 0:
        if endpoints:
            n = max(n, 2)
            return n, rng, rng / (n - 1)
        return n, rng, rng / n
    return n, rng, st


def sweep_is_off(n: int, span: float, step: float) -> bool:
    return span <= 0.0 or step <= 0.0 or n <= 0
