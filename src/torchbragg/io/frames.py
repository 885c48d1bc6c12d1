"""The lab frame that DIALS readers of image files (NXmx, miniCBF) build
their models in, and experiments turned into it.

Both readers put the beam along -z (dxtbx's NXmx reader takes the beam
along McStas +z whatever the file says; a mini-header has no beam
direction), and a mini-header's rotation axis is always +x. An experiment
may come in any right-handed frame, so the files and the truth experiment
written beside them are turned by one proper rotation Q into the frame

    z = -(beam travel direction),
    x = the scan's rotation axis with its component along z removed
        (a still: the first panel's fast axis, likewise),
    y = z cross x.

An experiment already in that frame (DIALS's, beam along -z, rotation axis
along x) is unchanged; one in nanoBragg's MOSFLM frame (beam along +x,
spindle along +z) is taken to it as (x, y, z) -> (z, y, -x). A global
rotation changes no image: every model (beam, polarization, detector,
goniometer, crystal) turns with it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def float64_array(t) -> np.ndarray:
    """A tensor (detached, on the CPU) or numbers as a float64 array."""
    if isinstance(t, torch.Tensor):
        t = t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def _unit(v) -> np.ndarray:
    v = float64_array(v).reshape(3)
    n = np.linalg.norm(v)
    if not n > 0:
        raise InputError(f"zero-length direction {tuple(v)}")
    return v / n


def reference_direction(experiment) -> np.ndarray:
    """The lab vector that the reader frame puts along +x (before removing
    its component along the beam): the scan's rotation axis, or for a still
    the first panel's fast axis."""
    if experiment.goniometer is not None and experiment.scan is not None:
        with torch.no_grad():
            return _unit(experiment.goniometer.rotation_axis)
    with torch.no_grad():
        fast = experiment.detector.panel_frames(experiment.beam.incident())[1][0]
    return _unit(fast)


def reader_rotation(experiment) -> np.ndarray:
    """The proper rotation Q (3, 3): Q @ (lab vector) is the vector in the
    reader frame (see the module notes)."""
    with torch.no_grad():
        z = -_unit(experiment.beam.incident())
    ref = reference_direction(experiment)
    x = ref - (ref @ z) * z
    if np.linalg.norm(x) < 1e-9:  # the axis lies along the beam: any x across it
        x = np.cross(z, [0.0, 1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z])


def _rot(q, v) -> list:
    return [float(x) for x in q @ np.asarray(v, dtype=np.float64)]


def _rotate_matrix(q, m) -> list:
    return [float(x) for x in (q @ np.asarray(m, dtype=np.float64).reshape(3, 3) @ q.T).reshape(-1)]


def _is_identity_root(h: dict) -> bool:
    return (np.allclose(h.get("origin", [0, 0, 0]), 0, atol=0) and np.allclose(h.get("fast_axis"), [1, 0, 0], atol=0)
            and np.allclose(h.get("slow_axis"), [0, 1, 0], atol=0)
            and all("panel" in c for c in h.get("children", [])))


def rotate_document(doc: dict, q: np.ndarray) -> dict:
    """An experiment-list document with every lab-frame vector turned by q
    (in place; returned for convenience)."""
    for b in doc.get("beam", []):
        for key in ("direction", "polarization_normal"):
            if key in b:
                b[key] = _rot(q, b[key])
    for d in doc.get("detector", []):
        h = d.get("hierarchy")
        if h is None or _is_identity_root(h):  # panels in the lab frame
            for p in d["panels"]:
                for key in ("origin", "fast_axis", "slow_axis"):
                    p[key] = _rot(q, p[key])
        else:  # the root carries the lab frame; everything below it is local
            for key in ("origin", "fast_axis", "slow_axis"):
                h[key] = _rot(q, h[key])
    for g in doc.get("goniometer", []):
        if "axes" in g:
            g["axes"] = [_rot(q, a) for a in g["axes"]]
        else:
            g["rotation_axis"] = _rot(q, g["rotation_axis"])
            for key in ("fixed_rotation", "setting_rotation"):
                if key in g:
                    g[key] = _rotate_matrix(q, g[key])
    for c in doc.get("crystal", []):
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            c[key] = _rot(q, c[key])
        for key in ("A_at_scan_points", "U_at_scan_points"):  # A = U B turns as U
            if key in c:
                c[key] = [[float(x) for x in (q @ np.asarray(m, dtype=np.float64).reshape(3, 3)).reshape(-1)]
                          for m in c[key]]
    return doc


