"""Writing what a run produces: the float image, SMV and PGM files, the
noise image and the end-of-run report. Every file is written whole or not
at all."""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError


def check_writable(cfg) -> None:
    o = cfg.output
    for path in (o.floatfile, o.intfile, o.noisefile, o.pgmfile):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise InputError(f"cannot write {path}: folder {folder} does not exist")


def _atomic_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_all(sim, info, image, out) -> None:
    o = info.config.output
    img = image.detach().to("cpu").float().numpy()
    if o.floatfile:
        print(f"writing {o.floatfile} as {img.size} 4-byte floats", file=out)
        _atomic_bytes(o.floatfile, img.astype("<f4").tobytes())
