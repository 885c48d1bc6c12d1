"""Simulated images as NeXus/NXmx HDF5 files, the layout DIALS reads with its
full geometry (beam, detector modules and their hierarchy, goniometer, scan).

Frames. dxtbx's NXmx reader takes the beam along McStas +z whatever the file
says, so the models are first turned into the reader frame of
`torchbragg.io.frames` (beam along -z in DIALS's imgCIF frame) and then
written in McStas, (x, y, z) -> (-x, y, -z), the change DIALS undoes when it
reads. `NXmxWriter.truth` is the experiment as a reader of the file gets it
(same frame; a partial render's scan numbered 1..n, as dxtbx numbers the
images of a file): `torchbragg simulate` writes it as PREFIX.expt.

Layout (lengths in mm, angles in degrees, times in s, each with `units`):

    /entry                        NXentry: definition "NXmx"; start_time (the
                                  first image's epoch from the scan, or the
                                  Unix epoch 1970-01-01T00:00:00Z when the scan
                                  has none), end_time and end_time_estimated
                                  (start + images x frame_time)
      source                      NXsource
      instrument                  NXinstrument
        beam                      NXbeam: incident_wavelength (angstrom),
                                  incident_polarization_stokes [1, Q, U, 0]
        detector                  NXdetector: sensor_material, sensor_thickness,
                                  sensor_mu (the experiment's mu, 1/mm; dxtbx
                                  computes its own from the material),
                                  count_time (per image), frame_time, bit depths,
                                  serial_number, saturation/underload values,
                                  pixel_mask, data (link to /entry/data/data)
          transformations         one panel: translation D along the beam;
                                  several: per hierarchy group (a flat detector
                                  has one root group) a translation and a
                                  rotation from its parent, labelled with the
                                  group as equipment_component
          module | module_NNN     NXdetector_module per panel: data_origin,
                                  data_size, fast_/slow_pixel_direction (pixel
                                  size along the panel axis; several panels:
                                  axes and origin (offset) in the group's frame)
      sample                      NXsample, depends_on -> innermost goniometer axis
        transformations           one rotation per goniometer axis, innermost
                                  first in the depends_on chain; the scan axis
                                  holds each image's start angle, with
                                  <axis>_end and <axis>_increment_set
        beam                      hard link to instrument/beam
      data                        NXdata, signal "data": the images, int32,
                                  bitshuffle-LZ4, one image per chunk

One panel: its origin (the outer corner of its first pixel) is the end of
the chain detector translation + module_offset. Several: a module's origin is
its offset taken through its group's chain, so dxtbx rebuilds the hierarchy
(grouping transformations by equipment_component). D is the distance from
the sample to where the beam meets the plane of the first panel (in panel
order) whose plane lies downstream (the NXdetector distance); 0 when there
is none. The sensor material and thickness are the first panel's. Reading
the images needs the bitshuffle filter (`import hdf5plugin`, as DIALS does).

Images: one panel -> (n, slow, fast), one module. Panels that all carry a
"raw_image_offset" [x, y] (from a DIALS file) and tile a frame without
overlapping -> (n, slow, fast) of the whole frame, each module at its offset;
gaps hold -1 and are flagged in pixel_mask. Otherwise -> (n, panels, slow,
fast), module k at data_origin [k, 0, 0] (panels smaller than the largest
padded with -1, flagged too). Pixels a panel's mask skips are flagged (bit 0)
in pixel_mask as well.
"""

from __future__ import annotations

import datetime
import os
import secrets
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..units import unit_vector
from .frames import float64_array

DIALS_TO_MCSTAS = np.diag([-1.0, 1.0, -1.0])
GAP = -1  # pixel value of gaps and padding
MASK_GAP = 1  # pixel_mask bit 0: no sensor / do not use
INT32_MAX = 2**31 - 1
SERIAL = "TB-0000"  # serial_number of the simulated detector




