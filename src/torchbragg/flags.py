"""The command lines of nanoBragg and its companions nonBragg and noisify:
every flag, its values, units and default, and (nanoBragg) how it lands in a
SimulationConfig. Flags are matched by exact name (plus the originals'
documented synonyms); anything else is an error. One Flag type and one
number reader serve the three commands (`REGISTRY`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from .config import SimulationConfig
from .errors import InputError
from .units import HC_EV_ANGSTROM


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    nargs: int  # number of values; -1: the -cell rule (1 to 6 numbers)
    kind: str  # "float", "int", "str", "switch", "misset", "psf"
    apply: Callable | None  # nanoBragg: how the value lands in a SimulationConfig
    help: str
    group: str
    # (config section, attribute[, index of a component]) this flag sets, to name it in messages
    sets: tuple[tuple, ...] = ()
    unit: str = ""  # where the help shows it apart from the text (noisify)
    default: str = ""
    key: str = ""  # noisify: the option the value sets
    scale: float = 1.0  # noisify: value * scale is stored


FLAGS: list[Flag] = []
# counts: at least 1, except -oversample where 0 means automatic
COUNT_RULE = "counts must be >= 1; -oversample 0 means automatic"
COUNT_FLAGS = {"-N", "-Na", "-Nb", "-Nc", "-phisteps", "-mosaic_domains", "-mosaic_dom", "-detector_thicksteps",
               "-thicksteps", "-oversample", "-dispsteps", "-divsteps", "-hdivsteps", "-vdivsteps"}


def flag(names, nargs, kind, group, help, sets=()):
    def register(fn):
        FLAGS.append(Flag(tuple(names.split()), nargs, kind, fn, help, group, sets))
        return fn
    return register


def _set(section, attr, scale=1.0):
    def fn(cfg, v):
        obj = getattr(cfg, section)
        setattr(obj, attr, v * scale if scale != 1.0 else v)
    return fn


def simple(names, nargs, kind, group, help, section, attr, scale=1.0):
    FLAGS.append(Flag(tuple(names.split()), nargs, kind, _set(section, attr, scale), help, group,
                      ((section, attr),)))


def _custom(cfg, obj, attr, v):
    """Any user vector switches the original to its CUSTOM convention."""
    setattr(obj, attr, tuple(v))
    cfg.detector.convention = "CUSTOM"


# ---------------- crystal ----------------
G = "crystal"


@flag("-cell", -1, "float", G, "unit cell a b c (A) alpha beta gamma (deg); missing values: b=c=a, angles 90",
      sets=(("crystal", "cell"),))
def _cell(cfg, v):
    if len(v) in (4, 5):
        missing = "beta and gamma stay" if len(v) == 4 else "gamma stays"
        cfg.notes.append(f"WARNING: -cell got {len(v)} numbers; {missing} 90 degrees, as in the original")
    a = v[0]
    b = v[1] if len(v) > 1 and v[1] > 0 else a
    c = v[2] if len(v) > 2 and v[2] > 0 else a
    ang = [v[i] if len(v) > i and v[i] > 0 else 90.0 for i in (3, 4, 5)]
    cfg.crystal.cell = (a, b, c, *ang)


simple("-mat", 1, "str", G, "MOSFLM-style A matrix file (reciprocal vectors times wavelength)", "crystal", "mat_file")


@flag("-misset", -2, "misset", G, "crystal rotations about x, y, z (deg), or 'random'",
      sets=(("crystal", "misset"),))
def _misset(cfg, v):
    if v == "random":
        cfg.crystal.misset_random = True
        cfg.crystal.misset = None
    else:
        cfg.crystal.misset_random = False
        cfg.crystal.misset = tuple(v)


simple("-misset_seed", 1, "int", G, "seed for -misset random (default: the noise seed)", "crystal", "misset_seed")
simple("-hkl", 1, "str", G, "text file of h k l F (P1), or a DIALS reflection table (.refl, .json): F = sqrt(<I>)",
       "crystal", "hkl_file")
simple("-mtz", 1, "str", G, "MTZ file of merged F or I (instead of -hkl), expanded to P1 by its space group",
       "crystal", "mtz_file")
simple("-mtz_column", 1, "str", G, "MTZ column: an F or I label, F(+) or I(+) for an anomalous pair (h from +, -h "
       "from -), or PLUS,MINUS (default: first F, else first I)", "crystal", "mtz_column")
simple("-model", 1, "str", G, "PDB or mmCIF model (instead of -hkl): |F| computed by gemmi, expanded to P1",
       "crystal", "model_file")
simple("-model_dmin", 1, "float", G, "resolution of -model structure factors (A; default -dmin, else 2)",
       "crystal", "model_dmin")
simple("-default_F", 1, "float", G, "structure factor of reflections not in the HKL file (default 0)", "crystal", "default_F")
simple("-dump -dumpfile", 1, "str", G, "binary structure-factor cache (default Fdump.bin)", "crystal", "dump_file")


@flag("-N", 1, "int", G, "number of unit cells along every axis (default 1); an integer, as the original reads "
      "it (torchbragg simulate and refine take any number >= 1)",
      sets=(("crystal", "N"),))
def _n(cfg, v):
    cfg.crystal.N = (float(v), float(v), float(v))


def _n_axis(i):
    def fn(cfg, v):
        n = list(cfg.crystal.N)
        n[i] = float(v)
        cfg.crystal.N = tuple(n)
    return fn


FLAGS.append(Flag(("-Na",), 1, "int", _n_axis(0), "unit cells along a", G))
FLAGS.append(Flag(("-Nb",), 1, "int", _n_axis(1), "unit cells along b", G))
FLAGS.append(Flag(("-Nc",), 1, "int", _n_axis(2), "unit cells along c", G))


def _size(axes):
    def fn(cfg, v):
        s = list(cfg.crystal.sample_size)
        for i in axes:
            s[i] = v
        cfg.crystal.sample_size = tuple(s)
    return fn


FLAGS.append(Flag(("-xtalsize", "-xtal_size", "-samplesize", "-sample_size"), 1, "float", _size((0, 1, 2)),
                  "crystal full width (mm), alternative to -N", G, (("crystal", "sample_size"),)))
FLAGS.append(Flag(("-xtal_thick", "-xtal_x", "-sample_thick", "-sample_x"), 1, "float", _size((0,)),
                  "crystal size along x (mm)", G))
FLAGS.append(Flag(("-xtal_width", "-xtal_y", "-sample_width", "-sample_y", "-width"), 1, "float", _size((1,)),
                  "crystal size along y (mm)", G))
FLAGS.append(Flag(("-xtal_height", "-xtal_z", "-sample_height", "-sample_z", "-height"), 1, "float", _size((2,)),
                  "crystal size along z (mm)", G))
for _names, _help in (("-density -sample_density", "sample density (g/cm^3; reported only)"),
                      ("-MW -molecular_weight", "molecular weight (g/mol; reported only)")):
    FLAGS.append(Flag(tuple(_names.split()), 1, "float", lambda cfg, v: None, _help, G))

for _names, _shape, _help in (("-square_xtal", "square", "parallelepiped crystal: sincg lattice transform (default)"),
                              ("-round_xtal", "round", "ellipsoidal crystal: sinc3 lattice transform"),
                              ("-gauss_xtal", "gauss", "Gaussian spots, no inter-Bragg maxima"),
                              ("-tophat_spots -binary_spots", "tophat", "flat-top spots clipped at the FWHM")):
    FLAGS.append(Flag(tuple(_names.split()), 0, "switch",
                      (lambda s: lambda cfg, v: setattr(cfg.crystal, "shape", s))(_shape), _help, G))
simple("-fudge", 1, "float", G, "scale of the spot-shape radius (default 1)", "crystal", "fudge")
FLAGS.append(Flag(("-interpolate",), 0, "switch", lambda cfg, v: setattr(cfg.crystal, "interpolate", True),
                  "tricubic structure-factor interpolation (default: on when any N <= 2)", G))
FLAGS.append(Flag(("-nointerpolate",), 0, "switch", lambda cfg, v: setattr(cfg.crystal, "interpolate", False),
                  "nearest-neighbour structure factors", G))
simple("-phi", 1, "float", G, "spindle angle at the start (deg, default 0)", "crystal", "phi0")
simple("-osc", 1, "float", G, "spindle rotation range (deg)", "crystal", "osc")
simple("-phistep", 1, "float", G, "spindle step (deg)", "crystal", "phistep")
simple("-phisteps", 1, "int", G, "number of spindle steps; nanoBragg samples each at its start (the original's "
       "rule), torchbragg simulate and refine at its middle (DIALS's frame convention)", "crystal", "phisteps")
FLAGS.append(Flag(("-spindle_axis",), 3, "float", lambda cfg, v: _custom(cfg, cfg.crystal, "spindle_axis", v),
                  "unit vector of the right-handed spindle axis (switches to CUSTOM)", G,
                  (("crystal", "spindle_axis"),)))
simple("-mosaic -mosaicity -mosaic_spread", 1, "float", G, "isotropic mosaic spread (deg)", "crystal", "mosaic_spread")
simple("-mosaic_domains -mosaic_dom", 1, "int", G, "number of mosaic domains (default 10 when spread > 0)",
       "crystal", "mosaic_domains")
simple("-mosaic_seed", 1, "int", G, "seed for the mosaic domains (default 12345678)", "crystal", "mosaic_seed")

# ---------------- beam ----------------
G = "beam"
simple("-lambda -wave -wavelength", 1, "float", G, "wavelength (A, default 1)", "beam", "wavelength")


@flag("-energy", 1, "float", G, "photon energy (eV), alternative to -lambda")
def _energy(cfg, v):
    if v <= 0:
        raise InputError(f"-energy must be positive, got {v:g}")
    cfg.beam.wavelength = HC_EV_ANGSTROM / v


simple("-dispersion", 1, "float", G, "spectral width delta-lambda/lambda (percent)", "beam", "dispersion")
simple("-dispsteps", 1, "int", G, "number of wavelengths", "beam", "dispsteps")


@flag("-divergence", 1, "float", G, "horizontal and vertical divergence range (mrad)")
def _div(cfg, v):
    cfg.beam.hdivrange = cfg.beam.vdivrange = v


simple("-hdivrange", 1, "float", G, "horizontal divergence range (mrad)", "beam", "hdivrange")
simple("-vdivrange", 1, "float", G, "vertical divergence range (mrad)", "beam", "vdivrange")
simple("-hdivstep", 1, "float", G, "horizontal divergence step (mrad)", "beam", "hdivstep")
simple("-vdivstep", 1, "float", G, "vertical divergence step (mrad)", "beam", "vdivstep")
simple("-hdivsteps", 1, "int", G, "number of horizontal divergence steps", "beam", "hdivsteps")
simple("-vdivsteps", 1, "int", G, "number of vertical divergence steps", "beam", "vdivsteps")


@flag("-divsteps", 1, "int", G, "number of divergence steps in both directions")
def _divsteps(cfg, v):
    cfg.beam.hdivsteps = cfg.beam.vdivsteps = v


FLAGS.append(Flag(("-round_div",), 0, "switch", lambda cfg, v: setattr(cfg.beam, "round_div", True),
                  "trim the divergence grid to an ellipse (default)", G))
FLAGS.append(Flag(("-square_div",), 0, "switch", lambda cfg, v: setattr(cfg.beam, "round_div", False),
                  "full rectangular divergence grid", G))
simple("-sourcefile", 1, "str", G, "text file of sources: X Y Z weight lambda(m)", "beam", "source_file")


@flag("-polar", 1, "float", G, "Kahn polarization factor (default 0: unpolarized)",
      sets=(("beam", "polarization"),))
def _polar(cfg, v):
    cfg.beam.polarization = v
    cfg.beam.nopolar = False


FLAGS.append(Flag(("-nopolar",), 0, "switch", lambda cfg, v: setattr(cfg.beam, "nopolar", True),
                  "turn off the polarization correction", G))
simple("-fluence", 1, "float", G, "photons per m^2 (default 1.26e29)", "beam", "fluence")
simple("-flux", 1, "float", G, "photons per second, with -exposure and -beamsize", "beam", "flux")
simple("-exposure", 1, "float", G, "exposure time (s, default 1)", "beam", "exposure")
simple("-beamsize", 1, "float", G, "beam size (mm, default 0.1)", "beam", "beamsize")
simple("-water", 1, "float", G, "size of the water droplet around the crystal (um)", "beam", "water_size")
FLAGS.append(Flag(("-beam_vector",), 3, "float", lambda cfg, v: _custom(cfg, cfg.beam, "beam_vector", v),
                  "unit vector of the beam direction (switches to CUSTOM)", G, (("beam", "beam_vector"),)))
FLAGS.append(Flag(("-polar_vector",), 3, "float", lambda cfg, v: _custom(cfg, cfg.beam, "polar_vector", v),
                  "unit E-vector of the beam (switches to CUSTOM)", G, (("beam", "polar_vector"),)))
for _names, _help in (("-stol -4stol -Q", "amorphous structure-factor file (read, no effect on the image)"),
                      ("-stolout", "amorphous structure-factor output (no effect)")):
    FLAGS.append(Flag(tuple(_names.split()), 1, "str", lambda cfg, v: None, _help, G))
FLAGS.append(Flag(("-coherent",), 0, "switch", lambda cfg, v: None, "accepted; no effect (as in the original)", G))

# ---------------- detector ----------------
G = "detector"
simple("-pixel", 1, "float", G, "pixel size (mm, default 0.1)", "detector", "pixel_size")


@flag("-detpixels", 1, "int", G, "detector size in pixels (both axes)")
def _detpix(cfg, v):
    cfg.detector.fpixels = cfg.detector.spixels = v


simple("-detpixels_f -detpixels_x", 1, "int", G, "pixels along the fast axis", "detector", "fpixels")
simple("-detpixels_s -detpixels_y", 1, "int", G, "pixels along the slow axis", "detector", "spixels")


@flag("-detsize", 1, "float", G, "detector size (mm, default 102.4)")
def _detsize(cfg, v):
    cfg.detector.detsize_f = cfg.detector.detsize_s = v


simple("-detsize_f", 1, "float", G, "detector size along fast (mm)", "detector", "detsize_f")
simple("-detsize_s", 1, "float", G, "detector size along slow (mm)", "detector", "detsize_s")


def _with_pivot(attr, pivot, help, names, nargs=1):
    def fn(cfg, v):
        setattr(cfg.detector, attr, v)
        cfg.detector.pivot = pivot
    FLAGS.append(Flag(tuple(names.split()), nargs, "float", fn, help, G, (("detector", attr),)))


_with_pivot("distance", "BEAM", "sample to beam spot distance (mm, default 100)", "-distance")
_with_pivot("close_distance", "SAMPLE", "sample to nearest detector point (mm)", "-close_distance")
_with_pivot("Xbeam", "BEAM", "fast-ish beam centre in the convention's terms (mm)", "-Xbeam")
_with_pivot("Ybeam", "BEAM", "slow-ish beam centre in the convention's terms (mm)", "-Ybeam")
_with_pivot("Xclose", "SAMPLE", "nearest point, fast (mm)", "-Xclose")
_with_pivot("Yclose", "SAMPLE", "nearest point, slow (mm)", "-Yclose")
_with_pivot("ORGX", "SAMPLE", "XDS origin, fast (pixels)", "-ORGX")
_with_pivot("ORGY", "SAMPLE", "XDS origin, slow (pixels)", "-ORGY")


@flag("-pivot", 1, "str", G, "detector rotation pivot: beam or sample")
def _pivot(cfg, v):
    if v not in ("beam", "sample"):
        raise InputError(f"-pivot takes 'beam' or 'sample', got '{v}'")
    cfg.detector.pivot = v.upper()


# Each switch sets the pivot as the original's does while it reads flags; a
# convention's own rule (config.FORCED_PIVOT: DIALS pivots about the sample)
# then wins, so that pivot only matters when a later custom vector makes the
# run CUSTOM (-dials -fdet_vector ... pivots about the beam spot, as there).
for _conv, _piv in (("MOSFLM", "BEAM"), ("XDS", "SAMPLE"), ("ADXV", "BEAM"), ("DENZO", "BEAM"), ("DIALS", "BEAM")):
    def _conv_fn(cfg, v, c=_conv, p=_piv):
        cfg.detector.convention = c
        cfg.detector.pivot = p
    FLAGS.append(Flag((f"-{_conv.lower()}",), 0, "switch", _conv_fn,
                      f"{_conv} beam-centre convention" + (" (default)" if _conv == "MOSFLM" else ""), G))


def _custom_vector(section, attr, help, name):
    FLAGS.append(Flag((name,), 3, "float", lambda cfg, v: _custom(cfg, getattr(cfg, section), attr, v), help, G,
                      ((section, attr),)))


_custom_vector("detector", "fdet_vector", "fast-axis unit vector (switches to CUSTOM)", "-fdet_vector")
_custom_vector("detector", "sdet_vector", "slow-axis unit vector (switches to CUSTOM)", "-sdet_vector")
_custom_vector("detector", "odet_vector", "detector normal (switches to CUSTOM)", "-odet_vector")
_custom_vector("detector", "twotheta_axis", "two-theta rotation axis (switches to CUSTOM)", "-twotheta_axis")
_custom_vector("detector", "pix0_vector", "vector to the first pixel (m; switches to CUSTOM)", "-pix0_vector")


@flag("-twotheta", 1, "float", G, "detector two-theta swing (deg)", sets=(("detector", "twotheta"),))
def _tt(cfg, v):
    cfg.detector.twotheta = v
    cfg.detector.pivot = "SAMPLE"


def _rot(i):
    def fn(cfg, v):
        r = list(cfg.detector.rotation)
        r[i] = v
        cfg.detector.rotation = tuple(r)
    return fn


for _i, _ax in enumerate("xyz"):
    FLAGS.append(Flag((f"-detector_rot{_ax}",), 1, "float", _rot(_i), f"detector rotation about {_ax} (deg)", G,
                      (("detector", "rotation", _i),)))
FLAGS.append(Flag(("-curved_det", "-curved_detector"), 0, "switch", lambda cfg, v: setattr(cfg.detector, "curved", True),
                  "spherical detector: every pixel at the same distance", G))
FLAGS.append(Flag(("-point_pixel",), 0, "switch", lambda cfg, v: setattr(cfg.detector, "point_pixel", True),
                  "inverse-square solid angle only, no obliquity", G))


@flag("-detector_abs -detector_absorb -detector_absorption", 1, "str", G,
      "sensor attenuation depth (um); 'inf' or 0: no absorption", sets=(("detector", "attenuation_depth"),))
def _abs(cfg, v):
    if v.startswith("inf"):
        val = 0.0
    else:
        try:
            val = float(v)
        except ValueError:
            raise InputError(f"-detector_abs expects a number of um or 'inf', got '{v}'") from None
    if val == 0.0:
        # infinite depth: the original also drops any thickness given so far
        cfg.detector.attenuation_depth = 0.0
        cfg.detector.thickness = 0.0
        return
    cfg.detector.attenuation_depth = val


simple("-detector_thick", 1, "float", G, "sensor thickness (um)", "detector", "thickness")
simple("-detector_thicksteps -thicksteps", 1, "int", G, "number of sensor layers", "detector", "thicksteps")
simple("-oversample", 1, "int", G, "sub-pixels per pixel edge (default: automatic)", "detector", "oversample")
for _what in ("thick", "polar", "omega"):
    FLAGS.append(Flag((f"-oversample_{_what}",), 0, "switch",
                      (lambda w: lambda cfg, v: setattr(cfg.detector, f"oversample_{w}", True))(_what),
                      f"recompute the {_what} factor for every sub-pixel", G))


FLAGS.append(Flag(("-absorbed_layers",), 0, "switch",
                  lambda cfg, v: setattr(cfg.detector, "absorbed_layers", True),
                  "the same as -parallax physical", G))


@flag("-parallax", 1, "str", G,
      "sensor depth rule: physical (-thicksteps slabs, by default enough that each is at most half an "
      "attenuation length thick (2 to 16), weighted by the photons each absorbs: a real sensor's parallax), "
      "dials (spots shifted by the depth DIALS's parallax correction uses: the mean absorption depth times "
      "the absorbed fraction, for like-for-like comparison with DIALS's predictions; on a thin sensor at high "
      "energy well below the physical shift) or original (the original's layers, counted equally). "
      "Default: original for nanoBragg; physical for torchbragg simulate and refine when the panels have a "
      "thickness and mu")
def _parallax(cfg, v):
    if v not in ("physical", "dials", "original"):
        raise InputError(f"-parallax takes physical, dials or original, got '{v}'")
    cfg.detector.parallax = v


@flag("-roi", 4, "int", G, "render only xmin xmax ymin ymax (pixels, inclusive)", sets=(("detector", "roi"),))
def _roi(cfg, v):
    cfg.detector.roi = tuple(v)


simple("-mask", 1, "str", G, "SMV image: pixels that are 0 are skipped (header sets the geometry)", "detector", "mask_file")
simple("-img", 1, "str", G, "SMV image whose header sets the geometry", "detector", "img_file")
simple("-dmin", 1, "float", G, "skip scattering beyond this resolution (A)", "detector", "dmin")

# ---------------- output ----------------
G = "output"
simple("-write_expt", 1, "str", G, "also write the DIALS experiment list (.expt) describing this run (torchbragg)",
       "output", "write_expt")
simple("-floatfile -floatimage", 1, "str", G, "raw float32 image output", "output", "floatfile")
simple("-intfile -intimage", 1, "str", G, "noiseless SMV image output", "output", "intfile")
simple("-noisefile -noiseimage", 1, "str", G, "SMV image with Poisson noise", "output", "noisefile")


@flag("-pgmfile -pgmimage", 1, "str", G, "8-bit PGM preview output")
def _pgm(cfg, v):
    cfg.output.pgmfile = v
    cfg.output.write_pgm = True


FLAGS.append(Flag(("-nopgm",), 0, "switch", lambda cfg, v: setattr(cfg.output, "write_pgm", False),
                  "do not write the PGM", G))
FLAGS.append(Flag(("-nonoise",), 0, "switch", lambda cfg, v: setattr(cfg.output, "calculate_noise", False),
                  "do not write the noise image", G))


@flag("-pgmscale", 1, "float", G, "PGM scale (default: automatic)", sets=(("output", "pgm_scale"),))
def _pgms(cfg, v):
    cfg.output.pgm_scale = v
    cfg.output.write_pgm = True


simple("-scale", 1, "float", G, "intfile scale (default: automatic)", "output", "int_scale")
simple("-adc", 1, "float", G, "offset added to SMV pixels (default 40)", "output", "adc_offset")
simple("-seed", 1, "int", G, "noise seed (default: from the clock)", "output", "seed")
FLAGS.append(Flag(("-printout",), 0, "switch", lambda cfg, v: setattr(cfg.output, "printout", True),
                  "print every rendered pixel's value", G))


@flag("-printout_pixel", 2, "int", G, "print the value of one pixel: fast slow",
      sets=(("output", "printout_pixel"),))
def _printout_pixel(cfg, v):
    cfg.output.printout = True
    cfg.output.printout_pixel = tuple(v)
FLAGS.append(Flag(("-noprogress",), 0, "switch", lambda cfg, v: setattr(cfg.output, "progress", False),
                  "no progress meter (default)", G))
FLAGS.append(Flag(("-progress",), 0, "switch", lambda cfg, v: setattr(cfg.output, "progress", True),
                  "print the percentage rendered as it goes", G))


@flag("-dtype", 1, "str", G, "float64 (the nanoBragg command's default: files byte-identical to the "
      "original's) or float32 (faster; the default of torchbragg simulate and the Python API)")
def _dtype(cfg, v):
    if v not in ("float32", "float64"):
        raise InputError(f"-dtype takes float32 or float64, got '{v}'")
    cfg.dtype = v


@flag("-device", 1, "str", G, "torch device: cpu (default), cuda, cuda:N")
def _device(cfg, v):
    cfg.device = v


def by_name(flags) -> dict[str, Flag]:
    """Every name and synonym of a command's flags -> its Flag."""
    return {n: f for f in flags for n in f.names}


