"""Simulated images as Pilatus-style miniCBF files that DIALS (dxtbx) reads,
with a header whose geometry is the experiment's, or a refusal.

A miniCBF describes its geometry in the free-text header of
``_array_data.header_contents``, one ``# Keyword value`` line per item, the
way a Pilatus writes it. dxtbx builds its models from a few of those lines:

* ``Pixel_size`` (m x m), ``Wavelength`` (A), ``Detector_distance`` (m) and
  ``Beam_xy`` (pixels): one flat panel perpendicular to the beam, fast axis
  +x, slow axis -y, the beam along -z, origin ``(-Beam_x * pixel_x,
  Beam_y * pixel_y, -distance)``. Beam_xy counts pixels from the outer
  corner of the first pixel (no half-pixel shift);
* ``Count_cutoff`` (counts): the top of the trusted range; pixels below 0
  (-1 gaps, -2 bad pixels) are untrusted;
* ``Start_angle``, ``Angle_increment`` (deg): the scan, about a single
  rotation axis along +x (dxtbx reads no other axis: ``Oscillation_axis
  X, CW`` is what it assumes); ``Exposure_period`` (s) is the exposure time
  dxtbx gives each image; a line with only a date-time is the image's epoch;
* ``# Silicon sensor, thickness ... m`` (or ``CdTe``): the sensor.

So the header is written in the reader frame of `torchbragg.io.frames` (the
beam along -z, the rotation axis along +x, which the truth experiment beside
the files shares), and refused when what dxtbx would rebuild from it is off:
every corner of every panel is traced from the sample to dxtbx's plane and
must land within 0.1 pixel of where its pixel coordinates put it (a tilted
or turned detector, an off-normal beam, panels that do not tile one plane);
and a sweep's crystal orientation, rotated about +x instead of the
goniometer's axes, must stay within what moves a spot at those corners by
0.1 pixel over the whole scan (the orientation error times the scattering
vector's length there, the orientation taken as right at the scan's start).
NXmx describes all of these.

Pixels: gaps between panels and the module gaps of a Pilatus-sized frame are
-1; other pixels the experiment's mask skips are bad pixels, -2, counted in
``N_excluded_pixels``. Angles carry 10 decimals and each image's start comes
from the scan (not by adding increments), so a long sweep does not drift.
``Exposure_time`` is the scan's exposure time of the image,
``Exposure_period`` its frame period (from the epochs; else the exposure).

Images whose size is a Pilatus module tiling (487 x 195 modules with 7 and 17
pixel gaps) carry ``header_convention PILATUS_1.2`` and a ``# Detector:
PILATUS ...`` line; dxtbx masks the module gaps of such images and refuses
other sizes under that convention, so other sizes carry ``GENERIC_MINI``,
the convention dxtbx reads as a simulated pixel-array detector.
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
from .frames import float64_array

# Pilatus modules and the gaps between them, in pixels (fast, slow)
MODULE = (487, 195)
GAP = (7, 17)
PILATUS_MODELS = {(1, 1): "100K", (1, 3): "300K", (3, 1): "300K-W", (2, 5): "1M", (3, 8): "2M", (5, 12): "6M"}
SERIAL = "60-0000"
INT32_MAX = 2**31 - 1
MAX_ERROR_PX = 0.1  # largest misplacement (pixels) of a panel corner the header may imply
GAP_VALUE, BAD_VALUE = -1, -2


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
    """The one frame the image holds, from an experiment in the reader frame:
    per panel its (origin, fast, slow) in mm and (fast, slow) offset in the
    frame, the pixel size, frame size (fast, slow), sensor and trusted range."""
    detector = experiment.detector
    panels = list(detector.panels)
    with torch.no_grad():
        origin, fast, slow, _ = (float64_array(t) for t in detector.panel_frames(experiment.beam.incident()))
    pixel = [float64_array(p.pixel_size).reshape(2) for p in panels]
    if len(panels) == 1:
        offsets = [(0, 0)]
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
    covered = np.zeros((size[1], size[0]), dtype=bool)
    for i, (o, p) in enumerate(zip(offsets, panels)):
        if not np.allclose(pixel[i], pixel[0], rtol=0, atol=1e-12):
            raise InputError(f"a miniCBF holds one pixel size: panel {i} ({p.name!r}) has {pixel[i].tolist()} mm, "
                             f"panel 0 {pixel[0].tolist()} mm; write the panels as NeXus instead")
        block = covered[max(o[1], 0):o[1] + p.image_size[1], max(o[0], 0):o[0] + p.image_size[0]]
        if o[0] < 0 or o[1] < 0 or block.any():
            raise InputError(f"a miniCBF holds one image frame: panel {i} ({p.name!r}) at raw_image_offset "
                             f"{list(o)} overlaps another panel or lies outside the frame; write the panels "
                             "as NeXus instead")
        block[...] = True
    first = panels[0]
    return dict(origin=origin, fast=fast, slow=slow, pixel=pixel[0], size=(int(size[0]), int(size[1])),
                offsets=offsets, sizes=[p.image_size for p in panels], names=[p.name for p in panels],
                thickness=float(float64_array(first.thickness)), material=first.material, trusted=first.trusted_range)


def _geometry(frame) -> tuple[float, float, float]:
    """Distance (mm) along the beam (-z) to where it meets the first panel's
    plane, and the beam centre there in the frame's pixels (fast, slow)."""
    o, f, s = frame["origin"][0], frame["fast"][0], frame["slow"][0]
    n = np.cross(f, s)
    if abs(n[2]) < 1e-12:
        raise InputError("the beam runs along the detector plane; a miniCBF cannot describe it: write NeXus instead")
    distance = float(-(o @ n) / n[2])  # the beam meets the plane at (0, 0, -distance)
    if not distance > 0:
        raise InputError(f"the beam meets the detector plane {distance:g} mm from the sample; a miniCBF needs it "
                         "downstream: write NeXus instead")
    hit = np.array([0.0, 0.0, -distance]) - o
    # pixel coordinates on the panel plane: solve hit = u f + v s (axes need not be orthogonal)
    uv = np.linalg.lstsq(np.stack([f, s], -1), hit, rcond=None)[0]
    px = frame["pixel"]
    off = frame["offsets"][0]
    return distance, off[0] + float(uv[0]) / px[0], off[1] + float(uv[1]) / px[1]


