"""DIALS experiment lists (.expt JSON) in and out, with plain JSON: no
cctbx or dxtbx needed.

Frames in the file are local: a panel's or group's origin and axes are given
in its parent group's frame (columns fast, slow, fast x slow), the root's in
the lab frame; lengths in mm, wavelengths in Angstrom, angles in degrees.
Blocks and fields torchbragg does not model (imageset, profile,
scaling_model, exposure times, ...) are kept and written back unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..models import Beam, Crystal, Detector, Frame, Goniometer, Panel, PanelGroup, Scan

MODEL_KEYS = ("beam", "detector", "goniometer", "scan", "crystal", "imageset", "profile", "scaling_model")
PANEL_FIELDS = ("name", "type", "fast_axis", "slow_axis", "origin", "raw_image_offset", "image_size", "pixel_size",
                "trusted_range", "thickness", "material", "mu", "identifier", "mask", "gain", "pedestal",
                "px_mm_strategy")


@dataclass
class Experiment:
    """One experiment: models (None where the file has none) and the file's
    blocks torchbragg does not model."""
    beam: Beam
    detector: Detector
    crystal: Crystal | None = None
    goniometer: Goniometer | None = None
    scan: Scan | None = None
    identifier: str = ""
    extras: dict = field(default_factory=dict)  # imageset, profile, scaling_model blocks


@dataclass
class ExperimentList:
    experiments: list[Experiment]
    history: list = field(default_factory=list)

    def __len__(self):
        return len(self.experiments)

    def __getitem__(self, k) -> Experiment:
        return self.experiments[k]


# Physical bounds on what a file may hold: beyond them the arithmetic
# overflows or the experiment is not an X-ray diffraction experiment.
WAVELENGTH_RANGE = (1e-3, 1e3)  # Angstrom
PIXEL_RANGE = (1e-4, 100.0)  # mm
MAX_PANEL_EDGE = 100000  # pixels along one panel edge
DISTANCE_RANGE = (1e-3, 1e6)  # mm, sample to each panel's plane
MAX_THICKNESS = 100.0  # mm of sensor
MAX_SCAN_IMAGES = 1000000  # images in one scan
MAX_DEPTH = 64  # nesting of the JSON document
AXIS_TOLERANCE = 1e-6  # |cos| between a panel's fast and slow axes (dxtbx refuses beyond 1e-7)
ROTATION_TOLERANCE = 1e-5  # |M M^T - 1| of a goniometer's fixed and setting rotations


_SILENT = [0]  # > 0 while re-reading documents this process wrote: their warnings were given once


def warn(message: str) -> None:
    """A degenerate but legal input: one line on stderr, the result stays correct."""
    if not _SILENT[0]:
        print(f"WARNING: {message}", file=sys.stderr)


@contextlib.contextmanager
def warnings_given():
    """Read back a document whose input was already read (and warned about)."""
    _SILENT[0] += 1
    try:
        yield
    finally:
        _SILENT[0] -= 1


def _block(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise InputError(f"{where} must be a JSON object, got {type(d).__name__} {_short(d)}")
    return d


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers(v, key: str, where: str, n: int | None) -> np.ndarray:
    """A list of numbers (not strings, not booleans): n of them, or any count for n None."""
    what = f"{n} number{'s' if n != 1 else ''}" if n is not None else "a list of numbers"
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: '{key}' must be {what}, got {_short(v)}")
    out = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{where}: '{key}' is not finite ({_short(v)})")
    return out


def _vec(d: dict, key: str, where: str, n: int = 3, default=None) -> np.ndarray:
    if key not in d and default is not None:
        return np.asarray(default, dtype=np.float64)
    if key not in d:
        raise InputError(f"{where} has no '{key}'")
    return _numbers(d[key], key, where, n)


def _ints(d: dict, key: str, where: str, n: int, default=None) -> list[int]:
    v = d.get(key, default)
    if v is None:
        raise InputError(f"{where} has no '{key}'")
    nums = _numbers(v, key, where, n)
    if not np.all(nums == np.round(nums)) or not np.all(np.abs(nums) < 2 ** 53):
        raise InputError(f"{where}: '{key}' must be {n} integers, got {_short(v)}")
    return [int(x) for x in nums]


def _int(d: dict, key: str, where: str, default=None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise InputError(f"{where}: '{key}' must be an integer, got {_short(v)}")
    return int(v)


def _number(d: dict, key: str, where: str, default=None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{where}: '{key}' must be a number, got {_short(v)}")
    if not math.isfinite(v):
        raise InputError(f"{where}: '{key}' is not finite ({v})")
    return float(v)


def _within(v: float, bounds, key: str, where: str, unit: str) -> float:
    lo, hi = bounds
    if not lo <= v <= hi:
        raise InputError(f"{where}: '{key}' {v:g} {unit} is outside the physical range {lo:g} to {hi:g} {unit}")
    return v


def _direction(d: dict, key: str, where: str) -> np.ndarray:
    v = _vec(d, key, where)
    n = np.linalg.norm(v)
    if not n > 0:
        raise InputError(f"{where}: '{key}' has zero length")
    return v / n


def _rotation(d: dict, key: str, where: str) -> np.ndarray:
    m = _vec(d, key, where, 9, default=np.eye(3).ravel()).reshape(3, 3)
    if not np.allclose(m @ m.T, np.eye(3), atol=ROTATION_TOLERANCE) or not np.linalg.det(m) > 0:
        raise InputError(f"{where}: '{key}' is not a rotation matrix (orthonormal, determinant +1)")
    return m


def _depth(doc) -> int:
    """Nesting depth of a JSON document, without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