FLAG_BY_NAME: dict[str, Flag] = by_name(FLAGS)
# (config section, attribute) -> the first flag registered for it, to name it in messages
FIELD_FLAGS: dict[tuple[str, str], str] = {}
for _f in FLAGS:
    for _field in _f.sets:
        FIELD_FLAGS.setdefault(_field[:2], _f.names[0])


# ----------------------------------------------------------------------------- nonBragg

def _nb(names, help_, nargs=1, kind="float"):
    return Flag(tuple(names.split()), nargs, kind, None, help_, "nonBragg")


NONBRAGG_FLAGS: list[Flag] = [
    _nb("-stol", "FILE: table 'stol F', sin(theta)/lambda (1/A) and the structure factor of one molecule", kind="str"),
    _nb("-4stol", "FILE: the same with 4 sin(theta)/lambda (= 2/d) in the first column", kind="str"),
    _nb("-Q", "FILE: the same with Q = 4 pi sin(theta)/lambda in the first column", kind="str"),
    _nb("-thickness -thick -sample_thick -sample_x", "sample thickness along the beam (mm, default 0.1)"),
    _nb("-samplesize -sample_size", "edge of a cube-shaped sample (mm, default 0.1)"),
    _nb("-width -sample_width -sample_y", "sample width across the beam (mm, default 0.1)"),
    _nb("-height -sample_height -sample_z", "sample height across the beam (mm, default 0.1)"),
    _nb("-density -sample_density", "sample density (g/cm^3, default 1)"),
    _nb("-molecules -sample_molecules", "number of molecules in the beam, instead of size and density"),
    _nb("-MW -molecular_weight", "molecular weight of the sample material (g/mol, default 18)"),
    _nb("-lambda -wave -wavelength", "X-ray wavelength (Angstrom, default 1)"),
    _nb("-energy", "X-ray photon energy (eV), instead of -lambda"),
    _nb("-fluence", "integrated beam intensity (photons/m^2, default 1.25932e29)"),
    _nb("-flux", "beam intensity (photons/s); with -exposure and -beamsize sets the fluence"),
    _nb("-exposure", "exposure time (s, default 1)"),
    _nb("-beamsize", "edge of the square beam (mm, default 0.1); clips the sample's height and width"),
    _nb("-dispersion", "spectral dispersion delta-lambda/lambda (percent, default 0)"),
    _nb("-dispsteps", "number of wavelengths over the dispersion", kind="int"),
    _nb("-divergence", "horizontal and vertical beam divergence (mrad, default 0)"),
    _nb("-hdivrange", "horizontal divergence (mrad)"),
    _nb("-vdivrange", "vertical divergence (mrad)"),
    _nb("-hdivstep", "horizontal divergence step (mrad)"),
    _nb("-vdivstep", "vertical divergence step (mrad)"),
    _nb("-hdivsteps", "number of horizontal divergence steps", kind="int"),
    _nb("-vdivsteps", "number of vertical divergence steps", kind="int"),
    _nb("-divsteps", "number of divergence steps in both directions", kind="int"),
    _nb("-round_div", "keep the divergence points inside an ellipse (default)", 0, "switch"),
    _nb("-square_div", "keep the whole divergence grid", 0, "switch"),
    _nb("-sourcefile", "FILE: sources, one a line 'X Y Z I lambda' (m, relative intensity, m)", kind="str"),
    _nb("-source_distance", "distance of the generated sources from the sample (mm, default 10000)"),
    _nb("-distance", "sample to direct-beam spot distance (mm, default 100); pivots about the beam spot"),
    _nb("-close_distance", "sample to nearest detector point (mm, default from -distance); pivots about the sample"),
    _nb("-Xbeam", "direct-beam position along the fast axis (mm, default (detsize_x - pixel)/2)"),
    _nb("-Ybeam", "direct-beam position along the slow axis (mm, default (detsize_y + pixel)/2)"),
    _nb("-Xclose", "nearest point to the sample along fast (mm, default (detsize_x - pixel)/2); pivots about it"),
    _nb("-Yclose", "nearest point to the sample along slow (mm, default (detsize_y + pixel)/2); pivots about it"),
    _nb("-ORGX", "nearest point along the fast axis (pixels); pivots about the sample"),
    _nb("-ORGY", "nearest point along the slow axis (pixels); pivots about the sample"),
    _nb("-pivot", "detector rotation pivot: beam or sample (default beam)", kind="str"),
    _nb("-detector_rotx", "detector rotation about x (degrees, default 0)"),
    _nb("-detector_roty", "detector rotation about y (degrees, default 0)"),
    _nb("-detector_rotz", "detector rotation about z (degrees, default 0)"),
    _nb("-twotheta", "detector swing about the two-theta axis (degrees, default 0); pivots about the sample"),
    _nb("-twotheta_axis", "two-theta axis x y z (default 0 1 0)", 3),
    _nb("-fdet_vector", "fast detector axis x y z (default 0 0 1)", 3),
    _nb("-sdet_vector", "slow detector axis x y z (default 0 -1 0)", 3),
    _nb("-odet_vector", "ignored as in the original: the normal is always fast x slow", 3),
    _nb("-beam_vector", "direction the beam travels x y z (default 1 0 0)", 3),
    _nb("-polar_vector", "E-vector of the beam x y z (default 0 0 1)", 3),
    _nb("-spindle_axis", "spindle axis x y z (no effect on the image)", 3),
    _nb("-pix0_vector", "no effect, as in the original (the origin follows from beam centre and distance)", 3),
    _nb("-detsize", "detector edge (mm, default 102.4)"),
    _nb("-detsize_x -detsize_f", "detector size along the fast axis (mm)"),
    _nb("-detsize_y -detsize_s", "detector size along the slow axis (mm)"),
    _nb("-detpixels", "pixels along each edge (default: detsize / pixel)", kind="int"),
    _nb("-detpixels_x -detpixels_f", "pixels along the fast axis", kind="int"),
    _nb("-detpixels_y -detpixels_s", "pixels along the slow axis", kind="int"),
    _nb("-pixel", "pixel size (mm, default 0.1)"),
    _nb("-oversample", "sub-pixels per pixel edge (default 1)", kind="int"),
    _nb("-point_pixel", "solid angle 1/R^2 (R in m), no pixel area or obliquity", 0, "switch"),
    _nb("-curved_det", "curved detector: every pixel at the beam distance, flat coordinates as angles", 0, "switch"),
    _nb("-Fmap", "write the structure factor at each pixel instead of photons (for absorption masks)", 0, "switch"),
    _nb("-polar", "Kahn polarization factor (default 0: unpolarized)"),
    _nb("-nopolar", "no polarization factor", 0, "switch"),
    _nb("-roi", "render only pixels xmin xmax ymin ymax (inclusive, default all; others are 0)", 4, "int"),
    _nb("-phi", "spindle start (degrees, header only, default 0)"),
    _nb("-osc", "oscillation range (degrees, header only, default 0)"),
    _nb("-phistep", "spindle step (degrees, header only, default none)"),
    _nb("-phisteps", "number of spindle steps (header only, default 1)", kind="int"),
    _nb("-floatfile -floatimage", "FILE: float image, photons/pixel, 4-byte floats (default floatimage.bin)",
       kind="str"),
    _nb("-intfile -intimage", "FILE: SMV image, scaled photons + ADC offset (default intimage.img)", kind="str"),
    _nb("-pgmfile -pgmimage", "FILE: 8-bit PGM preview (default image.pgm)", kind="str"),
    _nb("-noisefile -noiseimage", "FILE: SMV image of Poisson photon counts + ADC offset (default noiseimage.img)",
       kind="str"),
    _nb("-nonoise", "do not write the noise image", 0, "switch"),
    _nb("-nopgm", "do not write the PGM image (the original ignores this flag)", 0, "switch"),
    _nb("-scale", "scale of the SMV int image (default 55000 / maximum)"),
    _nb("-pgmscale", "scale of the PGM image (default 50 / rms deviation)"),
    _nb("-adc", "ADC offset added to the SMV images (default 40)"),
    _nb("-gain", "quantum gain (no effect: the original uses it only with -img)"),
    _nb("-seed", "seed of the noise image (default: the clock)", kind="int"),
    _nb("-coherent", "no effect, as in the original", 0, "switch"),
    _nb("-noreject", "no effect, as in the original", 0, "switch"),
    _nb("-printout", "print every pixel value", 0, "switch"),
    _nb("-printout_pixel", "print only pixel FAST SLOW", 2, "int"),
    _nb("-noprogress", "no progress meter (default)", 0, "switch"),
    _nb("-progress", "progress meter", 0, "switch"),
    _nb("-dtype", "float64 (default: the original's files bit for bit) or float32 (faster) arithmetic", kind="str"),
    _nb("-device", "cpu (default), cuda, cuda:N or mps (torchbragg)", kind="str"),
]


