"""Structure factors from MTZ files and atomic models, through gemmi.

Both end as the dense P1 table the simulator looks up (the same object
``read_hkl`` returns), so everything after ``read_inputs`` is unchanged:

* ``read_mtz``: one amplitude or intensity column (intensities become
  ``sqrt(max(I, 0))``), or an anomalous pair F(+)/F(-) or I(+)/I(-).
* ``model_structure_factors``: |F| of a PDB or mmCIF model to a resolution,
  computed by gemmi (electron density on a fine grid, then an FFT).
* ``expand_to_p1``: reflections given in one asymmetric unit made into every
  symmetry equivalent, plus Friedel mates where the data are not anomalous.
* ``read_dials_reflections``: a DIALS reflection table (``.refl``, read with
  plain msgpack, or its JSON export with ``hkl`` and ``I``): the mean
  summation intensity of each reflection, as ``sqrt(max(I, 0))``.

Reflections the source does not give keep ``default_F``, as with ``-hkl``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .hkl import HKLTable

_MAX_CELLS = 2e9 / 8  # as the HKL reader: a dense float64 table of at most 2 GB

AMPLITUDE, INTENSITY, AMPLITUDE_PAIR, INTENSITY_PAIR = "F", "J", "G", "K"
_USABLE = (AMPLITUDE, INTENSITY, AMPLITUDE_PAIR, INTENSITY_PAIR)
_TYPE_WORDS = {"F": "amplitude", "J": "intensity", "G": "anomalous amplitude F(+)/F(-)",
               "K": "anomalous intensity I(+)/I(-)"}

# FFT settings of the model calculation: a grid three times finer than the
# resolution needs and density kept down to 1e-7 of its peak. Against gemmi's
# direct summation (StructureFactorCalculatorX) this agrees to about 1e-5
# relative, where gemmi's defaults (rate 1.5, cutoff 1e-5) give about 1e-3.
# Grids above MAX_MODEL_GRID_POINTS take a lower rate (not below 1.5).
MODEL_GRID_RATE = 3.0
MODEL_DENSITY_CUTOFF = 1e-7
MAX_MODEL_GRID_POINTS = 2e8  # float32 density grid of at most 800 MB
DEFAULT_MODEL_DMIN = 2.0  # Angstrom, when neither -model_dmin nor -dmin is given


@dataclass
class StructureFactorTable(HKLTable):
    """An ``HKLTable`` (grid, h_min, k_min, l_min, count, warnings) that also
    says where it came from. ``count`` is the number of P1 reflections that
    received a value; ``read`` the number of reflections in the source."""
    read: int = 0
    space_group: str = "P 1"
    cell: tuple[float, ...] | None = None  # a b c (A) alpha beta gamma (deg) of the source
    anomalous: bool = False
    columns: tuple[str, ...] = ()  # MTZ labels used
    d_min: float | None = None  # model calculations: the resolution limit (A)


def _gemmi():
    try:
        import gemmi
    except ImportError:  # pragma: no cover - gemmi is a dependency
        raise InputError("reading MTZ files and atomic models needs the gemmi package (pip install gemmi)") from None
    return gemmi


def _check_file(path, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"cannot read {what} file {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"cannot read {what} file {path}: it is a folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {what} file {path}: not readable")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ----------------------------------------------------------------------------- symmetry

def rotations(space_group) -> np.ndarray:
    """The distinct integer rotation matrices (n, 3, 3) of a gemmi.SpaceGroup
    (or GroupOps); a row vector h becomes the equivalent ``h @ R``, as
    gemmi's ``Op.apply_to_hkl``. Centring translations change no amplitude
    and are left out."""
    ops = space_group.operations() if hasattr(space_group, "operations") else space_group
    mats = []
    for op in ops.sym_ops:
        R = np.array(op.rot, dtype=np.int64) // op.DEN
        if not any((R == M).all() for M in mats):
            mats.append(R)
    return np.stack(mats)


def expand_to_p1(hkl, values, space_group=None, *, minus=None, default_F: float = 0.0,
                 source: str = "structure factors") -> tuple[np.ndarray, tuple, int]:
    """Spread reflections over every symmetry equivalent onto a dense grid.

    ``hkl`` (n, 3) integers and ``values`` (n,) amplitudes; ``space_group`` a
    gemmi.SpaceGroup (None: P 1). Without ``minus`` the Friedel mate -h gets
    the value of h too. With ``minus`` (n,) the data are anomalous: equivalents
    of h take ``values`` (F(+)) and those of -h take ``minus`` (F(-)); Friedel
    mates are not merged. NaN values are missing and set nothing.

    Where several values reach one reflection, a reflection given in the input
    wins over one derived by symmetry, and a symmetry equivalent over a Friedel
    mate; among equals the later input row wins. Returns (grid, (h_min, k_min,
    l_min), reflections set); unset cells hold ``default_F``.
    """
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    plus = np.asarray(values, dtype=np.float64).reshape(-1)
    anomalous = minus is not None
    if anomalous:
        minus = np.asarray(minus, dtype=np.float64).reshape(-1)
    mats = rotations(space_group) if space_group is not None else np.eye(3, dtype=np.int64)[None]

    def present(idx, val):
        keep = ~np.isnan(val)
        return idx[keep], val[keep]

    eq = np.einsum("ni,rij->nrj", hkl, mats).reshape(-1, 3)  # every equivalent, row by row
    eq_plus = np.repeat(plus, len(mats))
    layers = []  # in write order: later layers win
    if anomalous:
        eq_minus = np.repeat(minus, len(mats))
        layers += [present(-eq, eq_minus), present(eq, eq_plus), present(-hkl, minus), present(hkl, plus)]
    else:
        layers += [present(-eq, eq_plus), present(eq, eq_plus), present(hkl, plus)]
    idx = np.concatenate([a for a, _ in layers])
    val = np.concatenate([b for _, b in layers])
    if len(idx) == 0:
        raise InputError(f"{source}: no reflections with a value")
    if not np.isfinite(val).all():
        raise InputError(f"{source}: {int((~np.isfinite(val)).sum())} structure factors are infinite")
    lo = idx.min(axis=0)
    shape = tuple(int(x) for x in idx.max(axis=0) - lo + 1)
    if float(np.prod([s + 1 for s in shape], dtype=np.float64)) > _MAX_CELLS:
        raise InputError(f"{source}: index range {shape} is too large for a dense table")
    flat = np.ravel_multi_index(tuple((idx - lo).T), shape)
    # the last write of each reflection, without relying on numpy's order for repeated indices
    _, first_rev = np.unique(flat[::-1], return_index=True)
    last = len(flat) - 1 - first_rev
    grid = np.full(shape, float(default_F), dtype=np.float64)
    grid.reshape(-1)[flat[last]] = val[last]
    return grid, tuple(int(x) for x in lo), int(len(last))


# ----------------------------------------------------------------------------- MTZ

_PAIR_WORDS = [("(+)", "(-)"), ("_plus", "_minus"), ("plus", "minus"), ("PLUS", "MINUS"), ("+", "-")]


def _partner_label(label: str, labels: list[str]) -> tuple[str, bool] | None:
    """(the other half of an anomalous pair, whether `label` is the plus half)
    found by name: F(+)/F(-), FP_plus/FP_minus, F+/F- ..."""
    for p, m in _PAIR_WORDS:
        if p in label:
            other = label[::-1].replace(p[::-1], m[::-1], 1)[::-1]  # the last occurrence
            if other in labels:
                return other, True
        if m in label:
            other = label[::-1].replace(m[::-1], p[::-1], 1)[::-1]
            if other in labels:
                return other, False
    return None


def _describe_columns(mtz) -> str:
    return ", ".join(f"{c.label} ({c.type})" for c in mtz.columns if c.type != "H")


def _pick_columns(mtz, path, column: str | None):
    """[(plus column)] or [plus, minus] for an anomalous pair."""
    cols = [c for c in mtz.columns if c.type != "H"]
    labels = [c.label for c in cols]
    by_label = {}
    for c in cols:
        by_label.setdefault(c.label, c)  # the first dataset's, as gemmi's column_with_label

    def usable_list():
        found = [f"{c.label} ({c.type})" for c in cols if c.type in _USABLE]
        return ", ".join(found) if found else "none"

    if column is not None and "," in column:  # an explicit pair: PLUS,MINUS
        names = [s.strip() for s in column.split(",")]
        if len(names) != 2 or not all(names):
            raise InputError(f"-mtz_column {column}: give one label, or two labels 'PLUS,MINUS' for an anomalous pair")
        pair = []
        for n in names:
            if n not in by_label:
                raise InputError(f"MTZ file {path} has no column '{n}'; its columns: {_describe_columns(mtz)}")
            pair.append(by_label[n])
        kinds = {c.type for c in pair}
        if kinds not in ({AMPLITUDE_PAIR}, {INTENSITY_PAIR}, {AMPLITUDE}, {INTENSITY}):
            raise InputError(f"-mtz_column {column}: the two columns must both be amplitudes (F or G) or both "
                             f"intensities (J or K), got types {pair[0].type} and {pair[1].type}")
        return pair

    if column is None:
        for kind in _USABLE:
            first = next((c for c in cols if c.type == kind), None)
            if first is not None:
                break
        else:
            raise InputError(f"MTZ file {path} has no amplitude (F, G) or intensity (J, K) column; "
                             f"its columns: {_describe_columns(mtz) or 'none'}")
        col = first
    else:
        if column not in by_label:
            raise InputError(f"MTZ file {path} has no column '{column}'; amplitude and intensity columns: "
                             f"{usable_list()}")
        col = by_label[column]
        if col.type not in _USABLE:
            raise InputError(f"MTZ column '{column}' has type {col.type}, not an amplitude (F, G) or intensity "
                             f"(J, K); usable columns: {usable_list()}")
    if col.type in (AMPLITUDE, INTENSITY):
        return [col]

    # an anomalous half: find the other one by name, else by order in its dataset
    found = _partner_label(col.label, labels)
    if found is not None and by_label[found[0]].type == col.type:
        other, is_plus = by_label[found[0]], found[1]
    else:
        same = [c for c in cols if c.type == col.type and c.dataset_id == col.dataset_id]
        i = next(j for j, c in enumerate(same) if c.label == col.label)
        j = i + 1 if i % 2 == 0 else i - 1
        if j >= len(same):
            raise InputError(f"MTZ column '{col.label}' ({_TYPE_WORDS[col.type]}) has no partner; name both: "
                             f"-mtz_column PLUS,MINUS")
        other, is_plus = same[j], i % 2 == 0
    return [col, other] if is_plus else [other, col]


def _check_mtz_head(path) -> None:
    """Refuse, at once, a file whose first words are not an MTZ file's: the
    magic "MTZ ", then where its header starts (in 4-byte words, counted from
    1; -1: a 64-bit position follows), then the machine stamp (its second byte 0x1_: big-endian
    numbers). A garbage position would otherwise have the reader chase it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"cannot read MTZ file {path}: {exc.strerror or exc}") from None
    if len(head) < 12 or head[:4] != b"MTZ ":
        raise InputError(f"{path} is not an MTZ file (it does not start with 'MTZ ')")
    order = ">" if head[9] >> 4 == 1 else "<"
    word = struct.unpack(order + "i", head[4:8])[0]
    if word == -1 and len(head) >= 20:
        start = (struct.unpack(order + "q", head[12:20])[0] - 1) * 4
    else:
        start = (word - 1) * 4
    if not 12 <= start <= size - 80:
        raise InputError(f"MTZ file {path} is damaged: its header position ({start} bytes) is outside the file "
                          f"({size} bytes)")


