"""Simulated images as Pilatus-style miniCBF files that DIALS (dxtbx) reads.

A miniCBF describes its geometry in the free-text header of
``_array_data.header_contents``, one ``# Keyword value`` line per item, the
way a Pilatus writes it. dxtbx builds its models from a few of those lines:

* ``Pixel_size`` (m x m), ``Wavelength`` (A), ``Detector_distance`` (m) and
  ``Beam_xy`` (pixels), from which it places a flat panel perpendicular to
  the beam: fast axis +x, slow axis -y, beam travelling along -z, origin
  ``(-Beam_x * pixel_x, Beam_y * pixel_y, -distance)``. Beam_xy counts
  pixels from the outer corner of the first pixel (pixel centres lie at
  0.5, 1.5, ...), so the beam centre in mm is ``Beam_xy * pixel size`` with
  no half-pixel shift;
* ``Count_cutoff`` (integer counts): the upper end of the trusted range;
* ``Exposure_period``, ``Start_angle``, ``Angle_increment``: the scan, with a
  single rotation axis along +x;
* a line with only a date-time (``# 2026-11-29T02:00:00.000``): the time
  stamp, required for Pilatus images;
* ``# Silicon sensor, thickness ... m`` (or ``CdTe``): the sensor.

Images whose size is a Pilatus module tiling (487 x 195 modules with 7 and 17
pixel gaps) carry ``header_convention PILATUS_1.2`` and a ``# Detector:
PILATUS ...`` line; dxtbx masks the module gaps of such images and refuses
other sizes under that convention, so other sizes carry ``GENERIC_MINI``,
the convention dxtbx reads as a simulated pixel-array detector.

The header cannot describe a tilted detector or panels that do not tile one
frame: a tilt of up to 2 degrees (refined real detectors) is written as the
untilted approximation, larger tilts and such panels are refused (NeXus
describes them).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..units import HC_EV_ANGSTROM_CODATA

# Pilatus modules and the gaps between them, in pixels (fast, slow)
MODULE = (487, 195)
GAP = (7, 17)
PILATUS_MODELS = {(1, 1): "100K", (1, 3): "300K", (3, 1): "300K-W", (2, 5): "1M", (3, 8): "2M", (5, 12): "6M"}
SERIAL = "60-0000"
INT32_MAX = 2**31 - 1
# The header describes a detector perpendicular to the beam. Refined real
# detectors are tilted by a fraction of a degree: up to this angle (radians)
# the header holds the untilted approximation (same distance along the
# normal and beam centre) and the experiment file beside the images holds the
# exact geometry; beyond it the images are refused.
PERPENDICULAR_TOLERANCE = math.radians(2.0)
# panels tile one frame when their origins lie this close (mm) to where the frame puts them
TILE_TOLERANCE = 1e-6


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def _module_count(n: int, module: int, gap: int) -> int | None:
    """How many modules (with gaps between them) make n pixels, or None."""
    k, rest = divmod(n + gap, module + gap)
    return k if k >= 1 and rest == 0 else None


def pilatus_model(image_size) -> str | None:
    """'PILATUS 6M' and the like for an image size (fast, slow) that tiles
    Pilatus modules, None for any other size."""
    nf = _module_count(int(image_size[0]), MODULE[0], GAP[0])
    ns = _module_count(int(image_size[1]), MODULE[1], GAP[1])
    if nf is None or ns is None:
        return None
    name = PILATUS_MODELS.get((nf, ns))
    return f"PILATUS {name}" if name else f"PILATUS {nf}x{ns} modules"


# ----------------------------------------------------------------------------- geometry

def _frame(experiment):
    """The one frame the image describes: (origin, fast, slow, normal) in mm,
    pixel size (2,), image size (fast, slow), sensor thickness (mm), material,
    trusted range and, per panel, its (fast, slow) offset in the frame."""
    detector = experiment.detector
    panels = list(detector.panels)
    with torch.no_grad():
        origin, fast, slow, normal = (_np(t) for t in detector.panel_frames(experiment.beam.incident()))
    pixel = [_np(p.pixel_size).reshape(2) for p in panels]
    if len(panels) == 1:
        offsets = [(0, 0)]
        size = panels[0].image_size
        frame_origin = origin[0]
    else:
        offsets = []
        for i, p in enumerate(panels):
            off = p.extras.get("raw_image_offset")
            if off is None or len(off) != 2:
                raise InputError(f"a miniCBF holds one image frame: panel {i} ({p.name!r}) of the "
                                 f"{len(panels)}-panel detector has no raw_image_offset placing it in one; "
                                 "write the panels as NeXus instead")
            offsets.append((int(off[0]), int(off[1])))
        size = (max(o[0] + p.image_size[0] for o, p in zip(offsets, panels)),
                max(o[1] + p.image_size[1] for o, p in zip(offsets, panels)))
        frame_origin = origin[0] - offsets[0][0] * pixel[0][0] * fast[0] - offsets[0][1] * pixel[0][1] * slow[0]
        covered = np.zeros((size[1], size[0]), dtype=bool)
        for i, (o, p) in enumerate(zip(offsets, panels)):
            where = frame_origin + o[0] * pixel[0][0] * fast[0] + o[1] * pixel[0][1] * slow[0]
            if (not np.allclose(pixel[i], pixel[0], rtol=0, atol=1e-12)
                    or not np.allclose(fast[i], fast[0], rtol=0, atol=PERPENDICULAR_TOLERANCE)
                    or not np.allclose(slow[i], slow[0], rtol=0, atol=PERPENDICULAR_TOLERANCE)
                    or not np.allclose(origin[i], where, rtol=0, atol=TILE_TOLERANCE)):
                raise InputError(f"a miniCBF holds one image frame: panel {i} ({p.name!r}) is not where its "
                                 f"raw_image_offset {list(o)} puts it in the frame of panel 0 (same axes, pixel "
                                 "size and plane); write the panels as NeXus instead")
            block = covered[o[1]:o[1] + p.image_size[1], o[0]:o[0] + p.image_size[0]]
            if o[0] < 0 or o[1] < 0 or block.any():
                raise InputError(f"a miniCBF holds one image frame: panel {i} ({p.name!r}) at raw_image_offset "
                                 f"{list(o)} overlaps another panel or lies outside the frame; write the panels "
                                 "as NeXus instead")
            block[...] = True
    first = panels[0]
    return dict(origin=frame_origin, fast=fast[0], slow=slow[0], normal=normal[0], pixel=pixel[0],
                size=(int(size[0]), int(size[1])), offsets=offsets,
                thickness=float(_np(first.thickness)), material=first.material,
                trusted=first.trusted_range)


def _geometry(experiment, frame) -> tuple[float, float, float]:
    """Distance (mm) from the sample to the detector plane along its normal
    and the beam centre (fast, slow) in mm from the frame origin."""
    incident = _np(experiment.beam.incident()).reshape(3)
    incident = incident / np.linalg.norm(incident)
    normal = frame["normal"] / np.linalg.norm(frame["normal"])
    cos = float(np.dot(incident, normal))
    angle = math.atan2(float(np.linalg.norm(np.cross(incident, normal))), cos)
    if angle > PERPENDICULAR_TOLERANCE:
        raise InputError(f"the detector is tilted {math.degrees(angle):.6g} deg from perpendicular to the beam; "
                         "a miniCBF header cannot describe more than 2 deg of tilt: write NeXus instead")
    distance = float(np.dot(frame["origin"], normal))
    if not distance > 0:
        raise InputError(f"the detector plane is {distance:g} mm from the sample; a miniCBF needs it downstream")
    hit = distance / cos * incident - frame["origin"]
    return distance, float(np.dot(hit, frame["fast"])), float(np.dot(hit, frame["slow"]))


def _angles(experiment, image: int) -> tuple[float, float]:
    scan = experiment.scan
    if scan is None:
        return 0.0, 0.0
    first, last = scan.image_range
    if not first <= image <= last:
        raise InputError(f"image {image} is outside the scan's images {first}..{last}")
    start, width = (float(x) for x in _np(scan.oscillation).reshape(2))
    return start + (image - first) * width, width


def _timestamp(experiment, image: int, exposure_time: float) -> str:
    """The image's epoch from the scan when it has one, else the exposures
    counted from 1970-01-01, as YYYY-MM-DDTHH:MM:SS.mmm (UTC)."""
    seconds = 0.0
    scan = experiment.scan
    if scan is not None:
        k = image - scan.image_range[0]
        epochs = (scan.extras.get("properties") or {}).get("epochs") or []
        if 0 <= k < len(epochs) and epochs[k]:
            seconds = float(epochs[k])
        else:
            seconds = k * exposure_time
    whole = math.floor(seconds)
    millis = min(int(round((seconds - whole) * 1000)), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}"


def _microns(mm: float) -> str:
    return f"{mm * 1000:.7g}"


# ----------------------------------------------------------------------------- header

def _header(experiment, frame, image: int, exposure_time: float) -> tuple[str, str]:
    """(header convention, header contents)."""
    exposure_time = float(exposure_time)
    if not (math.isfinite(exposure_time) and exposure_time >= 0):
        raise InputError(f"exposure time must be a non-negative number of seconds, got {exposure_time!r}")
    distance, beam_f, beam_s = _geometry(experiment, frame)
    start, width = _angles(experiment, image)
    # the beam centre in pixels of the pixel size as written, so that
    # Beam_xy * Pixel_size gives back the centre in mm
    px_text = [_microns(p) for p in frame["pixel"]]
    px_written = [float(t) / 1000 for t in px_text]
    beam_x, beam_y = beam_f / px_written[0], beam_s / px_written[1]
    wavelength = float(_np(experiment.beam.wavelength).reshape(-1)[0])
    cutoff = frame["trusted"][1]
    cutoff = INT32_MAX if not math.isfinite(cutoff) else int(min(max(math.floor(cutoff), 0), INT32_MAX))
    model = pilatus_model(frame["size"])
    convention = "PILATUS_1.2" if model else "GENERIC_MINI"
    lines = [f"Detector: {model or 'SIMULATED'}, S/N {SERIAL}",
             _timestamp(experiment, image, exposure_time),
             f"Pixel_size {px_text[0]}e-6 m x {px_text[1]}e-6 m"]
    if frame["thickness"] > 0:
        sensor = "CdTe" if frame["material"] == "CdTe" else "Silicon"
        lines.append(f"{sensor} sensor, thickness {frame['thickness'] / 1000:.6f} m")
    lines += [f"Exposure_time {exposure_time:.7f} s",
              f"Exposure_period {exposure_time:.7f} s",
              "Tau = 0 s",
              f"Count_cutoff {cutoff} counts",
              f"Threshold_setting: {HC_EV_ANGSTROM_CODATA / wavelength / 2:.0f} eV",
              "N_excluded_pixels = 0",
              "Excluded_pixels: (nil)",
              "Flat_field: (nil)",
              "Trim_file: (nil)",
              f"Wavelength {wavelength:.6f} A",
              f"Detector_distance {distance / 1000:.10f} m",
              f"Beam_xy ({beam_x:.6f}, {beam_y:.6f}) pixels",
              "Filter_transmission 1.0000",
              f"Start_angle {start:.4f} deg.",
              f"Angle_increment {width:.4f} deg.",
              "Detector_2theta 0.0000 deg.",
              f"Polarization {float(_np(experiment.beam.polarization_fraction).reshape(-1)[0]):.3f}",
              "Alpha 0.0000 deg.",
              "Kappa 0.0000 deg.",
              f"Phi {start:.4f} deg.",
              f"Phi_increment {width:.4f} deg.",
              "Chi 0.0000 deg.",
              "Chi_increment 0.0000 deg.",
              "Oscillation_axis X, CW",
              "N_oscillations 1"]
    return convention, "\n".join("# " + line for line in lines)


def pilatus_header(experiment, image: int, exposure_time: float = 1.0) -> str:
    """The ``_array_data.header_contents`` of image `image` (numbered as the
    scan numbers it; any number for a still): ``# Keyword value`` lines.

    The distance is the sample's distance to the detector plane along its
    normal, Beam_xy the (fast, slow) pixel coordinates, from the outer corner
    of the first pixel, where the direct beam meets the plane. Raises
    ValueError for a tilted detector, panels that do not tile one frame or an
    image outside the scan."""
    return _header(experiment, _frame(experiment), int(image), exposure_time)[1]


# ----------------------------------------------------------------------------- pixels

def _assemble(counts, frame) -> np.ndarray:
    """The (slow, fast) int32 frame: the panels at their offsets, -1 between."""
    offsets, (nf, ns) = frame["offsets"], frame["size"]
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    if isinstance(counts, (list, tuple)):
        parts = [np.asarray(c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else c) for c in counts]
    else:
        counts = np.asarray(counts)
        parts = [counts] if counts.ndim == 2 else list(counts) if counts.ndim == 3 else None
        if parts is None:
            raise InputError(f"counts must be (slow, fast) or (panels, slow, fast), got shape {counts.shape}")
    if len(parts) != len(offsets):
        raise InputError(f"counts hold {len(parts)} panel images but the detector has {len(offsets)} panels")
    out = np.full((ns, nf), -1, dtype=np.int32) if len(parts) > 1 else None
    for k, (part, (of, os_)) in enumerate(zip(parts, offsets)):
        if not (np.issubdtype(part.dtype, np.integer) or part.dtype == np.bool_):
            raise InputError(f"counts must be integers (int32), got {part.dtype}")
        if part.size and (part.min() < -2**31 or part.max() > INT32_MAX):
            raise InputError("counts do not fit in 32-bit integers")
        if len(parts) == 1:
            expected = (ns, nf)
        else:
            p = frame["panel_sizes"][k]
            expected = (p[1], p[0])
        if part.shape != expected:
            raise InputError(f"panel {k} counts have shape {part.shape}, the panel is {expected} (slow, fast)")
        if out is None:
            return np.ascontiguousarray(part, dtype=np.int32)
        out[os_:os_ + expected[0], of:of + expected[1]] = part
    return out


@contextlib.contextmanager
def _replacing(path):
    """A file name to write in a fresh hidden folder next to `path` (with the
    same base name, which the CBF data block takes), renamed over `path` on
    success; the folder goes either way, so a failure leaves nothing."""
    target = Path(os.path.realpath(os.fspath(path)))
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        tmp = os.path.join(tmpdir, target.name)
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_minicbf(path, counts, experiment, image: int, exposure_time: float = 1.0) -> None:
    """Write image `image` as a miniCBF: int32 `counts` (slow, fast) or
    (1, slow, fast), or for a detector whose panels tile one frame through
    their ``raw_image_offset`` one (slow, fast) array per panel, assembled with
    -1 in the gaps; byte-offset compressed; the header as
    :func:`pilatus_header` gives it. Written whole or not at all; bad input
    raises ValueError before anything is written."""
    from fabio.cbfimage import CbfImage

    frame = _frame(experiment)
    frame["panel_sizes"] = [p.image_size for p in experiment.detector.panels]
    convention, contents = _header(experiment, frame, int(image), exposure_time)
    data = _assemble(counts, frame)
    header = {"_array_data.header_convention": convention, "_array_data.header_contents": contents}
    with _replacing(path) as tmp:
        CbfImage(data=data, header=header).write(tmp)