# ----------------------------------------------------------------------------- reading

def beam_from_dict(d: dict, **kw) -> Beam:
    where = "beam"
    _block(d, where)
    if d.get("__id__") == "polychromatic" or "wavelength" not in d:
        raise InputError("beam: only monochromatic beams are read (a 'wavelength'); give a spectrum with "
                         "-sourcefile or --spectra instead")
    wavelength = _number(d, "wavelength", where)
    if not wavelength > 0:
        raise InputError(f"beam wavelength must be positive, got {wavelength:g}")
    _within(wavelength, WAVELENGTH_RANGE, "wavelength", where, "A")
    direction = _direction(d, "direction", where)
    fraction = _number(d, "polarization_fraction", where, 0.999)
    if not 0 <= fraction <= 1:
        raise InputError(f"beam: 'polarization_fraction' {fraction:g} is not a fraction between 0 and 1")
    normal = (0.0, 1.0, 0.0)
    if "polarization_normal" in d:
        normal = _direction(d, "polarization_normal", where)
        if np.linalg.norm(np.cross(normal, direction)) < 1e-6:
            raise InputError("beam: 'polarization_normal' lies along the beam direction; it must be a direction "
                             "across the beam (the normal of the polarization plane)")
    extras = {k: v for k, v in d.items() if k not in ("direction", "wavelength", "polarization_fraction",
                                                       "polarization_normal")}
    return Beam(direction, wavelength, polarization_fraction=fraction, polarization_normal=normal, extras=extras,
                **kw)


def _panel_mask(d: dict, image_size, where: str) -> np.ndarray | None:
    """Untrusted rectangles [f0, s0, f1, s1] (1-based, inclusive, as dxtbx's
    Pilatus gap masks are written) -> (slow, fast) array, 0 = skip."""
    rects = d.get("mask") or []
    if not isinstance(rects, list):
        raise InputError(f"{where}: 'mask' must be a list of rectangles [f0, s0, f1, s1], got {_short(rects)}")
    if not rects:
        return None
    nf, ns = image_size
    mask = np.ones((ns, nf), dtype=np.uint8)
    for i, r in enumerate(rects):
        f0, s0, f1, s1 = _ints({"mask": r}, "mask", f"{where} mask rectangle {i}", 4)
        if f1 < f0 or s1 < s0:
            raise InputError(f"{where}: mask rectangle {i} {r} is empty (give [f0, s0, f1, s1] with f0 <= f1, "
                             "s0 <= s1)")
        mask[max(s0 - 1, 0):max(s1, 0), max(f0 - 1, 0):max(f1, 0)] = 0
    return mask