def read_mtz(path, column: str | None = None, default_F: float = 0.0) -> StructureFactorTable:
    """Amplitudes from an MTZ file, expanded to P1 with its space group.

    ``column``: a label of type F (amplitude), J (intensity, amplitude
    sqrt(max(I, 0))), G or K (one half of an anomalous pair F(+)/F(-) or
    I(+)/I(-): the other half is found by name, e.g. F(+) and F(-), else it is
    the neighbouring column of that type), or two labels ``PLUS,MINUS``.
    None: the first F column, else the first J, else the first G pair, else
    the first K pair. Anomalous pairs set h from the plus column and -h from
    the minus column; otherwise -h is given the value of h. Missing values
    (NaN) leave their reflections at ``default_F``.
    """
    gemmi = _gemmi()
    path = os.fspath(path)
    _check_file(path, "MTZ")
    _check_mtz_head(path)
    try:
        mtz = gemmi.read_mtz_file(path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read MTZ file {path}: {_one_line(exc)}") from None
    if mtz.nreflections == 0:
        raise InputError(f"MTZ file {path} has no reflections")
    if mtz.column_with_label("M/ISYM") is not None or len(mtz.batches) > 0:
        raise InputError(f"MTZ file {path} holds unmerged data (M/ISYM, batches); give merged data")
    pair = _pick_columns(mtz, path, column)
    warnings = []
    sg = mtz.spacegroup
    if sg is None:
        warnings.append(f"WARNING: MTZ file {path} names no space group; taking P 1")
        sg = gemmi.SpaceGroup("P 1")
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int64)
    data = [np.asarray(c.array, dtype=np.float64) for c in pair]
    if pair[0].type in (INTENSITY, INTENSITY_PAIR):
        with np.errstate(invalid="ignore"):
            data = [np.where(np.isnan(d), np.nan, np.sqrt(np.maximum(d, 0.0))) for d in data]
    anomalous = len(pair) == 2
    where = f"MTZ file {path} column {'/'.join(c.label for c in pair)}"
    grid, lo, n = expand_to_p1(hkl, data[0], sg, minus=data[1] if anomalous else None, default_F=default_F,
                               source=where)
    cell = mtz.cell
    return StructureFactorTable(grid, *lo, count=n, warnings=tuple(warnings), read=int(mtz.nreflections),
                                space_group=sg.hm, cell=(cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma),
                                anomalous=anomalous, columns=tuple(c.label for c in pair))


