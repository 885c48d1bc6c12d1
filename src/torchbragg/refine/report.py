"""The report of `torchbragg refine`: a Markdown page and its PNG figures
(matplotlib, Agg backend), made in memory so the caller writes each file whole.
One image (`build_report`) or several refined together (`build_joint_report`)."""

from __future__ import annotations

import io
import math
import os

import numpy as np

FIGURES = ("spots.png", "loss.png", "correlation.png")
FIGURE_IMAGES = 4  # several images: spot figures for the first few only
MAX_TICK_LABELS = 60  # a larger correlation matrix is drawn without its labels


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def strongest_spots(model: np.ndarray, roi: np.ndarray, count: int, half: int) -> list[tuple[int, int, int]]:
    """(panel, slow, fast) of the `count` brightest local maxima of the model
    (above its panel's median) inside the region, at least `half` pixels apart."""
    P, S, F = model.shape
    spots = []
    for k in range(P):
        img = model[k] - np.median(model[k])
        order = np.argsort(np.where(roi[k], img, -np.inf), axis=None)[::-1]
        for flat in order[: 20 * max(count, 1) * (2 * half + 1)]:
            s, f = divmod(int(flat), F)
            if not roi[k, s, f] or not img[s, f] > 0:
                break
            window = img[max(s - 1, 0):s + 2, max(f - 1, 0):f + 2]
            if img[s, f] < window.max():
                continue
            if any(p == k and abs(s - s2) <= half and abs(f - f2) <= half for p, s2, f2, _ in spots):
                continue
            spots.append((k, s, f, float(img[s, f])))
    spots.sort(key=lambda t: -t[3])
    return [(k, s, f) for k, s, f, _ in spots[:count]]


def _cut(a: np.ndarray, k: int, s: int, f: int, half: int) -> np.ndarray:
    P, S, F = a.shape
    out = np.full((2 * half + 1, 2 * half + 1), np.nan)
    s0, s1, f0, f1 = max(s - half, 0), min(s + half + 1, S), max(f - half, 0), min(f + half + 1, F)
    out[s0 - (s - half):s1 - (s - half), f0 - (f - half):f1 - (f - half)] = a[k, s0:s1, f0:f1]
    return out


def strongest_observed(data, valid, count: int) -> list[tuple[int, int, int]]:
    """(panel, slow, fast) of the pixels holding the centroids of the
    `count` brightest observed spots (centroids.observed_spots)."""
    from .centroids import observed_spots
    found = observed_spots(np.where(valid, data, 0.0), valid)
    order = np.argsort(-found.intensity)[:count]
    return [(int(found.panel[i]), int(found.xy[i, 1]), int(found.xy[i, 0])) for i in order]


def spots_figure(data, model, valid, roi, count: int = 12, half: int = 7, label=None) -> tuple[bytes, int]:
    """Observed, model and residual (observed - model, masked pixels blank) in
    small cut-outs around the strongest observed spots (the model's where the
    data show none), on one colour scale for every observed and model cut-out
    and one for every residual. label(panel, slow, fast): a spot's title (its
    Miller indices), default its pixel."""
    plt = _pyplot()
    spots = strongest_observed(data, valid, count) or strongest_spots(model, roi, count, half)
    obs = np.where(valid, data, np.nan)
    resid = obs - model
    n = max(len(spots), 1)
    cuts = [[_cut(a, k, s, f, half) for a in (obs, model, resid)] for k, s, f in spots]
    top = max([np.nanmax(c) for o, m, _ in cuts for c in (o, m) if np.isfinite(c).any()] + [1e-12])
    lim = max([np.nanmax(np.abs(r)) for _, _, r in cuts if np.isfinite(r).any()] + [1e-12])
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n + 1.6, 4.6), squeeze=False)
    image = residual = None
    for j in range(n):
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        if j >= len(spots):
            continue
        k, s, f = spots[j]
        o, m, r = cuts[j]
        image = axes[0, j].imshow(o, vmin=0, vmax=top, cmap="viridis", interpolation="nearest")
        axes[1, j].imshow(m, vmin=0, vmax=top, cmap="viridis", interpolation="nearest")
        residual = axes[2, j].imshow(r, vmin=-lim, vmax=lim, cmap="RdBu_r", interpolation="nearest")
        axes[0, j].set_title(label(k, s, f) if label is not None else f"p{k} s{s} f{f}", fontsize=6)
    for i, name in enumerate(("observed", "model", "residual")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[:2, :].ravel().tolist(), shrink=0.8, label="photons")
        fig.colorbar(residual, ax=axes[2, :].ravel().tolist(), shrink=0.8)
    if not spots:
        axes[0, 0].set_title("no spot in the region", fontsize=8)
    return _png(fig), len(spots)