def _panel_axes(d: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    fast, slow = _direction(d, "fast_axis", where), _direction(d, "slow_axis", where)
    cos = float(np.dot(fast, slow))
    if abs(cos) > 1 - 1e-9:
        raise InputError(f"{where}: 'fast_axis' and 'slow_axis' are parallel; a panel needs two directions")
    if abs(cos) > AXIS_TOLERANCE:
        raise InputError(f"{where}: 'fast_axis' and 'slow_axis' are not perpendicular (they meet at "
                         f"{math.degrees(math.acos(cos)):.6g} degrees)")
    return fast, slow


def panel_from_dict(d: dict, where: str, **kw) -> Panel:
    _block(d, where)
    image_size = _ints(d, "image_size", where, 2)
    if min(image_size) <= 0:
        raise InputError(f"{where}: 'image_size' must be two positive integers, got {image_size}")
    if max(image_size) > MAX_PANEL_EDGE:
        raise InputError(f"{where}: 'image_size' {image_size} is beyond any detector (limit {MAX_PANEL_EDGE} "
                         "pixels an edge)")
    pixel = _vec(d, "pixel_size", where, 2)
    if not np.all(pixel > 0):
        raise InputError(f"{where}: 'pixel_size' must be positive")
    for p in pixel:
        _within(float(p), PIXEL_RANGE, "pixel_size", where, "mm")
    fast, slow = _panel_axes(d, where)
    thickness, mu = _number(d, "thickness", where, 0.0), _number(d, "mu", where, 0.0)
    if not 0 <= thickness <= MAX_THICKNESS:
        raise InputError(f"{where}: 'thickness' {thickness:g} mm must be between 0 and {MAX_THICKNESS:g} mm")
    if mu < 0:
        raise InputError(f"{where}: 'mu' {mu:g} (the sensor's attenuation coefficient) must not be negative")
    trusted = _vec(d, "trusted_range", where, 2, default=(-1.0, 1e9))
    if trusted[0] > trusted[1]:
        raise InputError(f"{where}: 'trusted_range' {list(trusted)} is empty (give [low, high])")
    frame = Frame(_vec(d, "origin", where), fast, slow, **kw)
    extras = {k: v for k, v in d.items() if k not in ("origin", "fast_axis", "slow_axis", "image_size",
                                                       "pixel_size", "thickness", "mu", "trusted_range",
                                                       "name", "material")}
    return Panel(frame, image_size, pixel, thickness=thickness, mu=mu, trusted_range=tuple(trusted),
                 name=str(d.get("name", "")), material=str(d.get("material", "")),
                 mask=_panel_mask(d, image_size, where), extras=extras, **kw)


def _group_from_dict(d: dict, where: str, **kw) -> PanelGroup:
    _block(d, where)
    children = []
    kids = d.get("children", [])
    if not isinstance(kids, list):
        raise InputError(f"{where}: 'children' must be a list, got {_short(kids)}")
    for i, c in enumerate(kids):
        _block(c, f"{where} child {i}")
        if "panel" in c:
            children.append(_int(c, "panel", f"{where} child {i}"))
        else:
            children.append(_group_from_dict(c, f"{where} child {i}", **kw))
    fast, slow = _panel_axes(d, where)
    frame = Frame(_vec(d, "origin", where), fast, slow, **kw)
    extras = {k: v for k, v in d.items() if k not in ("origin", "fast_axis", "slow_axis", "children", "name")}
    return PanelGroup(frame, children, name=str(d.get("name", "")), extras=extras, **kw)


def detector_from_dict(d: dict, **kw) -> Detector:
    _block(d, "detector")
    panels = d.get("panels")
    if not panels or not isinstance(panels, list):
        raise InputError("detector has no panels")
    _check_memory([_ints(_block(p, f"detector panel {i}"), "image_size", f"detector panel {i}", 2)
                   for i, p in enumerate(panels)])
    models = [panel_from_dict(p, f"detector panel {i}", **kw) for i, p in enumerate(panels)]
    hierarchy = _group_from_dict(d["hierarchy"], "detector hierarchy", **kw) if d.get("hierarchy") else None
    try:
        detector = Detector(models, hierarchy, **kw)
    except ValueError as exc:
        raise InputError(f"detector: {exc}") from None
    _check_panels(detector)
    return detector


def _check_memory(sizes) -> None:
    """Refuse, before any array is made, a detector whose images no machine here can hold."""
    from ..resolve import BYTES_PER_PIXEL
    from ..validate import physical_memory
    pixels = sum(abs(f) * abs(s) for f, s in sizes)
    need, have = pixels * BYTES_PER_PIXEL, physical_memory()
    if need > have:
        raise InputError(f"detector: its {pixels:g} pixels need about {need / 2**30:.1f} GiB for their images, more "
                         f"than this machine's {have / 2**30:.1f} GiB")


def _check_panels(detector: Detector) -> None:
    """Every panel (in the lab frame, after its hierarchy) lies in a plane at a
    physical distance from the sample; an all-masked panel is legal but worth a word."""
    with torch.no_grad():
        origin, _, _, normal = (t.double().cpu().numpy() for t in detector.panel_frames(None))
    for i, panel in enumerate(detector.panels):
        distance = abs(float(origin[i] @ normal[i]))
        if distance < DISTANCE_RANGE[0]:
            raise InputError(f"detector panel {i}: its plane passes through the sample (distance {distance:g} mm); "
                             "check its origin and axes")
        if distance > DISTANCE_RANGE[1]:
            raise InputError(f"detector panel {i}: its plane lies {distance:g} mm from the sample, beyond the "
                             f"physical range (up to {DISTANCE_RANGE[1]:g} mm)")
        if panel.mask is not None and not bool(panel.mask.any()):
            warn(f"detector panel {i} is masked entirely: it stays empty")


def goniometer_from_dict(d: dict, **kw) -> Goniometer:
    where = "goniometer"
    _block(d, where)
    if "axes" in d:
        if not isinstance(d["axes"], list) or not d["axes"]:
            raise InputError(f"{where}: 'axes' must be a list of directions, got {_short(d['axes'])}")
        axes = [_direction({"axes": a}, "axes", where) for a in d["axes"]]
        angles = _vec(d, "angles", where, len(axes), default=np.zeros(len(axes)))
        names = d.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != len(axes)):
            raise InputError(f"{where}: 'names' must name each of the {len(axes)} axes, got {_short(names)}")
        scan_axis = _int(d, "scan_axis", where, 0)
        if not 0 <= scan_axis < len(axes):
            raise InputError(f"{where}: 'scan_axis' {scan_axis} is not one of the {len(axes)} axes (0-based)")
        return Goniometer(axes, angles, scan_axis=scan_axis, names=[str(n) for n in names] if names else None,
                          **kw)
    return Goniometer([_direction(d, "rotation_axis", where)], fixed_rotation=_rotation(d, "fixed_rotation", where),
                      setting_rotation=_rotation(d, "setting_rotation", where), **kw)


