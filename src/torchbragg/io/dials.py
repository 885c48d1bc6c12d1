"""DIALS experiment lists (.expt JSON) in and out, with plain JSON: no
cctbx or dxtbx needed.

Frames in the file are local: a panel's or group's origin and axes are given
in its parent group's frame (columns fast, slow, fast x slow), the root's in
the lab frame; lengths in mm, wavelengths in Angstrom, angles in degrees.
Blocks and fields torchbragg does not model (imageset, profile,
scaling_model, exposure times, ...) are kept and written back unchanged.
"""

from __future__ import annotations

import json
import math
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


def _vec(d: dict, key: str, where: str, n: int = 3) -> np.ndarray:
    try:
        v = np.asarray(d[key], dtype=np.float64).reshape(n)
    except KeyError:
        raise InputError(f"{where} has no '{key}'") from None
    except (TypeError, ValueError):
        raise InputError(f"{where}: '{key}' must be {n} numbers") from None
    if not np.all(np.isfinite(v)):
        raise InputError(f"{where}: '{key}' is not finite")
    return v


def _number(d: dict, key: str, where: str, default=None) -> float:
    v = d.get(key, default)
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{where}: '{key}' must be a number") from None
    if not math.isfinite(v):
        raise InputError(f"{where}: '{key}' is not finite")
    return v


def _direction(d: dict, key: str, where: str) -> np.ndarray:
    v = _vec(d, key, where)
    n = np.linalg.norm(v)
    if not n > 0:
        raise InputError(f"{where}: '{key}' has zero length")
    return v / n


def _matrix(d: dict, key: str, where: str) -> np.ndarray:
    return _vec(d, key, where, 9).reshape(3, 3) if key in d else np.eye(3)


# ----------------------------------------------------------------------------- reading

def beam_from_dict(d: dict, **kw) -> Beam:
    where = "beam"
    if d.get("__id__") == "polychromatic" or "wavelength" not in d:
        raise InputError("beam: only monochromatic beams are read (a 'wavelength'); give a spectrum with "
                         "-sourcefile or --spectra instead")
    wavelength = _number(d, "wavelength", where)
    if not wavelength > 0:
        raise InputError(f"beam wavelength must be positive, got {wavelength:g}")
    extras = {k: v for k, v in d.items() if k not in ("direction", "wavelength", "polarization_fraction",
                                                       "polarization_normal")}
    return Beam(_direction(d, "direction", where), wavelength,
                polarization_fraction=_number(d, "polarization_fraction", where, 0.999),
                polarization_normal=_direction(d, "polarization_normal", where) if "polarization_normal" in d
                else (0.0, 1.0, 0.0), extras=extras, **kw)


def _panel_mask(d: dict, image_size) -> np.ndarray | None:
    """Untrusted rectangles [f0, s0, f1, s1] (1-based, inclusive, as dxtbx's
    Pilatus gap masks are written) -> (slow, fast) array, 0 = skip."""
    rects = d.get("mask") or []
    if not rects:
        return None
    nf, ns = image_size
    mask = np.ones((ns, nf), dtype=np.uint8)
    for r in rects:
        f0, s0, f1, s1 = (int(x) for x in r)
        mask[max(s0 - 1, 0):s1, max(f0 - 1, 0):f1] = 0
    return mask


def panel_from_dict(d: dict, where: str, **kw) -> Panel:
    image_size = [int(x) for x in d.get("image_size", (0, 0))]
    if len(image_size) != 2 or min(image_size) <= 0:
        raise InputError(f"{where}: 'image_size' must be two positive integers")
    pixel = _vec(d, "pixel_size", where, 2)
    if not np.all(pixel > 0):
        raise InputError(f"{where}: 'pixel_size' must be positive")
    frame = Frame(_vec(d, "origin", where), _direction(d, "fast_axis", where), _direction(d, "slow_axis", where), **kw)
    extras = {k: v for k, v in d.items() if k not in ("origin", "fast_axis", "slow_axis", "image_size",
                                                       "pixel_size", "thickness", "mu", "trusted_range",
                                                       "name", "material")}
    return Panel(frame, image_size, pixel, thickness=_number(d, "thickness", where, 0.0),
                 mu=_number(d, "mu", where, 0.0), trusted_range=d.get("trusted_range", (-1.0, 1e9)),
                 name=d.get("name", ""), material=d.get("material", ""), mask=_panel_mask(d, image_size),
                 extras=extras, **kw)


def _group_from_dict(d: dict, where: str, **kw) -> PanelGroup:
    children = []
    for i, c in enumerate(d.get("children", [])):
        if "panel" in c:
            children.append(int(c["panel"]))
        else:
            children.append(_group_from_dict(c, f"{where} child {i}", **kw))
    frame = Frame(_vec(d, "origin", where), _direction(d, "fast_axis", where), _direction(d, "slow_axis", where), **kw)
    extras = {k: v for k, v in d.items() if k not in ("origin", "fast_axis", "slow_axis", "children", "name")}
    return PanelGroup(frame, children, name=d.get("name", ""), extras=extras, **kw)


