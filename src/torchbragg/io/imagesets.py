"""The `imageset` blocks of a DIALS experiment list: which image files an
experiment describes, as dxtbx writes them, and the files they name.

A sweep of one file per image is an ``ImageSequence`` with a ``template``
(``prefix_#####.cbf``; the number is the scan's image number); a NeXus file
is an ``ImageSequence`` (a sweep) or an ``ImageSet`` (stills) whose
``template`` is the file, with ``single_file_indices`` (0-based images of the
file); other stills are an ``ImageSet`` listing its ``images``. Paths are
written relative to the experiment file's folder, which readers resolve them
against (as dxtbx does).
"""

from __future__ import annotations

import os
import re

from ..errors import InputError

_OPTIONAL = {"mask": "", "gain": "", "pedestal": "", "dx": "", "dy": "",
             "params": {"dynamic_shadowing": "Auto", "multi_panel": False}}


def sequence(template: str, indices: list[int] | None = None) -> dict:
    """An ImageSequence block: files named by `template` (#### for the image
    number), or a multi-image file with the images `indices` of it."""
    block = {"__id__": "ImageSequence", "template": template}
    if indices is not None:
        block["single_file_indices"] = list(indices)
    return block | _OPTIONAL


def image_set(images: list[str], indices: list[int] | None = None) -> dict:
    """An ImageSet block: still images, one file each, or images `indices` of one multi-image file."""
    block = {"__id__": "ImageSet"}
    if indices is not None:
        block["template"] = images[0]
        block["single_file_indices"] = list(indices)
    else:
        block["images"] = list(images)
    return block | _OPTIONAL


def _resolve(path: str, folder: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))


def _expand(template: str, first: int, last: int) -> list[str]:
    m = list(re.finditer(r"#+", template))
    if not m:
        return [template]
    hashes = m[-1]
    width = hashes.end() - hashes.start()
    return [template[:hashes.start()] + f"{i:0{width}d}" + template[hashes.end():] for i in range(first, last + 1)]


def image_files(experiment, expt_path: str) -> tuple[list[str], bool]:
    """The image files an experiment's imageset names (resolved against the
    experiment file's folder) and whether they are one multi-image file:
    a sweep of per-image files in scan order from its first image; a
    multi-image file once; a still's file(s). Raises InputError when the
    experiment names no images."""
    block = experiment.extras.get("imageset")
    where = os.path.dirname(os.path.abspath(expt_path))
    if not isinstance(block, dict):
        raise InputError(f"{expt_path} names no images for this experiment (no imageset): give the image files")
    if block.get("single_file_indices") is not None or (block.get("template") and "#" not in block["template"]):
        return [_resolve(block["template"], where)], True
    if block.get("template"):
        scan = experiment.scan
        first, last = scan.image_range if scan is not None else (1, 1)
        return [_resolve(p, where) for p in _expand(block["template"], first, last)], False
    images = block.get("images") or []
    if not images:
        raise InputError(f"{expt_path}: the imageset of this experiment lists no images")
    return [_resolve(p, where) for p in images], False


def named_images(experiments, expt_path: str, chosen: list[int]) -> list[str]:
    """The files `torchbragg refine` reads for experiments `chosen` when the
    command line gives none: one experiment's files, or one file per
    experiment (or the one multi-image file they share)."""
    lists = [image_files(experiments[k], expt_path) for k in chosen if 0 <= k < len(experiments)]
    if not lists:
        return []
    if len(lists) == 1:
        return lists[0][0]
    files = {f for paths, _ in lists for f in paths}
    if all(multi for _, multi in lists) and len(files) == 1:
        return [files.pop()]
    return [paths[0] for paths, _ in lists]