def _corners(frame):
    """Every panel corner: (panel, lab position in mm, pixel coordinates in the frame)."""
    px = frame["pixel"]
    for k, ((of, os_), (nf, ns)) in enumerate(zip(frame["offsets"], frame["sizes"])):
        for u in (0, nf):
            for v in (0, ns):
                where = frame["origin"][k] + u * px[0] * frame["fast"][k] + v * px[1] * frame["slow"][k]
                yield k, where, np.array([of + u, os_ + v], dtype=np.float64)


def placement_error(frame, distance: float, beam_x: float, beam_y: float, pixel) -> tuple[float, int]:
    """The largest distance (pixels) between where a panel corner is and
    where dxtbx's model rebuilt from the header puts its pixel coordinates,
    both traced from the sample onto dxtbx's plane; and the panel it occurs on."""
    worst, panel = 0.0, 0
    for k, where, uv in _corners(frame):
        if not where[2] < 0:
            return math.inf, k
        on_plane = where * (distance / -where[2])
        read = np.array([on_plane[0] / pixel[0] + beam_x, -on_plane[1] / pixel[1] + beam_y])
        err = float(np.hypot(*(read - uv)))
        if err > worst:
            worst, panel = err, k
    return worst, panel


def _rotation(axis, deg) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    t = math.radians(deg)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def rotation_error(experiment, frame) -> float:
    """How far (pixels) a spot at the panel corners moves over the scan when
    the crystal turns about +x (all a mini-header says) instead of about the
    goniometer's axes, with the orientation right at the scan's start."""
    gonio, scan = experiment.goniometer, experiment.scan
    if gonio is None or scan is None:
        return 0.0
    start, width = (float(x) for x in float64_array(scan.oscillation).reshape(2))
    end = start + width * scan.num_images
    phis = np.linspace(start, end, 9)
    with torch.no_grad():
        true = gonio.rotation(torch.as_tensor(phis, dtype=torch.float64)).cpu().numpy()
    x = np.array([1.0, 0.0, 0.0])
    settled = _rotation(x, start).T @ true[0]
    worst = 0.0
    for phi, m in zip(phis, true):
        e = m @ (_rotation(x, phi) @ settled).T
        worst = max(worst, math.acos(max(-1.0, min(1.0, (np.trace(e) - 1) / 2))))
    beam = np.array([0.0, 0.0, -1.0])
    reach = max(float(np.linalg.norm(w - np.linalg.norm(w) * beam)) for _, w, _ in _corners(frame))
    return worst * reach / float(min(frame["pixel"]))


