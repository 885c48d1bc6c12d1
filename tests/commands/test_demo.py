"""`torchbragg demo` (what `make demo` runs) writes every image and says where."""

import numpy as np

from torchbragg.io.smv import read_smv
from torchbragg.commands.tool import main


def test_demo_writes_all_images(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("demo.bin", "demo.img", "noise.img", "demo.pgm", "demo.png"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in text
    image = np.fromfile(out / "demo.bin", "<f4").reshape(512, 512)
    assert image.max() > 100 * np.median(image)  # Bragg spots over a weak background
    header, counts = read_smv(str(out / "noise.img"))
    assert counts.shape == (512, 512) and header["SIZE1"] == "512"
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