def _axis_angle(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit axis and angle (degrees) of a rotation matrix."""
    m = np.asarray(m, dtype=np.float64)
    # quaternion, largest component first for stability
    tr = np.trace(m)
    cand = [tr, m[0, 0], m[1, 1], m[2, 2]]
    i = int(np.argmax(cand))
    if i == 0:
        w = np.sqrt(max(1.0 + tr, 0.0)) / 2.0
        x, y, z = (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)
    elif i == 1:
        x = np.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 0.0)) / 2.0
        w, y, z = (m[2, 1] - m[1, 2]) / (4 * x), (m[0, 1] + m[1, 0]) / (4 * x), (m[0, 2] + m[2, 0]) / (4 * x)
    elif i == 2:
        y = np.sqrt(max(1.0 - m[0, 0] + m[1, 1] - m[2, 2], 0.0)) / 2.0
        w, x, z = (m[0, 2] - m[2, 0]) / (4 * y), (m[0, 1] + m[1, 0]) / (4 * y), (m[1, 2] + m[2, 1]) / (4 * y)
    else:
        z = np.sqrt(max(1.0 - m[0, 0] - m[1, 1] + m[2, 2], 0.0)) / 2.0
        w, x, y = (m[1, 0] - m[0, 1]) / (4 * z), (m[0, 2] + m[2, 0]) / (4 * z), (m[1, 2] + m[2, 1]) / (4 * z)
    vec = np.array([x, y, z])
    s = np.linalg.norm(vec)
    if s < 1e-15:
        return np.array([1.0, 0.0, 0.0]), 0.0
    angle = 2.0 * np.degrees(np.arctan2(s, w))
    return vec / s, float(angle)


def _clean_name(name: str, taken: set) -> str:
    base = "".join(ch if (ch.isalnum() or ch in "_-") else "_" for ch in str(name)) or "axis"
    out, k = base, 1
    while out in taken:
        k += 1
        out = f"{base}_{k}"
    taken.add(out)
    return out


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(float(seconds), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _matrix(r, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = r, t
    return m


class _Layout:
    """Where each panel's pixels go in the stored frame."""

    def __init__(self, detector):
        sizes = [(p.image_size[1], p.image_size[0]) for p in detector.panels]  # (slow, fast)
        self.sizes = sizes
        n = len(sizes)
        offsets = [p.extras.get("raw_image_offset") for p in detector.panels]
        self.tiled = False
        if n == 1:
            self.frame = sizes[0]
            self.origins = [(0, 0)]
            return
        if all(o is not None and len(o) == 2 for o in offsets):
            origins = [(int(o[1]), int(o[0])) for o in offsets]  # (slow, fast)
            if min(min(o) for o in origins) >= 0:
                shape = (max(o[0] + s[0] for o, s in zip(origins, sizes)),
                         max(o[1] + s[1] for o, s in zip(origins, sizes)))
                cover = np.zeros(shape, dtype=np.int32)
                for (y, x), (s, f) in zip(origins, sizes):
                    cover[y:y + s, x:x + f] += 1
                if cover.max() == 1:
                    self.tiled, self.frame, self.origins = True, shape, origins
                    return
        self.frame = (n, max(s for s, _ in sizes), max(f for _, f in sizes))
        self.origins = [(k, 0, 0) for k in range(n)]

    def data_origin(self, k):
        return list(self.origins[k])

    def data_size(self, k):
        s, f = self.sizes[k]
        return [s, f] if len(self.frame) == 2 else [1, s, f]

    def region(self, k):
        s, f = self.sizes[k]
        if len(self.frame) == 2:
            y, x = self.origins[k]
            return (slice(y, y + s), slice(x, x + f))
        return (k, slice(0, s), slice(0, f))

    def needs_fill(self) -> bool:
        covered = sum(s * f for s, f in self.sizes)
        return covered != int(np.prod(self.frame))


class NXmxWriter:
    """Write `n_images` images of `experiment` to the NXmx file `path`.

    Use as a context manager; `write(index, counts)` stores image `index`
    (0-based within the file; scan image start_image + index, which DIALS
    numbers index + 1), counts int32 (panels, slow, fast) (or (slow, fast)
    for one panel, or a sequence of per-panel (slow, fast) arrays when panel
    sizes differ). The file is built under a temporary name in the same
    folder and renamed to `path` by `close()`, which requires every image
    written; on an exception inside the `with` block (or `abort()`) nothing
    is left behind. `truth` is the experiment as DIALS reads it from the file.
    """

    def __init__(self, path, experiment, n_images: int, start_image: int = 1):
        import h5py
        import hdf5plugin

        from .frames import as_written, scan_timing

        self.n_images = int(n_images)
        if self.n_images < 1:
            raise InputError(f"an NXmx file needs at least one image, not {n_images}")
        self.start_image = int(start_image)
        scan = experiment.scan
        if scan is not None:
            first, last = scan.image_range
            lo, hi = self.start_image, self.start_image + self.n_images - 1
            if lo < first or hi > last:
                raise InputError(f"images {lo}..{hi} are outside the scan's images {first}..{last}")
            self.truth = as_written(experiment, (lo, hi), renumber=True)
            exposure, epochs, period = scan_timing(self.truth.scan)
            start, width = (float(x) for x in float64_array(self.truth.scan.oscillation).reshape(2))
            self._angles = (start + np.arange(self.n_images) * width, width)
            self._timing = (exposure, epochs, period)
        else:
            self.truth = as_written(experiment)
            self._angles = self._timing = None
        self.experiment = self.truth
        text = os.fspath(path)
        if text == "" or text.endswith(("/", os.sep)):
            raise InputError(f"cannot write {text!r}: not a file name")
        self.path = Path(os.path.realpath(text))
        self.layout = _Layout(self.truth.detector)
        self._written = np.zeros(self.n_images, dtype=bool)
        self._tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        try:
            self._file = h5py.File(self._tmp, "w-")
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc}") from None
        try:
            self._build(hdf5plugin)
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ geometry

    def _build(self, hdf5plugin):
        e = self.experiment
        f = self._file
        self.q = DIALS_TO_MCSTAS  # the models are in the reader frame already
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry"
        f.attrs["creator"] = "torchbragg"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        entry.create_dataset("definition", data="NXmx")
        if self._timing is not None:
            exposure, epochs, period = self._timing
            began, ended = float(epochs[0]), float(epochs[0]) + self.n_images * period
        else:
            began = ended = 0.0
        entry.create_dataset("start_time", data=_utc(began))
        entry.create_dataset("end_time", data=_utc(ended))
        entry.create_dataset("end_time_estimated", data=_utc(ended))
        self._entry = entry

        source = entry.create_group("source")
        source.attrs["NX_class"] = "NXsource"
        source.create_dataset("name", data="torchbragg simulation")

        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        name = inst.create_dataset("name", data="torchbragg simulated instrument")
        name.attrs["short_name"] = "torchbragg"

        beam = inst.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        lam = beam.create_dataset("incident_wavelength", data=float(float64_array(e.beam.wavelength)))
        lam.attrs["units"] = "angstrom"
        beam.create_dataset("incident_polarization_stokes", data=self._stokes(self.q))

        self._detector(inst, hdf5plugin)
        self._sample(entry, beam)

    def _stokes(self, q) -> np.ndarray:
        """[I, Q, U, V] with I = 1, in McStas x/y: Q = P cos 2psi, U = P sin 2psi,
        psi the E-vector's angle from +x towards +y, P = 2 f - 1."""
        beam = self.experiment.beam
        p = 2.0 * float(float64_array(beam.polarization_fraction)) - 1.0
        ev = q @ unit_vector(float64_array(beam.e_vector()))
        psi = np.arctan2(ev[1], ev[0])
        return np.array([1.0, p * np.cos(2 * psi), p * np.sin(2 * psi), 0.0])

    def _detector(self, inst, hdf5plugin):
        e, q, lay = self.experiment, self.q, self.layout
        det = e.detector
        origin, fast, slow, normal = (float64_array(x) @ q.T for x in det.panel_frames(e.beam.incident()))
        self.mcstas_frames = dict(origin=origin, fast=fast, slow=slow, normal=normal)
        # distance: where the beam (+z from the sample) meets the first panel plane it crosses
        distance = 0.0
        for k in range(len(det.panels)):
            dn = normal[k][2]
            if abs(dn) > 1e-12:
                t = float(origin[k] @ normal[k]) / dn
                if t > 0:
                    distance = t
                    break
        self.distance = distance

        d = inst.create_group("detector")
        d.attrs["NX_class"] = "NXdetector"
        p0 = det.panels[0]
        d.create_dataset("description", data="torchbragg simulated detector")
        d.create_dataset("type", data="pixel")
        d.create_dataset("serial_number", data=SERIAL)
        material = p0.material if p0.material in ("Si", "CdTe", "GaAs") else "Si"
        d.create_dataset("sensor_material", data=material)
        th = d.create_dataset("sensor_thickness", data=float(float64_array(p0.thickness)))
        th.attrs["units"] = "mm"
        mu = d.create_dataset("sensor_mu", data=float(float64_array(p0.mu)))
        mu.attrs["units"] = "1/mm"
        dist = d.create_dataset("distance", data=distance)
        dist.attrs["units"] = "mm"
        top = max(p.trusted_range[1] for p in det.panels)
        d.create_dataset("saturation_value", data=np.int32(min(int(np.floor(top)), INT32_MAX)))
        d.create_dataset("underload_value", data=np.int32(0))
        d.create_dataset("bit_depth_image", data=np.int32(32))
        d.create_dataset("bit_depth_readout", data=np.int32(32))
        if self._timing is not None:
            exposure, _, period = self._timing
            ct = d.create_dataset("count_time", data=np.asarray(exposure, dtype=np.float64))
            ct.attrs["units"] = "s"
            ft = d.create_dataset("frame_time", data=float(period))
            ft.attrs["units"] = "s"
        if len(det.panels) == 1 and distance > 0:
            hit = np.array([0.0, 0.0, distance]) - origin[0]
            px = float64_array(p0.pixel_size).reshape(2)
            for key, axis, size in (("beam_center_x", fast[0], px[0]), ("beam_center_y", slow[0], px[1])):
                ds = d.create_dataset(key, data=float(hit @ axis) / size)
                ds.attrs["units"] = "pixel"

        tr = d.create_group("transformations")
        tr.attrs["NX_class"] = "NXtransformations"
        if len(det.panels) == 1:
            t = tr.create_dataset("translation", data=distance)
            t.attrs.update(transformation_type="translation", units="mm", vector=[0.0, 0.0, 1.0],
                           offset=[0.0, 0.0, 0.0], offset_units="mm", depends_on=".")
            d.create_dataset("depends_on", data=t.name)
            parents = [None]
        else:
            parents = self._hierarchy(tr)
            d.create_dataset("depends_on", data=self._root_path)

        n = len(det.panels)
        width = max(3, len(str(n - 1)))
        mask = np.full(lay.frame, MASK_GAP, dtype=np.uint32)
        for k, panel in enumerate(det.panels):
            m = d.create_group("module" if n == 1 else f"module_{k:0{width}d}")
            m.attrs["NX_class"] = "NXdetector_module"
            m.create_dataset("data_origin", data=np.array(lay.data_origin(k), dtype=np.int64))
            m.create_dataset("data_size", data=np.array(lay.data_size(k), dtype=np.int64))
            px = float64_array(panel.pixel_size).reshape(2)
            if n == 1:
                rel = origin[k] - np.array([0.0, 0.0, distance])
                length = float(np.linalg.norm(rel))
                vec = rel / length if length > 0 else np.array([1.0, 0.0, 0.0])
                off = m.create_dataset("module_offset", data=length)
                off.attrs.update(transformation_type="translation", units="mm", vector=vec,
                                 offset=[0.0, 0.0, 0.0], offset_units="mm", depends_on=t.name)
                base, local = off.name, (fast[k], slow[k], np.zeros(3))
            else:  # axes and origin in the frame of the panel's group
                path, g = parents[k]
                r, shift = g[:3, :3], g[:3, 3]
                base, local = path, (r.T @ fast[k], r.T @ slow[k], r.T @ (origin[k] - shift))
            # both directions start from the panel's origin (dxtbx takes it from the fast one's offset)
            for key, axis, size, offset in (("fast_pixel_direction", local[0], px[0], local[2]),
                                            ("slow_pixel_direction", local[1], px[1], local[2])):
                ds = m.create_dataset(key, data=float(size))
                ds.attrs.update(transformation_type="translation", units="mm", vector=axis / np.linalg.norm(axis),
                                offset=offset, offset_units="mm", depends_on=base)
            region = lay.region(k)
            good = np.zeros(lay.sizes[k], dtype=np.uint32)
            if panel.mask is not None:
                good[~panel.mask.cpu().numpy().astype(bool)] = MASK_GAP
            mask[region] = good
        pm = d.create_dataset("pixel_mask", data=mask, compression="gzip", shuffle=True)
        pm.attrs["description"] = "bit 0: gap or pixel not to use"
        d.create_dataset("pixel_mask_applied", data=False)

        data = self._entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        self._data = data.create_dataset(
            "data", shape=(self.n_images, *lay.frame), dtype=np.int32, chunks=(1, *lay.frame),
            fillvalue=np.int32(GAP), **hdf5plugin.Bitshuffle(cname="lz4"))
        self._data.attrs["units"] = "counts"
        d["data"] = self._data  # hard link, as detectors write it

    def _hierarchy(self, tr) -> list:
        """Per hierarchy group (a flat detector: one root group), a translation
        and a rotation from its parent group, labelled with the group as
        equipment_component. Returns, per panel, (path of its group's innermost
        transformation, the group's 4x4 McStas matrix)."""
        import torch

        det, q = self.experiment.detector, self.q
        incident = self.experiment.beam.incident()
        panels: list = [None] * len(det.panels)
        taken: set = set()

        def lab_frame(frame, parent):
            """(origin, columns fast slow normal) in the reader frame."""
            o, f, s, n = (float64_array(x) for x in frame)
            if parent is not None:
                po, pm = parent
                o, f, s, n = po + pm @ o, pm @ f, pm @ s, pm @ n
            return o, np.stack([f, s, n], -1)

        def write(name, lab, parent_matrix, parent_path):
            # in McStas (x -> F x) a group's axes (-x, y, -z) are its fast, slow and normal
            rot = q @ lab[1] @ q
            g = _matrix(rot, q @ lab[0])
            local = np.linalg.inv(parent_matrix) @ g
            key = _clean_name(name, taken)
            shift = local[:3, 3]
            length = float(np.linalg.norm(shift))
            t = tr.create_dataset(key + "_translation", data=length)
            t.attrs.update(transformation_type="translation", units="mm",
                           vector=shift / length if length > 0 else np.array([0.0, 0.0, 1.0]),
                           offset=[0.0, 0.0, 0.0], offset_units="mm", depends_on=parent_path,
                           equipment_component=key)
            axis, angle = _axis_angle(local[:3, :3])
            r = tr.create_dataset(key + "_rotation", data=angle)
            r.attrs.update(transformation_type="rotation", units="deg", vector=axis, offset=[0.0, 0.0, 0.0],
                           offset_units="mm", depends_on=t.name, equipment_component=key)
            return r.name, g

        def walk(group, lab_parent, matrix_parent, path_parent, depth):
            with torch.no_grad():
                lab = lab_frame(group.frame(incident), lab_parent)
            path, g = write(group.name or f"group{depth}", lab, matrix_parent, path_parent)
            for c in group.children_order:
                if isinstance(c, int):
                    panels[c] = (path, g)
                else:
                    walk(group.groups[c[1]], lab, g, path, depth + 1)
            return path

        if det.hierarchy is None:
            path, g = write("detector", (np.zeros(3), np.eye(3)), np.eye(4), ".")
            panels = [(path, g)] * len(det.panels)
            self._root_path = path
        else:
            self._root_path = walk(det.hierarchy, None, np.eye(4), ".", 0)
        return panels

    def _sample(self, entry, beam):
        e, q = self.experiment, self.q
        s = entry.create_group("sample")
        s.attrs["NX_class"] = "NXsample"
        s.create_dataset("name", data="simulated crystal")
        s["beam"] = beam  # hard link
        gonio = e.goniometer
        if gonio is None:
            s.create_dataset("depends_on", data=".")
            return
        tr = s.create_group("transformations")
        tr.attrs["NX_class"] = "NXtransformations"
        axes = float64_array(gonio.axes).reshape(-1, 3)
        angles = float64_array(gonio.angles).reshape(-1)
        names = list(gonio.names)
        taken: set = set()
        # innermost first: fixed rotation, axes[0] .. axes[K-1], setting rotation
        chain = []
        fixed, setting = float64_array(gonio.fixed_rotation).reshape(3, 3), float64_array(gonio.setting_rotation).reshape(3, 3)
        a, ang = _axis_angle(fixed)
        if abs(ang) > 1e-12:
            chain.append(("fixed_rotation", a, np.full(self.n_images, ang), None))
        for k in range(len(axes)):
            if k == gonio.scan_axis and self._angles is not None:
                values, width = self._angles
                chain.append((names[k] if k < len(names) else f"axis{k}", axes[k], values, width))
            else:
                chain.append((names[k] if k < len(names) else f"axis{k}", axes[k],
                              np.full(self.n_images, angles[k]), None))
        a, ang = _axis_angle(setting)
        if abs(ang) > 1e-12:
            chain.append(("setting_rotation", a, np.full(self.n_images, ang), None))
        paths = []
        for name, axis, values, width in chain:
            paths.append(tr.name + "/" + _clean_name(name, taken))
        for i, (name, axis, values, width) in enumerate(chain):
            key = paths[i].rsplit("/", 1)[1]
            ds = tr.create_dataset(key, data=np.asarray(values, dtype=np.float64))
            vec = q @ unit_vector(float64_array(axis))
            ds.attrs.update(transformation_type="rotation", units="deg", vector=vec, offset=[0.0, 0.0, 0.0],
                            offset_units="mm", depends_on=paths[i + 1] if i + 1 < len(paths) else ".")
            if width is not None:
                taken.update({key + "_end", key + "_increment_set"})
                end = tr.create_dataset(key + "_end", data=np.asarray(values) + width)
                end.attrs["units"] = "deg"
                inc = tr.create_dataset(key + "_increment_set", data=float(width))
                inc.attrs["units"] = "deg"
        s.create_dataset("depends_on", data=paths[0])

    # ------------------------------------------------------------------ images

    def write(self, index: int, counts) -> None:
        """Store image `index` (0-based within this file)."""
        if self._file is None:
            raise InputError(f"{self.path}: the file is already closed")
        index = int(index)
        if not 0 <= index < self.n_images:
            raise InputError(f"image index {index} is outside 0..{self.n_images - 1}")
        lay = self.layout
        panels = self._panels(counts)
        if len(lay.frame) == 2 and len(panels) == 1:
            frame = panels[0]
        else:
            frame = np.full(lay.frame, GAP, dtype=np.int32) if lay.needs_fill() else np.empty(lay.frame, np.int32)
            for k, p in enumerate(panels):
                frame[lay.region(k)] = p
        self._data[index] = frame
        self._written[index] = True

    def _panels(self, counts) -> list[np.ndarray]:
        sizes = self.layout.sizes
        if hasattr(counts, "detach"):
            counts = counts.detach().cpu().numpy()
        if isinstance(counts, np.ndarray):
            arr = counts
            if arr.ndim == 2 and len(sizes) == 1:
                arr = arr[None]
            if arr.ndim != 3 or arr.shape[0] != len(sizes):
                raise InputError(f"counts of shape {arr.shape} do not match the detector's {len(sizes)} "
                                 f"panel(s) of (slow, fast) {sizes}")
            items = list(arr)
        else:
            items = [np.asarray(c) for c in counts]
            if len(items) != len(sizes):
                raise InputError(f"{len(items)} panel images given for {len(sizes)} panels")
        out = []
        for k, (c, size) in enumerate(zip(items, sizes)):
            if c.shape != size:
                raise InputError(f"panel {k}: counts have shape {c.shape}, the panel is (slow, fast) {size}")
            if not np.issubdtype(c.dtype, np.integer):
                raise InputError(f"panel {k}: counts must be integers (int32), not {c.dtype}")
            if c.dtype != np.int32:
                if c.size and (c.min() < -2**31 or c.max() > INT32_MAX):
                    raise InputError(f"panel {k}: counts do not fit in int32")
                c = c.astype(np.int32)
            out.append(np.ascontiguousarray(c))
        return out

    # ------------------------------------------------------------------ finishing

    def close(self) -> None:
        """Finish the file and move it to `path`. Every image must have been written."""
        if self._file is None:
            return
        try:
            missing = np.flatnonzero(~self._written)
            if missing.size:
                raise InputError(f"{self.path}: {missing.size} of {self.n_images} images were not written "
                                 f"(first missing index {int(missing[0])})")
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the file: nothing is left at `path` or under the temporary name."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> "NXmxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self.abort()


def write_nxmx(path, experiment, images: Iterable | Sequence, start_image: int = 1) -> None:
    """Write every count array of `images` to the NXmx file `path`."""
    if not isinstance(images, Sequence):
        images = list(images)
    with NXmxWriter(path, experiment, len(images), start_image=start_image) as w:
        for i, counts in enumerate(images):
            w.write(i, counts)