# ----------------------------------------------------------------------------- noisify

def _nz(names, key, kind, unit, default, help_, scale=1.0):
    return Flag(tuple(names), 0 if kind == "switch" else 1, kind, None, help_, "noisify", unit=unit, default=default,
                key=key, scale=scale)


NOISIFY_FLAGS: list[Flag] = [
    _nz(("-floatfile", "-floatimage", "-bin"), "floatfile", "str", "", "",
         "input image (required; also accepted as the one positional argument): little-endian float32 photons "
         "per pixel, fast index contiguous"),
    _nz(("-scale",), "scale", "float", "", "1", "factor applied to the input to make photons per pixel"),
    _nz(("-fluence",), "fluence", "float", "photons/m^2", "1.25932e+29",
         "incident fluence; photons = fluence * r_e^2 * scale * input"),
    _nz(("-gain",), "gain", "float", "ADU/photon", "1", "quantum gain"),
    _nz(("-adc", "-adc_offset"), "adc", "float", "ADU", "40", "offset added to every pixel"),
    _nz(("-readout", "-readout_noise", "-readnoise"), "readout", "float", "ADU", "0",
         "rms Gaussian read-out noise added to every pixel"),
    _nz(("-flicker",), "flicker", "float", "fraction", "0", "rms beam flicker, a Gaussian factor per pixel"),
    _nz(("-calibration", "-calibration_noise"), "calibration", "float", "fraction", "0.03",
         "rms static per-pixel calibration error (a photon-loss factor)"),
    _nz(("-seed",), "seed", "int", "", "from the clock", "seed of the photon, flicker and read-out noise"),
    _nz(("-calib_seed",), "calib_seed", "int", "", "the word 123456789, not negated as given seeds are",
         "seed of the calibration error (the same seed gives the same detector)"),
    _nz(("-psf",), "psf", "psf", "", "none", "point-spread function: gauss or fiber"),
    _nz(("-psf_fwhm", "-psf_width", "-psf_sigma"), "psf_fwhm", "float", "um", "46",
         "full width at half maximum of the PSF (-psf_sigma is the original's synonym: also a FWHM)", 1e-6),
    _nz(("-psf_radius",), "psf_radius", "int", "pixels", "0 (per pixel, from its photons)",
         "radius of the PSF disc"),
    _nz(("-nonoise",), "nonoise", "switch", "", "off",
         "no noise: the PSF goes on the noiseless image and no noise image is written"),
    _nz(("-distance",), "distance", "float", "mm", "100", "sample to detector distance (header only)", 1e-3),
    _nz(("-pixel",), "pixel", "float", "mm", "0.1", "pixel size", 1e-3),
    _nz(("-detpixels",), "detpixels", "int", "pixels", "from the file size", "pixels along both edges"),
    _nz(("-detpixels_x", "-detpixels_f"), "xpixels", "int", "pixels", "from the file size", "fast pixels"),
    _nz(("-detpixels_y", "-detpixels_s"), "ypixels", "int", "pixels", "from the file size", "slow pixels"),
    _nz(("-detsize",), "detsize", "float", "mm", "pixels x pixel size",
         "accepted as the original does; the size always follows from the pixels", 1e-3),
    _nz(("-detsize_x", "-detsize_f"), "detsize_x", "float", "mm", "pixels x pixel size", "as -detsize, fast", 1e-3),
    _nz(("-detsize_y", "-detsize_s"), "detsize_y", "float", "mm", "pixels x pixel size", "as -detsize, slow", 1e-3),
    _nz(("-Xbeam",), "Xbeam", "float", "mm", "detector centre", "beam centre, fast (header only)", 1e-3),
    _nz(("-Ybeam",), "Ybeam", "float", "mm", "detector centre", "beam centre, slow (header only)", 1e-3),
    _nz(("-lambda", "-wavelength"), "lambda", "float", "A", "1", "wavelength (header only)"),
    _nz(("-phi",), "phi", "float", "deg", "0", "spindle angle (header only)"),
    _nz(("-osc",), "osc", "float", "deg", "1", "oscillation range (header only)"),
    _nz(("-header",), "header", "str", "", "none",
         "copy the header (and size, pixel, beam centre) of this SMV file into the outputs"),
    _nz(("-noisefile", "-noiseimage"), "noisefile", "str", "", "noiseimage.img", "SMV image with noise"),
    _nz(("-intfile", "-intimage"), "intfile", "str", "", "intimage.img", "SMV image of the noiseless ADU"),
    _nz(("-pgmfile", "-pgmimage"), "pgmfile", "str", "", "image.pgm", "8-bit PGM of the noiseless ADU"),
    _nz(("-nopgm",), "nopgm", "switch", "", "off", "do not write the PGM"),
    _nz(("-bits",), "bits", "int", "", "16", "integer images: 16 (unsigned short) or 32 (long_integer)"),
    _nz(("-noprogress",), "noprogress", "switch", "", "", "accepted for compatibility (no progress meter)"),
    _nz(("-badpix_seed",), "badpix_seed", "int", "", "", "accepted; unused, as in the original"),
    _nz(("-hotpix_seed",), "hotpix_seed", "int", "", "", "accepted; unused, as in the original"),
]