# ----------------------------------------------------------------------------- DIALS reflection tables
# element types of a .refl column: numpy type and values per row
_REFL_TYPES = {"double": ("<f8", 1), "float": ("<f4", 1), "int": ("<i4", 1), "bool": ("u1", 1),
               "std::size_t": ("<u8", 1), "vec3<double>": ("<f8", 3), "vec2<double>": ("<f8", 2),
               "cctbx::miller::index<>": ("<i4", 3), "int6": ("<i4", 6), "mat3<double>": ("<f8", 9)}
_INTENSITY_COLUMNS = ("intensity.sum.value", "intensity.prf.value", "I")


def _refl_columns(path) -> dict:
    """The columns of a DIALS .refl file (msgpack: the tag
    "dials::af::reflection_table", a version, then nrows and per column
    its element type and its little-endian bytes) that the reader needs."""
    try:
        import msgpack
    except ImportError:
        raise InputError(f"reading DIALS reflection table {path} needs msgpack: pip install msgpack") from None
    try:
        with open(path, "rb") as fh:
            doc = msgpack.unpackb(fh.read(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise InputError(f"cannot read DIALS reflection table {path}: {_one_line(exc)}") from None
    if not (isinstance(doc, (list, tuple)) and len(doc) == 3 and doc[0] == "dials::af::reflection_table"
            and isinstance(doc[2], dict)):
        raise InputError(f"{path} is not a DIALS reflection table (no dials::af::reflection_table header)")
    body = doc[2]
    nrows = int(body.get("nrows", 0))
    columns = {}
    for name in ("miller_index",) + _INTENSITY_COLUMNS:
        if name not in body.get("data", {}):
            continue
        kind, (count, blob) = body["data"][name]
        if kind not in _REFL_TYPES:
            raise InputError(f"{path}: column {name} has an unknown type {kind}")
        dtype, per = _REFL_TYPES[kind]
        values = np.frombuffer(blob, dtype=dtype)
        if int(count) != nrows or values.size != nrows * per:
            raise InputError(f"{path}: column {name} holds {values.size // per} rows, the table {nrows}")
        columns[name] = values.reshape(nrows, per) if per > 1 else values
    return columns


def _json_columns(path) -> dict:
    import json
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read reflections {path}: {_one_line(exc)}") from None
    rows = doc.get("reflections") if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "hkl" in r for r in rows):
        raise InputError(f"{path}: expected a list of reflections with hkl and I (a DIALS table exported to JSON)")
    columns = {"miller_index": np.array([r["hkl"] for r in rows], dtype=np.int64).reshape(-1, 3)}
    for name in _INTENSITY_COLUMNS:
        if all(name in r for r in rows):
            columns[name] = np.array([r[name] for r in rows], dtype=np.float64)
    return columns


def read_dials_reflections(path, default_F: float = 0.0, space_group: str | None = None) -> StructureFactorTable:
    """Amplitudes sqrt(max(<I>, 0)) from a DIALS reflection table: the mean
    summation (else profile) intensity over every observation of a
    reflection and (given `space_group`, a name or Hall symbol gemmi knows)
    of its symmetry and Friedel mates, expanded to P1 (None: P 1). Reflections indexed 0 0 0 are ignored; the rest keep `default_F`."""
    path = os.fspath(path)
    _check_file(path, "reflection table")
    columns = _json_columns(path) if path.lower().endswith(".json") else _refl_columns(path)
    name = next((c for c in _INTENSITY_COLUMNS if c in columns), None)
    if "miller_index" not in columns or name is None:
        raise InputError(f"{path}: no miller_index and intensity (intensity.sum.value, intensity.prf.value or I)")
    hkl = np.asarray(columns["miller_index"], dtype=np.int64).reshape(-1, 3)
    intensity = np.asarray(columns[name], dtype=np.float64).reshape(-1)
    keep = np.isfinite(intensity) & (np.abs(hkl).sum(1) > 0)
    if not keep.any():
        raise InputError(f"{path}: no indexed reflection with an intensity")
    sg = None
    if space_group is not None:
        gemmi = _gemmi()
        sg = gemmi.find_spacegroup_by_name(space_group.strip())
        if sg is None:  # a Hall symbol, as crystals in experiment lists hold it
            try:
                sg = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(space_group))
            except (RuntimeError, ValueError):
                sg = None
        if sg is None:
            raise InputError(f"unknown space group {space_group!r}")
    merged = hkl[keep]
    if sg is not None:  # symmetry and Friedel mates are one reflection: averaged together
        asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
        merged = np.array([asu.to_asu([int(v) for v in h], ops)[0] for h in merged], dtype=np.int64).reshape(-1, 3)
    unique, inverse = np.unique(merged, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    mean = np.bincount(inverse, weights=intensity[keep]) / np.bincount(inverse)
    grid, lo, n = expand_to_p1(unique, np.sqrt(np.maximum(mean, 0.0)), sg, default_F=default_F,
                               source=f"reflection table {path}")
    return StructureFactorTable(grid, *lo, count=n, read=int(keep.sum()), space_group=sg.hm if sg else "P 1",
                                columns=(name,))


# ----------------------------------------------------------------------------- atomic models

def model_structure_factors(path, d_min: float = DEFAULT_MODEL_DMIN, default_F: float = 0.0) -> StructureFactorTable:
    """|F| of a PDB or mmCIF model (its first model, all atoms with their
    occupancies and B factors, X-ray form factors of neutral atoms, no
    anomalous terms) for every reflection with d >= ``d_min`` Angstrom
    except F(000), expanded to P1 with the model's space group.

    gemmi computes them: it puts the model's electron density on a grid
    (DensityCalculatorX, grid ``MODEL_GRID_RATE`` times finer than d_min
    needs, with gemmi's Refmac-compatible blur removed again afterwards) and
    Fourier-transforms it; this matches gemmi's direct summation to ~1e-5.
    """
    gemmi = _gemmi()
    path = os.fspath(path)
    _check_file(path, "model")
    if not (d_min > 0 and math.isfinite(d_min)):
        raise InputError(f"-model_dmin must be a positive resolution (A), got {d_min:g}")
    try:
        st = gemmi.read_structure(path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read model file {path}: {_one_line(exc)}") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"model file {path} has no atoms")
    if not st.cell.is_crystal():
        raise InputError(f"model file {path} has no unit cell (CRYST1 record or _cell items)")
    warnings = []
    sg = st.find_spacegroup()
    if sg is None:
        what = f"an unknown space group '{st.spacegroup_hm}'" if st.spacegroup_hm else "no space group"
        warnings.append(f"WARNING: model file {path} has {what}; taking P 1")
        sg = gemmi.SpaceGroup("P 1")
        st.spacegroup_hm = sg.hm
    model = st[0]
    unknown = _unknown_elements(gemmi, model)
    if unknown:
        raise InputError(f"model file {path}: no X-ray form factor for element(s) {', '.join(unknown)}")
    # the density grid: MODEL_GRID_RATE, coarser (down to gemmi's usual 1.5) where it would be huge
    rec = st.cell.reciprocal()
    half_points = np.prod([1.0 / (d_min * r) for r in (rec.a, rec.b, rec.c)]) * 8  # (2 h_max)^3, rate 1
    rate = min(MODEL_GRID_RATE, (MAX_MODEL_GRID_POINTS / half_points) ** (1 / 3))
    if rate < 1.5:
        raise InputError(f"model file {path}: a density grid for d_min {d_min:g} A in this cell is too large; "
                         "raise -model_dmin")
    try:
        dc = gemmi.DensityCalculatorX()
        dc.d_min = d_min
        dc.rate = rate
        dc.cutoff = MODEL_DENSITY_CUTOFF
        dc.set_refmac_compatible_blur(model)
        dc.set_grid_cell_and_spacegroup(st)
        dc.put_model_density_on_grid(model)
        fgrid = gemmi.transform_map_to_f_phi(dc.grid, half_l=True)
        asu = fgrid.prepare_asu_data(dmin=d_min, unblur=dc.blur, with_000=False)
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise InputError(f"cannot compute structure factors of {path}: {_one_line(exc)}") from None
    hkl = np.asarray(asu.miller_array, dtype=np.int64)
    amp = np.abs(np.asarray(asu.value_array))
    if len(hkl) == 0:
        raise InputError(f"model file {path}: no reflections with d >= {d_min:g} A in this cell")
    grid, lo, n = expand_to_p1(hkl, amp, sg, default_F=default_F, source=f"model file {path}")
    cell = st.cell
    return StructureFactorTable(grid, *lo, count=n, warnings=tuple(warnings), read=len(hkl), space_group=sg.hm,
                                cell=(cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma), d_min=d_min)


def _unknown_elements(gemmi, model) -> list[str]:
    bad = set()
    for ch in model:
        for res in ch:
            for a in res:
                if a.element.atomic_number == 0:
                    bad.add(a.element.name)
    return sorted(bad)


def cell_mismatch(table_cell, cell, tolerance: float = 0.01) -> bool:
    """Whether two cells (a b c alpha beta gamma) differ by more than
    `tolerance` (relative) in any parameter."""
    if table_cell is None or cell is None:
        return False
    return any(abs(x - y) > tolerance * max(abs(y), 1e-12) for x, y in zip(table_cell, cell))

