"""The experiment path for refinement leaves the direct beam out: F(0 0 0)
= 0 (nanoBragg's -default_F gives it an amplitude, so the undiffracted beam
is the brightest spot of a model, where a measured frame has the
beamstop's shadow)."""


import torch

from torchbragg.build.experiment import build_from_experiment, parse_experiment_flags
from torchbragg.io.dials import read_experiments
from torchbragg.models.crystal import StructureFactors
from torchbragg.refine.centroids import geometry
from golden import DATA

DATA = DATA / "lcys_02"


def test_without_direct_beam_keeps_every_other_amplitude():
    plain = StructureFactors(default_F=7.0, dtype=torch.float64).without_direct_beam()
    hkl = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 1.0], [5.0, 3.0, -4.0]], dtype=torch.float64)
    assert plain.amplitude_sq(hkl).tolist() == [0.0, 49.0, 49.0, 49.0]
    grid = torch.arange(1.0, 1.0 + 2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    table = StructureFactors(grid, (2, 0, 1), default_F=5.0, dtype=torch.float64)  # does not reach 0 0 0
    cut = table.without_direct_beam()
    probe = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [3.0, 2.0, 2.0], [1.0, 1.0, 1.0], [-4.0, 0.0, 0.0]],
                         dtype=torch.float64)
    assert cut.amplitude_sq(probe).tolist() == [0.0] + table.amplitude_sq(probe).tolist()[1:]


def test_refinement_experiment_has_no_direct_beam_spot():
    experiment = read_experiments(str(DATA / "23_integrated.expt"))[0]
    cfg = parse_experiment_flags("-default_F 1 -N 5 -oversample 1".split())
    images = []
    for direct in (True, False):
        sim = build_from_experiment(experiment, cfg, dtype=torch.float64, direct_beam=direct)[0]
        # the pixels around where the beam meets the detector
        _, inc, _, _, origin, fast, slow, normal, pixel = geometry(sim, {})
        t = float((origin[0] @ normal[0]) / (inc @ normal[0]))
        rel = t * inc - origin[0]
        f, s = int(float(rel @ fast[0]) / float(pixel[0, 0])), int(float(rel @ slow[0]) / float(pixel[0, 1]))
        mask = torch.zeros(sim.detector.panels[0].spixels, sim.detector.panels[0].fpixels, dtype=torch.bool)
        mask[s - 8:s + 9, f - 8:f + 9] = True
        sim.detector.panels[0].set_mask(mask & (sim.detector.panels[0].mask if sim.detector.panels[0].mask
                                                 is not None else True))
        with torch.no_grad():
            images.append(sim.render(1)[0][mask])
    with_beam, without = images
    assert float(with_beam.max()) > 100 * max(float(without.max()), 1e-30)