# every command's flags
REGISTRY = {"nanoBragg": FLAGS, "nonBragg": NONBRAGG_FLAGS, "noisify": NOISIFY_FLAGS}


# Flags whose values the experiment file holds: refused, so a run never mixes two geometries.
GEOMETRY_FLAGS = {
    "-cell", "-mat", "-misset", "-lambda", "-wave", "-wavelength", "-energy", "-pixel", "-detpixels",
    "-detpixels_f", "-detpixels_x", "-detpixels_s", "-detpixels_y", "-detsize", "-detsize_f", "-detsize_s",
    "-distance", "-close_distance", "-Xbeam", "-Ybeam", "-Xclose", "-Yclose", "-ORGX", "-ORGY", "-mosflm", "-xds",
    "-adxv", "-denzo", "-dials", "-pivot", "-fdet_vector", "-sdet_vector", "-odet_vector", "-pix0_vector",
    "-beam_vector", "-polar_vector", "-spindle_axis", "-twotheta_axis", "-twotheta", "-detector_rotx",
    "-detector_roty", "-detector_rotz", "-phi", "-osc", "-phistep", "-detector_thick", "-detector_abs",
    "-detector_absorb", "-detector_absorption", "-polar", "-img", "-floatfile", "-floatimage", "-intfile",
    "-intimage", "-noisefile", "-noiseimage", "-pgmfile", "-pgmimage", "-write_expt",
}


