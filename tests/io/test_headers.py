"""Geometry from SMV headers (-img, -mask): flags override headers, the image
header is read after the mask's, and masked pixels stay zero."""

import numpy as np

import golden
from torchbragg.io.smv import read_smv

CELL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "3", "-nonoise", "-nopgm"]


def _smv(path, width, height, data=None, **keys):
    head = "{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
    head += f"SIZE1={width};\nSIZE2={height};\n" + "".join(f"{k}={v};\n" for k, v in keys.items()) + "}\f"
    body = (np.ones((height, width), np.uint16) if data is None else data.astype("<u2")).tobytes()
    path.write_bytes(head.encode().ljust(512, b" ") + body)
    return str(path)


def test_image_header_wins_over_mask_header_and_mask_skips_pixels(tmp_path):
    mask = np.ones((40, 48), np.uint16)
    mask[10:14, 20:26] = 0
    _smv(tmp_path / "mask.img", 48, 40, mask, PIXEL_SIZE=0.2, DISTANCE=80, WAVELENGTH=1.2,
         BEAM_CENTER_X=3.0, BEAM_CENTER_Y=2.0)
    _smv(tmp_path / "head.img", 48, 40, PIXEL_SIZE=0.1, DISTANCE=120, WAVELENGTH=1.5,
         BEAM_CENTER_X=2.5, BEAM_CENTER_Y=2.1)
    rc, text = golden.run_cli(CELL + ["-mask", "mask.img", "-img", "head.img", "-floatfile", "f.bin",
                                      "-intfile", "i.img"], tmp_path)
    assert rc == 0, text
    header, _ = read_smv(str(tmp_path / "i.img"))
    assert header["PIXEL_SIZE"] == "0.1" and header["DISTANCE"] == "120" and header["WAVELENGTH"] == "1.5"
    assert header["BEAM_CENTER_X"] == "2.5" and header["BEAM_CENTER_Y"] == "2.1"
    image = np.fromfile(tmp_path / "f.bin", "<f4").reshape(40, 48)
    assert (image[10:14, 20:26] == 0).all()
    assert (image[mask == 1] > 0).all()
    assert "skipping zero-flagged pixels in mask.img" in text


def test_mask_header_flips_y_and_flags_override(tmp_path):
    _smv(tmp_path / "mask.img", 32, 30, PIXEL_SIZE=0.1, DISTANCE=90, BEAM_CENTER_X=1.0, BEAM_CENTER_Y=0.5)
    rc, text = golden.run_cli(CELL + ["-mask", "mask.img", "-distance", "70", "-floatfile", "f.bin",
                                      "-intfile", "i.img"], tmp_path)
    assert rc == 0, text
    header, _ = read_smv(str(tmp_path / "i.img"))
    # a mask's Y centre counts from the far edge: 30 px * 0.1 mm - 0.5 mm
    assert header["BEAM_CENTER_Y"] == "2.5"
    assert header["DISTANCE"] == "70"