def scan_from_dict(d: dict, **kw) -> Scan:
    """Both layouts: `oscillation` [start, width], or per-image starts under
    `properties` (with `oscillation_width` when there is one image)."""
    where = "scan"
    _block(d, where)
    first, last = _ints(d, "image_range", where, 2, default=[1, 1])
    if last < first:
        raise InputError(f"{where}: 'image_range' {[first, last]} is empty")
    count = last - first + 1
    if count > MAX_SCAN_IMAGES:
        raise InputError(f"{where}: 'image_range' {[first, last]} holds {count} images, more than the "
                         f"{MAX_SCAN_IMAGES} a scan may hold")
    props = d.get("properties") or {}
    _block(props, f"{where} properties")
    for key, values in props.items():
        if isinstance(values, list) and len(values) != count and key != "oscillation_width":
            raise InputError(f"{where}: property '{key}' lists {len(values)} values for the {count} images of "
                             f"'image_range' {[first, last]}")
    if "oscillation" in d:
        start, width = _vec(d, "oscillation", where, 2)
    elif "oscillation" in props:
        starts = _numbers(props["oscillation"], "oscillation", f"{where} properties", None)
        if starts.size == 0:
            raise InputError(f"{where}: property 'oscillation' is empty")
        start = float(starts[0])
        if starts.size > 1:
            steps = np.diff(starts)
            width = float(steps[0])
            if np.max(np.abs(steps - width)) > 1e-6 * max(1.0, abs(width)):
                k = int(np.argmax(np.abs(steps - width)))
                raise InputError(f"{where}: the images' oscillation widths differ ({width:g} then {steps[k]:g} "
                                 f"degrees at image {first + k + 1}); a scan turns by the same angle per image")
        else:
            width = float(_vec(props, "oscillation_width", f"{where} properties", 1, default=[0.0])[0])
    else:
        raise InputError("scan has no oscillation")
    if count > 1 and width == 0:
        warn(f"the scan's {count} images have an oscillation width of 0: each is a still at {start:g} degrees")
    extras = {k: v for k, v in d.items() if k not in ("image_range", "oscillation")}
    return Scan((first, last), (float(start), float(width)), extras=extras, **kw)