def experiment_held_fields(cfg: SimulationConfig) -> str | None:
    """The flag of the first geometry value `cfg` sets that an experiment file
    holds (compared with the defaults), or None."""
    default = SimulationConfig()
    if cfg.detector.convention != default.detector.convention:
        return f"-{cfg.detector.convention.lower()}"
    for name in sorted(GEOMETRY_FLAGS):
        spec = FLAG_BY_NAME[name]
        for section, attr, *component in spec.sets:
            if section == "output":
                continue
            value, base = getattr(getattr(cfg, section), attr), getattr(getattr(default, section), attr)
            if component:
                value, base = value[component[0]], base[component[0]]
            if value != base:
                return spec.names[0] if component else flag_of(section, attr)
    return None


def flag_of(section: str, attr: str) -> str:
    """The flag that sets a configuration field, as messages name it."""
    return FIELD_FLAGS.get((section, attr)) or f"-{attr}"


def number(text: str, kind: str, name: str):
    """A flag's value as an int or finite float; InputError (one line) otherwise."""
    try:
        if kind == "int":
            val = float(text)
            if not math.isfinite(val) or val != int(val):
                raise ValueError
            return int(val)
        val = float(text)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise InputError(f"{name} expects {what}, got '{text}'") from None
    if not math.isfinite(val):  # 'inf', '1e999' and 'nan' reach float() but no model survives them
        raise InputError(f"{name} expects a finite number, got '{text}'")
    return val


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_args(argv: list[str], cfg: SimulationConfig | None = None) -> SimulationConfig:
    """Translate nanoBragg flags into a SimulationConfig (on top of `cfg` when
    given); raise InputError on the first unknown flag, missing value or
    malformed number."""
    cfg = cfg if cfg is not None else SimulationConfig()
    i = 0
    while i < len(argv):
        name = argv[i]
        spec = FLAG_BY_NAME.get(name)
        if spec is None:
            if name.startswith("-") and not _is_number(name):
                raise InputError(f"unknown flag '{name}' (see nanoBragg -h)")
            raise InputError(f"unexpected argument '{name}' (values follow their flag)")
        values = argv[i + 1:]
        if spec.kind == "misset":
            if values and values[0].startswith("rand"):
                spec.apply(cfg, "random")
                i += 2
                continue
            if len(values) < 3:
                raise InputError(f"{name} expects three angles (deg) or 'random'")
            spec.apply(cfg, tuple(number(t, "float", name) for t in values[:3]))
            i += 4
            continue
        if spec.nargs == -1:
            taken = []
            while len(taken) < 6 and len(values) > len(taken) and _is_number(values[len(taken)]):
                taken.append(number(values[len(taken)], "float", name))
            if not taken:
                raise InputError(f"{name} expects 1 to 6 numbers")
            spec.apply(cfg, taken)
            i += 1 + len(taken)
            continue
        if spec.nargs == 0:
            spec.apply(cfg, None)
            i += 1
            continue
        if len(values) < spec.nargs:
            raise InputError(f"{name} expects {spec.nargs} value{'s' if spec.nargs > 1 else ''}")
        raw = values[:spec.nargs]
        if spec.kind == "str":
            if raw[0].startswith("-") and not _is_number(raw[0]) and raw[0] in FLAG_BY_NAME:
                raise InputError(f"{name} expects a value, got the flag '{raw[0]}'")
            parsed = raw[0] if spec.nargs == 1 else tuple(raw)
        else:
            nums = tuple(number(t, spec.kind, name) for t in raw)
            parsed = nums[0] if spec.nargs == 1 else nums
            _check_values(name, spec, nums)
        spec.apply(cfg, parsed)
        _note_substring_reading(cfg, name, values)
        i += 1 + spec.nargs
    return cfg