def detector_from_dict(d: dict, **kw) -> Detector:
    panels = d.get("panels")
    if not panels:
        raise InputError("detector has no panels")
    models = [panel_from_dict(p, f"detector panel {i}", **kw) for i, p in enumerate(panels)]
    hierarchy = _group_from_dict(d["hierarchy"], "detector hierarchy", **kw) if d.get("hierarchy") else None
    try:
        return Detector(models, hierarchy, **kw)
    except ValueError as exc:
        raise InputError(f"detector: {exc}") from None


def goniometer_from_dict(d: dict, **kw) -> Goniometer:
    where = "goniometer"
    if "axes" in d:
        axes = [_direction({"a": a}, "a", where) for a in d["axes"]]
        try:
            return Goniometer(axes, d.get("angles"), scan_axis=int(d.get("scan_axis", 0)), names=d.get("names"),
                              **kw)
        except ValueError as exc:
            raise InputError(f"goniometer: {exc}") from None
    return Goniometer([_direction(d, "rotation_axis", where)], fixed_rotation=_matrix(d, "fixed_rotation", where),
                      setting_rotation=_matrix(d, "setting_rotation", where), **kw)


def scan_from_dict(d: dict, **kw) -> Scan:
    """Both layouts: `oscillation` [start, width], or per-image starts under
    `properties` (with `oscillation_width` when there is one image)."""
    where = "scan"
    first, last = (int(x) for x in d.get("image_range", (1, 1)))
    props = d.get("properties") or {}
    if "oscillation" in d:
        start, width = _vec(d, "oscillation", where, 2)
    elif "oscillation" in props:
        starts = np.asarray(props["oscillation"], dtype=np.float64)
        start = float(starts[0])
        width = float(starts[1] - starts[0]) if starts.size > 1 else float(props.get("oscillation_width", [0.0])[0])
    else:
        raise InputError("scan has no oscillation")
    extras = {k: v for k, v in d.items() if k not in ("image_range", "oscillation")}
    try:
        return Scan((first, last), (float(start), float(width)), extras=extras, **kw)
    except ValueError as exc:
        raise InputError(f"scan: {exc}") from None


def crystal_from_dict(d: dict, **kw) -> Crystal:
    where = "crystal"
    a, b, c = (_vec(d, f"real_space_{x}", where) for x in "abc")
    if abs(np.dot(a, np.cross(b, c))) < 1e-9:
        raise InputError("crystal: the real-space vectors are coplanar")
    extras = {k: v for k, v in d.items() if k not in ("real_space_a", "real_space_b", "real_space_c",
                                                       "space_group_hall_symbol")}
    return Crystal.from_real_vectors(a, b, c, space_group=d.get("space_group_hall_symbol", " P 1"), extras=extras,
                                     **kw)


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
    return experiments_from_dict(doc, path, dtype=dtype, device=device)


def experiments_from_dict(doc: dict, path: str = "experiment list", dtype=torch.float64, device="cpu"):
    if not isinstance(doc, dict) or not isinstance(doc.get("experiment"), list) or not doc["experiment"]:
        raise InputError(f"{path} is not a DIALS experiment list (no 'experiment' entries)")
    kw = dict(dtype=dtype, device=device)
    cache: dict = {}

    def model(kind, index):
        if index is None:
            return None
        key = (kind, index)
        if key not in cache:
            block = doc.get(kind) or []
            if not isinstance(index, int) or not 0 <= index < len(block):
                raise InputError(f"{path}: experiment refers to {kind} {index}, which the file does not have")
            if kind in READERS:
                try:
                    cache[key] = READERS[kind](block[index], **kw)
                except InputError as exc:
                    raise InputError(f"{path}: {exc}") from None
            else:
                cache[key] = block[index]
        return cache[key]

    out = []
    for i, e in enumerate(doc["experiment"]):
        if e.get("beam") is None or e.get("detector") is None:
            raise InputError(f"{path}: experiment {i} has no beam or no detector")
        extras = {k: model(k, e.get(k)) for k in ("imageset", "profile", "scaling_model") if e.get(k) is not None}
        out.append(Experiment(beam=model("beam", e["beam"]), detector=model("detector", e["detector"]),
                              crystal=model("crystal", e.get("crystal")),
                              goniometer=model("goniometer", e.get("goniometer")), scan=model("scan", e.get("scan")),
                              identifier=e.get("identifier", ""), extras=extras))
    return ExperimentList(out, history=list(doc.get("history", [])))


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