def crystal_from_dict(d: dict, **kw) -> Crystal:
    where = "crystal"
    _block(d, where)
    a, b, c = (_vec(d, f"real_space_{x}", where) for x in "abc")
    if np.abs(np.stack([a, b, c])).max() > 1e5:
        raise InputError("crystal: a real-space vector is longer than 1e5 A, beyond any crystal's cell")
    if abs(np.dot(a, np.cross(b, c))) < 1e-9:
        raise InputError("crystal: the real-space vectors are coplanar")
    lengths = [np.linalg.norm(v) for v in (a, b, c)]
    if not min(lengths) >= 0.1:
        raise InputError(f"crystal: a cell edge of {min(lengths):g} A is shorter than any crystal's (0.1 A)")
    extras = {k: v for k, v in d.items() if k not in ("real_space_a", "real_space_b", "real_space_c",
                                                       "space_group_hall_symbol")}
    return Crystal.from_real_vectors(a, b, c, space_group=str(d.get("space_group_hall_symbol", " P 1")),
                                     extras=extras, **kw)


READERS = {"beam": beam_from_dict, "detector": detector_from_dict, "goniometer": goniometer_from_dict,
           "scan": scan_from_dict, "crystal": crystal_from_dict}


def read_experiments(path: str, dtype=torch.float64, device="cpu") -> ExperimentList:
    """Every experiment of a DIALS experiment list; experiments that share a
    model in the file share the module."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise InputError(f"cannot read experiment file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"experiment file {path} is not JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"experiment file {path} is nested deeper than JSON readers allow") from None
    return experiments_from_dict(doc, path, dtype=dtype, device=device)


def experiments_from_dict(doc: dict, path: str = "experiment list", dtype=torch.float64, device="cpu"):
    if not isinstance(doc, dict) or not isinstance(doc.get("experiment"), list) or not doc["experiment"]:
        raise InputError(f"{path} is not a DIALS experiment list (no 'experiment' entries)")
    if _depth(doc) > MAX_DEPTH:
        raise InputError(f"{path} is nested more than {MAX_DEPTH} levels deep; no experiment list is")
    kw = dict(dtype=dtype, device=device)
    cache: dict = {}

    def model(kind, index):
        if index is None:
            return None
        key = (kind, index)
        if key not in cache:
            block = doc.get(kind) or []
            if (not isinstance(index, int) or isinstance(index, bool) or not isinstance(block, list)
                    or not 0 <= index < len(block)):
                raise InputError(f"{path}: experiment refers to {kind} {_short(index)}, which the file does not "
                                 "have")
            if kind in READERS:
                try:
                    cache[key] = READERS[kind](block[index], **kw)
                except InputError as exc:
                    raise InputError(f"{path}: {exc}") from None
            else:
                cache[key] = block[index]
        return cache[key]

    out, met = [], set()
    for i, e in enumerate(doc["experiment"]):
        _block(e, f"{path}: experiment {i}")
        if e.get("beam") is None or e.get("detector") is None:
            raise InputError(f"{path}: experiment {i} has no beam or no detector")
        extras = {k: model(k, e.get(k)) for k in ("imageset", "profile", "scaling_model") if e.get(k) is not None}
        beam, detector = model("beam", e["beam"]), model("detector", e["detector"])
        goniometer, scan = model("goniometer", e.get("goniometer")), model("scan", e.get("scan"))
        if scan is not None and goniometer is None and float(scan.oscillation[1]) != 0:
            raise InputError(f"{path}: experiment {i} has a scan turning {float(scan.oscillation[1]):g} degrees "
                             "per image but no goniometer to turn the crystal")
        if (id(beam), id(detector)) not in met:
            _check_beam_meets(beam, detector, f"{path}: experiment {i}")
            met.add((id(beam), id(detector)))
        out.append(Experiment(beam=beam, detector=detector, crystal=model("crystal", e.get("crystal")),
                              goniometer=goniometer, scan=scan, identifier=str(e.get("identifier", "")),
                              extras=extras))
    history = doc.get("history", [])
    return ExperimentList(out, history=list(history) if isinstance(history, list) else [])


def _check_beam_meets(beam: Beam, detector: Detector, where: str) -> None:
    """The beam must not run inside a panel's plane (no distance along the beam)."""
    with torch.no_grad():
        incident = beam.incident().double().cpu().numpy()
        _, _, _, normal = (t.double().cpu().numpy() for t in detector.panel_frames(None))
    if np.all(np.abs(normal @ incident) < 1e-9):
        raise InputError(f"{where}: the beam runs parallel to every panel; no panel faces it")