def _check_values(name: str, spec: Flag, nums: tuple) -> None:
    if name in COUNT_FLAGS:
        low = 0 if name == "-oversample" else 1
        if nums[0] < low:
            raise InputError(f"{name} {nums[0]} is not allowed ({COUNT_RULE})")
    if spec.nargs == 3 and name not in ("-pix0_vector", "-odet_vector") and not any(nums):
        raise InputError(f"{name} 0 0 0 is a zero-length vector; give a direction")


def _atof(text: str) -> float:
    """C's atof: the longest leading number, 0 when there is none."""
    m = re.match(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text)
    return float(m.group(0)) if m else 0.0


def _note_substring_reading(cfg: SimulationConfig, name: str, values: list[str]) -> None:
    """The original matches some flags by substring (strstr), so a longer flag
    also acts as a shorter one; say so where the meaning differs."""
    if name == "-misset_seed":
        if values and "rand" in values[0]:
            redo = "-misset random"
        elif len(values) >= 3:
            redo = "-misset %g %g %g" % tuple(_atof(t) for t in values[:3])
        else:
            return
        cfg.notes.append(f"note: the original nanoBragg also reads '-misset_seed {' '.join(values[:3])}' as "
                         f"'{redo}' (substring flag matching); add {redo} to reproduce it")
    elif name == "-twotheta_axis" and values:
        redo = "-twotheta %g" % _atof(values[0])
        cfg.notes.append(f"note: the original nanoBragg also reads '-twotheta_axis {' '.join(values[:3])}' as '{redo}' "
                         f"(substring flag matching); add {redo} to reproduce it")


def help_text() -> str:
    lines = ["usage: nanoBragg [flags]   (single-dash flags, as the original nanoBragg)",
             "  torchbragg renders the expected photons per pixel of a small crystal.",
             "  Needs a cell (-cell or -mat) and structure factors (-hkl, Fdump.bin or -default_F).", ""]
    for group in ("crystal", "beam", "detector", "output"):
        lines.append(f"{group}:")
        for f in FLAGS:
            if f.group != group:
                continue
            arg = {0: "", 1: " v", 2: " v v", 3: " x y z", 4: " a b c d", -1: " a b c al be ga", -2: " x y z|random"}[f.nargs]
            label = " ".join(f.names) + arg
            lines.append(f"  {label:<42s} {f.help}")
        lines.append("")
    lines.append(f"  Numbers must be finite; {COUNT_RULE}.")
    lines.append("  -h, --help                                 this text")
    return "\n".join(lines)