def _timing(experiment, image: int) -> tuple[float, float, float]:
    """(exposure time, frame period, epoch) of image `image` (seconds)."""
    scan = experiment.scan
    if scan is None:
        return 0.0, 0.0, 0.0
    from .frames import scan_timing
    exposure, epochs, period = scan_timing(scan)
    k = image - scan.image_range[0]
    return float(exposure[k]), float(period), float(epochs[k])


def _timestamp(seconds: float) -> str:
    """YYYY-MM-DDTHH:MM:SS.mmm (UTC) of seconds since 1970-01-01."""
    whole = math.floor(seconds)
    millis = min(int(round((seconds - whole) * 1000)), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}"


def _microns(mm: float) -> str:
    return f"{mm * 1000:.7g}"


# ----------------------------------------------------------------------------- header

def _header(experiment, frame, image: int, bad_pixels: int = 0) -> tuple[str, str]:
    """(header convention, header contents) of an experiment in the reader frame."""
    scan = experiment.scan
    start = width = 0.0
    if scan is not None:
        first, last = scan.image_range
        if not first <= image <= last:
            raise InputError(f"image {image} is outside the scan's images {first}..{last}")
        s0, width = (float(x) for x in float64_array(scan.oscillation).reshape(2))
        start = s0 + (image - first) * width  # from the scan, not accumulated
    distance, beam_x, beam_y = _geometry(frame)
    px_text = [_microns(p) for p in frame["pixel"]]
    pixel = [float(t) / 1000 for t in px_text]  # as the header states it
    lines_geometry = (f"Detector_distance {distance / 1000:.10f} m", f"Beam_xy ({beam_x:.6f}, {beam_y:.6f}) pixels")
    # the error of what dxtbx rebuilds from the numbers as written
    read = [float(lines_geometry[0].split()[1]) * 1000,
            *(float(t) for t in lines_geometry[1].split("(")[1].split(")")[0].split(","))]
    err, k = placement_error(frame, read[0], read[1], read[2], pixel)
    if err > MAX_ERROR_PX:
        n = np.cross(frame["fast"][k], frame["slow"][k])
        tilt = math.degrees(math.acos(min(1.0, abs(n[2]) / np.linalg.norm(n))))
        turn = math.degrees(math.atan2(frame["fast"][k][1], frame["fast"][k][0]))
        raise InputError(f"a miniCBF header would misplace pixels of panel {k} ({frame['names'][k]!r}) by "
                         f"{err:.3g} px (more than {MAX_ERROR_PX} px): it describes one plane perpendicular to "
                         f"the beam with the fast axis along the rotation axis, and this panel is tilted "
                         f"{tilt:.3g} deg from it, its fast axis turned {turn:.3g} deg; write NeXus instead")
    axis_err = rotation_error(experiment, frame)
    if axis_err > MAX_ERROR_PX:
        with torch.no_grad():
            axis = float64_array(experiment.goniometer.rotation_axis)
        raise InputError(f"a miniCBF header names one rotation axis, +x ('X, CW'), and turning the crystal about it "
                         f"instead of this goniometer's axes (rotation axis {np.round(axis, 6).tolist()} in the "
                         f"frame with the beam along -z) moves spots by up to {axis_err:.3g} px over the scan; "
                         "write NeXus instead")
    exposure, period, epoch = _timing(experiment, image)
    wavelength = float(float64_array(experiment.beam.wavelength).reshape(-1)[0])
    cutoff = frame["trusted"][1]
    cutoff = INT32_MAX if not math.isfinite(cutoff) else int(min(max(math.floor(cutoff), 0), INT32_MAX))
    model = pilatus_model(frame["size"])
    convention = "PILATUS_1.2" if model else "GENERIC_MINI"
    lines = [f"Detector: {model or 'SIMULATED'}, S/N {SERIAL}",
             _timestamp(epoch),
             f"Pixel_size {px_text[0]}e-6 m x {px_text[1]}e-6 m"]
    if frame["thickness"] > 0:
        sensor = "CdTe" if frame["material"] == "CdTe" else "Silicon"
        lines.append(f"{sensor} sensor, thickness {frame['thickness'] / 1000:.9f} m")
    lines += [f"Exposure_time {exposure:.7f} s",
              f"Exposure_period {period:.7f} s",
              "Tau = 0 s",
              f"Count_cutoff {cutoff} counts",
              f"Threshold_setting: {HC_EV_ANGSTROM_CODATA / wavelength / 2:.0f} eV",
              f"N_excluded_pixels = {bad_pixels}",
              "Excluded_pixels: (nil)",
              "Flat_field: (nil)",
              "Trim_file: (nil)",
              f"Wavelength {wavelength:.8f} A",
              *lines_geometry,
              "Filter_transmission 1.0000",
              f"Start_angle {start:.10f} deg.",
              f"Angle_increment {width:.10f} deg.",
              "Detector_2theta 0.0000 deg.",
              f"Polarization {float(float64_array(experiment.beam.polarization_fraction).reshape(-1)[0]):.6f}",
              "Alpha 0.0000 deg.",
              "Kappa 0.0000 deg.",
              f"Phi {start:.10f} deg.",
              f"Phi_increment {width:.10f} deg.",
              "Chi 0.0000 deg.",
              "Chi_increment 0.0000 deg.",
              "Oscillation_axis X, CW",
              "N_oscillations 1"]
    return convention, "\n".join("# " + line for line in lines)