# ----------------------------------------------------------------------------- writing

def _list(t) -> list:
    return [float(x) for x in torch.as_tensor(t).detach().double().reshape(-1).cpu()]


def beam_to_dict(beam: Beam) -> dict:
    with torch.no_grad():
        d = {"__id__": "monochromatic", "direction": _list(-beam.incident()), "wavelength": float(beam.wavelength),
             "divergence": 0.0, "sigma_divergence": 0.0,
             "polarization_normal": _list(beam.polarization_normal),
             "polarization_fraction": float(beam.polarization_fraction),
             "flux": 0.0, "transmission": 1.0, "probe": "x-ray", "sample_to_source_distance": 0.0}
    d.update(beam.extras)
    return d


def _frame_dict(frame, incident) -> dict:
    with torch.no_grad():
        origin, fast, slow, _ = frame(incident)
    return {"origin": _list(origin), "fast_axis": _list(fast), "slow_axis": _list(slow)}


def _panel_dict(panel: Panel, frame: dict) -> dict:
    d = {"name": panel.name, "type": "SENSOR_PAD", "raw_image_offset": [0, 0], "identifier": "", "mask": [],
         "gain": 1.0, "pedestal": 0.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"}}
    d.update(panel.extras)
    with torch.no_grad():
        d.update(frame, image_size=list(panel.image_size), pixel_size=_list(panel.pixel_size),
                 trusted_range=list(panel.trusted_range), thickness=float(panel.thickness), mu=float(panel.mu),
                 material=panel.material or ("Si" if float(panel.thickness) > 0 else ""))
    if float(panel.thickness) > 0 and float(panel.mu) > 0 and d["px_mm_strategy"].get("type") == "SimplePxMmStrategy":
        d["px_mm_strategy"] = {"type": "ParallaxCorrectedPxMmStrategy"}
    return {k: d[k] for k in PANEL_FIELDS if k in d} | {k: v for k, v in d.items() if k not in PANEL_FIELDS}


def _group_dict(group: PanelGroup, incident) -> dict:
    d = {"name": group.name, "type": "", "raw_image_offset": [0, 0], "image_size": [0, 0], "pixel_size": [0.0, 0.0],
         "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "", "mu": 0.0, "identifier": "", "mask": [],
         "gain": 1.0, "pedestal": 0.0, "px_mm_strategy": {"type": "SimplePxMmStrategy"}}
    d.update(group.extras)
    d.update(_frame_dict(group.frame, incident))
    d["children"] = [{"panel": c} if isinstance(c, int) else _group_dict(group.groups[c[1]], incident)
                     for c in group.children_order]
    return d


def detector_to_dict(detector: Detector, incident) -> dict:
    """Panels with their local frames under the hierarchy, or, without one, in
    the lab frame under an identity root as dxtbx writes single panels."""
    if detector.hierarchy is not None:
        panels = [_panel_dict(p, _frame_dict(p.frame, incident)) for p in detector.panels]
        return {"panels": panels, "hierarchy": _group_dict(detector.hierarchy, incident)}
    with torch.no_grad():
        origin, fast, slow, _ = detector.panel_frames(incident)
    panels = [_panel_dict(p, {"origin": _list(origin[i]), "fast_axis": _list(fast[i]), "slow_axis": _list(slow[i])})
              for i, p in enumerate(detector.panels)]
    root = {"name": "", "type": "", "origin": [0.0, 0.0, 0.0], "fast_axis": [1.0, 0.0, 0.0],
            "slow_axis": [0.0, 1.0, 0.0], "raw_image_offset": [0, 0], "image_size": [0, 0],
            "pixel_size": [0.0, 0.0], "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "", "mu": 0.0,
            "identifier": "", "mask": [], "gain": 1.0, "pedestal": 0.0,
            "px_mm_strategy": {"type": "SimplePxMmStrategy"}, "children": [{"panel": i} for i in range(len(panels))]}
    return {"panels": panels, "hierarchy": root}


def goniometer_to_dict(gonio: Goniometer) -> dict:
    with torch.no_grad():
        if gonio.axes.shape[0] == 1:
            return {"rotation_axis": _list(gonio.axes[0]), "fixed_rotation": _list(gonio.fixed_rotation),
                    "setting_rotation": _list(gonio.setting_rotation)}
        return {"axes": [_list(a) for a in gonio.axes], "angles": _list(gonio.angles), "names": list(gonio.names),
                "scan_axis": gonio.scan_axis}


def scan_to_dict(scan: Scan) -> dict:
    """The current dxtbx layout: per-image starts under `properties`."""
    first, last = scan.image_range
    with torch.no_grad():
        start, width = (float(x) for x in scan.oscillation)
    d = {"image_range": [first, last], "batch_offset": 0, "valid_image_ranges": {}}
    d.update({k: v for k, v in scan.extras.items() if k != "properties"})
    props = dict(scan.extras.get("properties") or {})
    n = last - first + 1
    props["oscillation"] = [start + i * width for i in range(n)]
    if n == 1:
        props["oscillation_width"] = [width]
    else:
        props.pop("oscillation_width", None)
    props.setdefault("exposure_time", [0.0] * n)
    props.setdefault("epochs", [0.0] * n)
    d["properties"] = props
    return d


def crystal_to_dict(crystal: Crystal) -> dict:
    with torch.no_grad():
        real = crystal.real_vectors()
    d = {"__id__": "crystal"}
    d.update(crystal.extras)
    d.update(real_space_a=_list(real[0]), real_space_b=_list(real[1]), real_space_c=_list(real[2]),
             space_group_hall_symbol=crystal.space_group)
    return d


def experiments_to_dict(experiments: list[Experiment], history: list | None = None) -> dict:
    """An experiment-list document; models shared between experiments are written once."""
    doc = {"__id__": "ExperimentList", "experiment": [], "history": list(history or [])}
    for k in MODEL_KEYS:
        doc[k] = []
    seen: dict = {}

    def index(kind, obj, to_dict):
        if obj is None:
            return None
        key = (kind, id(obj))
        if key not in seen:
            seen[key] = len(doc[kind])
            doc[kind].append(to_dict(obj))
        return seen[key]

    for e in experiments:
        incident = e.beam.incident()
        entry = {"__id__": "Experiment", "identifier": e.identifier,
                 "beam": index("beam", e.beam, beam_to_dict),
                 "detector": index("detector", e.detector, lambda d: detector_to_dict(d, incident)),
                 "goniometer": index("goniometer", e.goniometer, goniometer_to_dict),
                 "scan": index("scan", e.scan, scan_to_dict),
                 "crystal": index("crystal", e.crystal, crystal_to_dict)}
        for k, block in e.extras.items():
            entry[k] = index(k, block, lambda b: b)
        doc["experiment"].append({k: v for k, v in entry.items() if v is not None})
    return doc


def write_experiments(path: str, experiments: list[Experiment], history: list | None = None) -> None:
    from .atomic import atomic_write
    text = json.dumps(experiments_to_dict(experiments, history), indent=2)
    atomic_write(path, (text + "\n").encode())