def loss_figure(history, title: str = "loss per evaluation (all stages)") -> bytes:
    plt = _pyplot()
    h = np.asarray([v if v is not None else np.nan for v in history], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3))
    if h.size:
        ax.plot(np.arange(1, h.size + 1), h, ".-", ms=3, lw=0.8)
        finite = h[np.isfinite(h)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def correlation_figure(labels, corr) -> bytes:
    plt = _pyplot()
    c = np.asarray(corr, dtype=float)
    n = len(labels)
    side = 0.35 * min(max(n, 2), MAX_TICK_LABELS)
    fig, ax = plt.subplots(figsize=(1.2 + side, 1.0 + side))
    if n:
        im = ax.imshow(np.where(np.isfinite(c), c, np.nan), vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        if n <= MAX_TICK_LABELS:
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels(labels, rotation=90, fontsize=7)
            ax.set_yticklabels(labels, fontsize=7)
        else:
            ax.set_xlabel(f"{n} parameters, in the order of refined.json's labels", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("correlation of the refined parameters", fontsize=9)
    return _png(fig)


def _num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "undetermined" if v is not None and math.isinf(v) else "-"
    return f"{v:.6g}"


def fit_lines(doc: dict) -> list[str]:
    """The converged line, the warnings and the goodness-of-fit section."""
    lines = [f"- converged: {'yes' if doc['converged'] else 'NO'}"]
    for w in doc.get("warnings", []):
        lines.append(f"- **warning: {w}**")
    f = doc.get("fit") or {}
    if not f:
        return lines
    lines += ["", "## Goodness of fit", "",
              "Deviance (for the Gaussian likelihood, chi-square) of the region's pixels against what photon noise "
              "allows for the refined model; residuals around the observed spots normalised by the noise; spots "
              "whose observed centroid lies off the model's beyond noise (a dipole residual: a wrong orientation "
              "or geometry).", "",
              "| quantity | value | expected from noise |", "| --- | --- | --- |",
              f"| deviance per pixel ({f['pixels']} pixels) | {_num(f['deviance_per_pixel'])} | "
              f"{_num(f['expected_per_pixel'])} |",
              f"| deviance ratio (standard score) | {_num(f['deviance_ratio'])} ({_num(f['deviance_z'])}) | 1 (0) |",
              f"| spots with a shifted centroid | {f['shifted_spots']} of {f['spots']} | about 0.1 % |",
              f"| rms normalised residual of the spot pixels | {_num(f['spot_pixel_residual_rms'])} | "
              f"{_num(f['spot_pixel_residual_expected'])} |",
              f"| rms normalised residual of the spot intensities | {_num(f['spot_intensity_residual_rms'])} | "
              f"{_num(f['spot_intensity_residual_expected'])} |",
              f"| uncertainty inflation (sqrt of the deviance ratio when above 1) | "
              f"{_num(doc.get('uncertainty_scale', 1.0))} | 1 |",
              f"| Newton decrement (twice the loss still to gain) | {_num(doc.get('newton_decrement'))} | < 1 |"]
    return lines


def markdown(doc: dict, spots_shown: int) -> str:
    lines = ["# torchbragg refine report", ""]
    lines.append(f"- experiment: `{doc['experiment_file']}` (experiment {doc['experiment']})")
    lines.append(f"- image: `{doc['image_file']}`" + (f" (scan image {doc['image']})" if doc["image"] else " (still)"))
    lines.append(f"- groups: {', '.join(doc['groups'])}; loss: {doc['loss_function']}")
    lines.append(f"- final loss {doc['loss']:.6g} over {doc['pixels']} pixels; {doc['renders']} renders "
                 f"(+{doc['hessian_renders']} for the curvature); {doc['seconds']:.1f} s")
    lines.append(f"- crystal rotation from the start: {doc['crystal']['rotation_from_start_deg']:.5f} deg")
    lines += fit_lines(doc)
    lines.append("")
    lines.append("## Parameters")
    lines.append("")
    lines.append("| group | parameter | start | refined | uncertainty | unit |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for p in doc["parameters"]:
        lines.append(f"| {p['group']} | {p['name']} | {_num(p['start'])} | {_num(p['value'])} | "
                     f"{_num(p['sigma'])} | {p['unit']} |")
    lines.append("")
    if doc["undetermined"]:
        lines.append("Undetermined by these data (infinite uncertainty): " + ", ".join(doc["undetermined"]) + ".")
    else:
        lines.append("Every refined parameter is determined by the data.")
    lines.append("")
    lines.append("## Spots")
    lines.append("")
    lines.append(f"Observed (top), refined model (middle) and residual (bottom) around the {spots_shown} "
                 "strongest observed spots, titled with their Miller indices, on one colour scale (photons) "
                 "for observed and model and one for the residuals; masked pixels are blank.")
    lines.append("")
    lines.append("![spots](spots.png)")
    lines.append("")
    lines.append("## Loss")
    lines.append("")
    lines.append("![loss](loss.png)")
    lines.append("")
    lines.append("## Correlations")
    lines.append("")
    lines.append("![correlation](correlation.png)")
    lines.append("")
    lines.append("## Stages")
    lines.append("")
    lines.append("| groups | broaden | dtype | iterations | renders | loss | converged |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for s in doc["stages"]:
        lines.append(f"| {', '.join(s['groups'])} | {s['broaden'] if s['broaden'] else '-'} | {s['dtype']} | "
                     f"{s['iterations']} | {s['renders']} | {_num(s['loss'])} | {'yes' if s['converged'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def build_report(doc: dict, result, data, model, valid, roi, spots: int = 12, label=None) -> dict[str, bytes]:
    """{file name: bytes}: report.md and its figures; label: titles of the
    spot cut-outs (spots_figure)."""
    spots_png, shown = spots_figure(data, model, valid, roi, max(spots, 1), label=label)
    files = {"spots.png": spots_png, "loss.png": loss_figure(doc["loss_history"]),
             "correlation.png": correlation_figure(list(result.labels), result.correlation.numpy())}
    files["report.md"] = markdown(doc, shown).encode()
    return files


# ----------------------------------------------------------------------------- several images

def _parameter_rows(params, prefix: str = "") -> list[str]:
    return [f"| {prefix}{p['group']} | {p['name']} | {_num(p['start'])} | {_num(p['value'])} | {_num(p['sigma'])} | "
            f"{p['unit']} |" for p in params]


def joint_markdown(doc: dict, figures: list[tuple[int, str, int]]) -> str:
    """report.md of several images; figures: (image, file name, spots shown)."""
    n = len(doc["images"])
    sweep = doc["mode"] == "sweep"
    lines = ["# torchbragg refine report", ""]
    which = doc["experiments"]
    lines.append(f"- experiment: `{doc['experiment_file']}` (experiment{'s' if len(which) > 1 else ''} "
                 f"{', '.join(map(str, which))})")
    lines.append(f"- {n} images refined together: " + (
        "images of one sweep, one crystal, detector and beam shared by all" if sweep else
        "a series of stills, a crystal each, detector and beam shared by all"))
    lines.append(f"- shared groups: {', '.join(doc['shared_groups']) or 'none'}; per image: "
                 f"{', '.join(doc['per_image_groups']) or 'none'}; loss: {doc['loss_function']}")
    lines.append(f"- final loss {doc['loss']:.6g} over {doc['pixels']} pixels; {doc['renders']} renders "
                 f"(+{doc['hessian_renders']} for the curvature); {doc['seconds']:.1f} s")
    lines += fit_lines(doc)
    lines.append("")
    if doc["parameters"]:
        lines += ["## Shared parameters", "", "| group | parameter | start | refined | uncertainty | unit |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += _parameter_rows(doc["parameters"])
        lines.append("")
    lines += ["## Images", "",
              "| image | experiment | file | scan image | pixels | loss | rotation from the start (deg) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    one_file = len({im["image_file"] for im in doc["images"]}) == 1
    for j, im in enumerate(doc["images"]):
        name = os.path.basename(im["image_file"]) + (f" (image {im['file_index'] + 1})" if one_file else "")
        lines.append(f"| {j} | {im['experiment']} | `{name}` | "
                     f"{im['image'] if im['image'] is not None else 'still'} | {im['pixels']} | {_num(im['loss'])} | "
                     f"{im['crystal']['rotation_from_start_deg']:.5f} |")
    lines.append("")
    if any(im["parameters"] for im in doc["images"]):
        lines += ["## Parameters per image", "", "| image | group | parameter | start | refined | uncertainty | unit |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for j, im in enumerate(doc["images"]):
            lines += _parameter_rows(im["parameters"], f"{j} | ")
        lines.append("")
    if doc["undetermined"]:
        lines.append("Undetermined by these data (infinite uncertainty): " + ", ".join(doc["undetermined"]) + ".")
    else:
        lines.append("Every refined parameter is determined by the data.")
    if doc.get("not_written"):
        lines.append("")
        lines.append("Per-image values that a model shared by several images cannot hold (in refined.json only): "
                     + ", ".join(doc["not_written"]) + ".")
    lines += ["", "## Spots", ""]
    lines.append("Observed (top), refined model (middle) and residual (bottom) around the strongest observed "
                 "spots, titled with their Miller indices, on one colour scale per image; masked pixels are blank"
                 + (f"; the first {len(figures)} of the {n} images." if len(figures) < n else "."))
    for j, name, shown in figures:
        im = doc["images"][j]
        where = f", scan image {im['image']}" if im["image"] is not None else ""
        lines += ["", f"### Image {j} (experiment {im['experiment']}{where}): {shown} spots", "",
                  f"![spots of image {j}]({name})"]
    lines += ["", "## Loss", "", "The summed loss of all images per evaluation of the joint stages (the per-image "
              "stages' histories are in refined.json).", "", "![loss](loss.png)", "",
              "## Correlations", "", "![correlation](correlation.png)", "", "## Stages", "",
              "| image | groups | broaden | dtype | iterations | renders | loss | converged |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for st in doc["stages"]:
        lines.append(f"| {st.get('image', 'all')} | {', '.join(st['groups'])} | "
                     f"{st['broaden'] if st['broaden'] else '-'} | {st['dtype']} | {st['iterations']} | "
                     f"{st['renders']} | {_num(st['loss'])} | {'yes' if st['converged'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def build_joint_report(doc: dict, result, shown, spots: int = 12) -> dict[str, bytes]:
    """{file name: bytes}: report.md and its figures for several images;
    shown: (data, model, valid, roi, label) of the images given spot figures
    (the first ones; label titles their cut-outs, see spots_figure)."""
    files, figures = {}, []
    for j, (data, model, valid, roi, label) in enumerate(shown):
        png, count = spots_figure(data, model, valid, roi, max(spots, 1), label=label)
        name = f"spots_image{j}.png"
        files[name] = png
        figures.append((j, name, count))
    files["loss.png"] = loss_figure(doc["loss_history"], "summed loss per evaluation (joint stages)")
    files["correlation.png"] = correlation_figure(list(result.labels), result.correlation.numpy())
    files["report.md"] = joint_markdown(doc, figures).encode()
    return files