def _reader_view(experiment):
    from .frames import as_written
    return as_written(experiment)


def pilatus_header(experiment, image: int) -> str:
    """The ``_array_data.header_contents`` of image `image` (numbered as the
    scan numbers it; any number for a still): ``# Keyword value`` lines, in
    the reader frame. Raises ValueError (InputError) for geometry the header
    cannot hold (see the module notes) or an image outside the scan."""
    e = _reader_view(experiment)
    frame = _frame(e)
    return _header(e, frame, int(image), int(_excluded(e, frame)[1].sum()))[1]


# ----------------------------------------------------------------------------- pixels

def _excluded(experiment, frame) -> tuple[np.ndarray, np.ndarray]:
    """(gap, bad) (slow, fast) masks of the frame: no panel there or a Pilatus
    module gap; a pixel the experiment's mask skips elsewhere."""
    nf, ns = frame["size"]
    gap = np.ones((ns, nf), dtype=bool)
    bad = np.zeros((ns, nf), dtype=bool)
    for panel, (of, os_), (pf, ps) in zip(experiment.detector.panels, frame["offsets"], frame["sizes"]):
        gap[os_:os_ + ps, of:of + pf] = False
        if panel.mask is not None:
            bad[os_:os_ + ps, of:of + pf] = ~panel.mask.cpu().numpy().astype(bool)
    if pilatus_model(frame["size"]):
        gap[:, np.arange(nf) % (MODULE[0] + GAP[0]) >= MODULE[0]] = True
        gap[np.arange(ns) % (MODULE[1] + GAP[1]) >= MODULE[1], :] = True
    return gap, bad & ~gap


def _assemble(counts, frame, gap, bad) -> np.ndarray:
    """The (slow, fast) int32 frame: the panels at their offsets, gaps -1, bad pixels -2."""
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
    out = np.full((ns, nf), GAP_VALUE, dtype=np.int32)
    for k, (part, (of, os_), (pf, ps)) in enumerate(zip(parts, offsets, frame["sizes"])):
        if not (np.issubdtype(part.dtype, np.integer) or part.dtype == np.bool_):
            raise InputError(f"counts must be integers (int32), got {part.dtype}")
        if part.size and (part.min() < -2**31 or part.max() > INT32_MAX):
            raise InputError("counts do not fit in 32-bit integers")
        if part.shape != (ps, pf):
            raise InputError(f"panel {k} counts have shape {part.shape}, the panel is {(ps, pf)} (slow, fast)")
        out[os_:os_ + ps, of:of + pf] = part
    out[gap] = GAP_VALUE
    out[bad] = BAD_VALUE
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


def write_minicbf(path, counts, experiment, image: int) -> None:
    """Write image `image` as a miniCBF: int32 `counts` (slow, fast) or
    (1, slow, fast), or for a detector whose panels tile one frame through
    their ``raw_image_offset`` one (slow, fast) array per panel, assembled
    with -1 in the gaps and -2 on masked pixels; byte-offset compressed; the
    header as :func:`pilatus_header` gives it. Written whole or not at all;
    bad input raises ValueError before anything is written."""
    from fabio.cbfimage import CbfImage

    e = _reader_view(experiment)
    frame = _frame(e)
    gap, bad = _excluded(e, frame)
    convention, contents = _header(e, frame, int(image), int(bad.sum()))
    data = _assemble(counts, frame, gap, bad)
    header = {"_array_data.header_convention": convention, "_array_data.header_contents": contents}
    with _replacing(path) as tmp:
        CbfImage(data=data, header=header).write(tmp)