def as_written(experiment, images: tuple[int, int] | None = None, renumber: bool = False, rotate: bool = True,
               imageset: dict | None = None):
    """The experiment as a reader of its image files gets it: turned into the
    reader frame (`rotate`); with `images` (first, last), its scan cut to
    those images, numbered 1..n from the first one when `renumber` (as dxtbx
    numbers the images of an NXmx file) or as the scan numbers them (file
    names carry the numbers); with `imageset`, naming its files. A new
    Experiment with its own float64 models."""
    return written_list([(experiment, images, imageset)], renumber, rotate)[0]


def written_list(items, renumber: bool = False, rotate: bool = True) -> list:
    """`as_written` for several (experiment, images, imageset) at once: models
    the experiments share stay shared, and all turn with the first one's
    rotation (experiments that share a beam and detector have the same)."""
    from .dials import experiments_from_dict, experiments_to_dict, warnings_given
    doc = experiments_to_dict([e for e, _, _ in items])
    doc["imageset"] = []
    for entry, (e, images, imageset) in zip(doc["experiment"], items):
        if images is not None and e.scan is not None:
            entry["scan"] = len(doc["scan"])
            doc["scan"].append(scan_dict(e.scan, *images, renumber=renumber))
        entry.pop("imageset", None)
        if imageset is not None:
            entry["imageset"] = len(doc["imageset"])
            doc["imageset"].append(imageset)
    used = {entry["scan"] for entry in doc["experiment"] if "scan" in entry}
    if len(used) < len(doc["scan"]):  # drop the uncut scans no experiment refers to any more
        keep = sorted(used)
        doc["scan"] = [doc["scan"][k] for k in keep]
        for entry in doc["experiment"]:
            if "scan" in entry:
                entry["scan"] = keep.index(entry["scan"])
    if rotate:
        rotate_document(doc, reader_rotation(items[0][0]))
    with warnings_given():
        return list(experiments_from_dict(doc).experiments)


# ----------------------------------------------------------------------------- scan timing

def scan_timing(scan) -> tuple[np.ndarray, np.ndarray, float]:
    """(exposure time of each image (s), start epoch of each image (s since
    1970-01-01 UTC), frame period (s)) of a scan, from its per-image
    ``exposure_time`` and ``epochs`` as DIALS stores them. Without epochs
    (or all 0) images follow each other at the period, from the epoch 0; the
    period is the median spacing of the epochs, else the exposure time."""
    n = scan.num_images
    props = scan.extras.get("properties") or {}

    def given(key):  # the current layout (under properties) or the older one, whichever says something
        for where in (props, scan.extras):
            values = np.asarray(where.get(key) or [], dtype=np.float64)
            if values.size and np.any(values != 0):
                return values
        return np.zeros(0)

    exposure = np.zeros(n)
    times = given("exposure_time")
    if times.size:
        exposure[:] = times[:n] if times.size >= n else times[-1]
    epochs = given("epochs")
    if epochs.size >= n and n > 1 and np.any(epochs[:n] != 0):
        period = float(np.median(np.diff(epochs[:n])))
        return exposure, epochs[:n].copy(), period
    period = float(np.median(exposure))
    start = float(epochs[0]) if epochs.size else 0.0
    return exposure, start + period * np.arange(n), period


def scan_dict(scan, first: int, last: int, renumber: bool = False) -> dict:
    """The scan block of images first..last (scan numbers), numbered as the
    scan numbers them or, with `renumber`, 1..n from the first one's start
    angle; with their exposure times and epochs."""
    from .dials import scan_to_dict
    d = scan_to_dict(scan)
    k0, k1 = first - scan.image_range[0], last - scan.image_range[0] + 1
    props = d["properties"]
    for block, keys in ((props, list(props)), (d, ["exposure_time", "epochs"])):  # the older layout at the top
        for key in keys:
            values = block.get(key)
            if isinstance(values, list) and len(values) == scan.num_images:
                block[key] = values[k0:k1]
    if k1 - k0 == 1:  # one image: its width is no longer the spacing of the starts
        props["oscillation_width"] = [float(scan.oscillation[1])]
    d["image_range"] = [1, last - first + 1] if renumber else [first, last]
    d["valid_image_ranges"] = {}
    return d
