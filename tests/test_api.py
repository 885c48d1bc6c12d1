"""The Python API takes the same configuration the command line builds."""

import numpy as np
import torch

import golden
from torchbragg import SimulationConfig, Simulator, parse_args


def test_config_api_equals_command_line(tmp_path):
    argv = ["-cell", "70", "80", "90", "75", "85", "95", "-default_F", "100", "-N", "4", "-lambda", "1.2",
            "-distance", "100", "-detpixels", "64", "-misset", "10", "20", "30"]
    rc, _ = golden.run_cli(argv + ["-floatfile", "f.bin", "-nonoise", "-nopgm", "-dtype", "float32"], tmp_path)
    assert rc == 0
    cli_image = np.fromfile(tmp_path / "f.bin", "<f4").reshape(64, 64)

    cfg = SimulationConfig()
    cfg.crystal.cell = (70, 80, 90, 75, 85, 95)
    cfg.crystal.default_F = 100
    cfg.crystal.N = (4, 4, 4)
    cfg.crystal.misset = (10, 20, 30)
    cfg.beam.wavelength = 1.2
    cfg.detector.distance = 100
    cfg.detector.fpixels = cfg.detector.spixels = 64
    with torch.no_grad():
        image = Simulator.from_config(cfg).render()[0].numpy()
    np.testing.assert_array_equal(image, cli_image)
    assert parse_args(argv) == cfg


def test_building_does_not_change_the_config():
    cfg = parse_args(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
                      "-samplesize", "0.001", "-detpixels", "16"])
    before = repr(cfg)
    a = Simulator.from_config(cfg, dtype=torch.float64)
    b = Simulator.from_config(cfg, dtype=torch.float64)
    assert repr(cfg) == before
    assert a.crystal.N.tolist() == b.crystal.N.tolist() == [100.0, 100.0, 100.0]


def test_float64_on_request_and_parameters_listed():
    sim = Simulator.from_args(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
                               "-detpixels", "8"], dtype=torch.float64)
    assert sim.render().dtype == torch.float64
    names = {name for name, _ in sim.named_parameters()}
    for name in ("crystal.cell", "crystal.misset", "crystal.mosaic_spread", "crystal.N",
                 "detector.panels.0.frame.distance", "detector.panels.0.frame.beam_center", "beam.wavelength",
                 "beam.fluence", "scan.oscillation"):
        assert name in names
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in sim.parameters())


def test_misset_random_prints_and_uses_the_originals_draw(tmp_path):
    base = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5", "-lambda", "1.0", "-default_F", "100",
            "-distance", "100", "-detpixels", "96", "-nonoise", "-nopgm"]
    rc, text = golden.run_cli(base + ["-misset", "random", "-misset_seed", "12345", "-floatfile", "r.bin"], tmp_path)
    assert rc == 0
    # the angles the original prints for this seed
    assert "random orientation misset angles: 105.720755 -34.951318 -97.823571 deg" in text
    rc, _ = golden.run_cli(base + ["-misset", "105.720755", "-34.951318", "-97.823571", "-floatfile", "e.bin"],
                           tmp_path)
    random_image = np.fromfile(tmp_path / "r.bin", "<f4")
    explicit = np.fromfile(tmp_path / "e.bin", "<f4")
    assert golden.parity(random_image, explicit)["r"] > 0.9999


def test_sources_and_orientations_are_chunked_too():
    """A chunk budget smaller than one pixel's (source x orientation) grid gives
    the same image and gradient: memory stays bounded whatever the counts."""
    argv = ["-cell", "70", "80", "90", "75", "85", "95", "-default_F", "100", "-N", "5", "-mosaic", "0.5",
            "-mosaic_dom", "6", "-phi", "3", "-osc", "2", "-phisteps", "4", "-hdivrange", "0.5", "-vdivrange", "0.5",
            "-divsteps", "3", "-dispersion", "1", "-dispsteps", "2", "-detpixels", "10", "-pixel", "0.5",
            "-distance", "100", "-dtype", "float64", "-oversample", "2"]
    results = []
    for chunk in (None, 400):  # 400 grid points: less than one pixel's (sources x orientations)
        sim = Simulator.from_args(argv, chunk_elements=chunk)
        cell = sim.get_parameter("crystal.cell").requires_grad_(True)
        image = sim.render()
        image.pow(2).sum().backward()
        results.append((image.detach(), cell.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=0)
