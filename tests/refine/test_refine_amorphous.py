"""The amorphous background's scale as a refinement group: recovered from a
noisy still whose solvent scattering is the model's (API), and refused where
there is no background to scale (API and command)."""

import pytest
import torch

from torchbragg.commands.refine import main as refine_command
from torchbragg.dataset import photon_counts
from torchbragg.models import Background
from torchbragg.refine import refine
from torchbragg.simulator import Simulator

ARGS = ("-cell 60 70 80 90 90 90 -misset 10 20 30 -default_F 100 -N 12 -lambda 1 -distance 80 "
        "-detpixels 64 -pixel 0.2 -oversample 1 -fluence 1e26").split()
STOL = ([0.0, 0.1, 0.2, 0.3, 0.4, 0.6], [2.57, 2.5, 2.2, 1.8, 1.4, 0.9])  # a water-like table


def scene(scale):
    sim = Simulator.from_args(ARGS, dtype=torch.float64)
    sim.background = Background(*STOL, thickness=0.1, scale=scale, dtype=torch.float64)
    return sim


def test_amorphous_scale_is_recovered():
    truth = scene(1.0)
    with torch.no_grad():
        bragg = Simulator.from_args(ARGS, dtype=torch.float64).render()
        image = truth.render()
    solvent = float((image - bragg).mean())
    factor = 20.0 / solvent  # about 20 photons of solvent scattering per pixel
    truth.background.scale.data.fill_(factor)
    with torch.no_grad():
        data = photon_counts(truth.render().numpy(), 5, 1)
    start = scene(0.6 * factor)
    res = refine(start, data, ["amorphous"])
    p = next(q for q in res.parameters if q.group == "amorphous")
    assert p.value == pytest.approx(factor, rel=0.02) and p.start == pytest.approx(0.6 * factor)
    assert 0 < p.sigma and abs(p.value - factor) < 4 * p.sigma  # the error as the uncertainty says
    assert float(start.background.scale) == pytest.approx(p.value)  # written back to the model


def test_amorphous_group_needs_a_background():
    sim = Simulator.from_args(ARGS, dtype=torch.float64)
    with torch.no_grad():
        data = photon_counts(sim.render().numpy() + 2.0, 1, 1)
    with pytest.raises(ValueError, match="amorphous background"):
        refine(sim, data, ["amorphous"])


def test_refine_command_refuses_amorphous_without_background(tmp_path, capsys):
    rc = refine_command(["x.expt", "a.npy", "--out", str(tmp_path / "o"), "--refine", "amorphous"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--background FILE.stol" in err[0]
    assert not (tmp_path / "o").exists()


def test_refine_command_fits_the_solvent_of_a_simulated_frame(tmp_path, monkeypatch):
    """torchbragg simulate --background writes a frame with water scattering;
    torchbragg refine --background fits its scale from a sample 0.6x as thick."""
    import gzip
    import json

    from golden import DATA
    from torchbragg.commands.nanobragg import main as nanobragg
    from torchbragg.commands.tool import main as tool
    monkeypatch.chdir(tmp_path)
    (tmp_path / "water.stol").write_bytes(gzip.decompress((DATA / "golden_suite" / "nonBragg" / "stol" /
                                                           "water.stol.gz").read_bytes()))
    assert nanobragg(ARGS + ["-write_expt", "still.expt", "-floatfile", "f.bin"]) == 0
    physics = ["-N", "12", "-default_F", "100", "-fluence", "1e26", "--background", "water.stol", "-density", "4e-8"]
    assert tool(["simulate", "still.expt", "--out", "d/s", "--quiet", "--format", "smv", "-seed", "3",
                 "-sample_thick", "0.05", *physics]) == 0
    assert tool(["refine", "d/s.expt", "--out", "o", "--quiet", "--adc-offset", "40", "--refine", "amorphous",
                 "-sample_thick", "0.03", *physics]) == 0
    (p,) = json.loads((tmp_path / "o" / "refined.json").read_text())["parameters"]
    assert p["name"] == "amorphous_scale" and p["start"] == 1.0
    assert p["value"] == pytest.approx(0.05 / 0.03, rel=0.02) and abs(p["value"] - 0.05 / 0.03) < 4 * p["sigma"]


def test_psf_width_is_refined_through_the_engine():
    """With a detector response on the simulator the engine fits what the
    detector reads: the PSF width of a blurred noisy still comes back."""
    from torchbragg.models import DetectorResponse
    sim = Simulator.from_args(ARGS, dtype=torch.float64)
    sim.response = DetectorResponse(psf="gauss", psf_fwhm=0.3, dtype=torch.float64)
    with torch.no_grad():
        data = photon_counts(sim(detected=True).numpy() + 2.0, 7, 1)
    sim.response.psf_fwhm.data.fill_(0.2)
    res = refine(sim, data, ["psf_width", "background"])
    p = next(q for q in res.parameters if q.group == "psf_width")
    assert p.value == pytest.approx(0.3, rel=0.05) and abs(p.value - 0.3) < 4 * p.sigma


def test_psf_width_on_a_small_region_beside_a_spot():
    """A region next to a spot, not on it: much of its light is what the PSF
    spreads in from the spot outside. The engine renders the region grown by
    the kernel's radius before blurring, so the exact reading's width comes
    back (rendering the region alone, it came back 7 % wide)."""
    from torchbragg.models import DetectorResponse
    sim = Simulator.from_args(ARGS, dtype=torch.float64)
    sim.response = DetectorResponse(psf="gauss", psf_fwhm=0.6, dtype=torch.float64)
    with torch.no_grad():
        photons = sim.render()
        data = sim(detected=True) + 2.0
    s, f = divmod(int(torch.argmax(photons[0])), photons.shape[-1])
    roi = torch.zeros(data.shape, dtype=torch.bool)
    roi[0, s - 5:s + 6, f - 9:f - 1] = True  # beside the brightest spot, its centre and next pixel outside
    assert not bool(roi[0, s, f]) and float(photons[0, s, f]) > 10 * float(photons[roi].max())
    sim.response.psf_fwhm.data.fill_(0.4)
    res = refine(sim, data, ["psf_width", "background"], roi=roi)
    p = next(q for q in res.parameters if q.group == "psf_width")
    assert p.value == pytest.approx(0.6, rel=1e-2)  # within a fiftieth of its uncertainty; the region alone: 7 % wide
