"""The engine's still strategy (strategy="still", what "auto" picks for
stills): a centroid stage, then Levenberg-Marquardt steps, through the one
refinement engine and its honest result; and its choice on the refine
command."""

import pytest

from recovery import assess, groups_for, trial_case
from torchbragg.commands.refine import parse
from torchbragg.errors import InputError
from torchbragg.refine import refine
from torchbragg.refine.refiner import Entry, Refiner, choose_strategy
from torchbragg.simulator import Simulator
from golden import DATA


def test_engine_still_strategy_recovers_a_still():
    """The default strategy ("auto") of a still is the still strategy; its
    uncertainties come from the steps' Fisher information (no render more)."""
    truth, sim, data = trial_case("tetragonal", "medium", 3)
    result = refine(sim, data, groups_for("medium"))
    kinds = [s.get("kind") for s in result.stages]
    assert kinds == ["centroids", "steps"]
    assert result.converged and result.fit_acceptable
    assert result.hessian_renders == 0
    errors = assess(truth, sim, result)
    assert errors["ok"], errors
    assert result.renders < 150


def test_auto_strategy_chooses_by_the_entries():
    _, still, data = trial_case("tetragonal", "medium", 3)
    scan = Simulator.from_args("-cell 60 60 85 90 90 90 -default_F 100 -N 10 -detpixels 64 -phi 0 -osc 0.5".split())
    assert Entry(still, data).is_still and Entry(scan, None, still=True).is_still
    assert not Entry(scan, None).is_still
    assert choose_strategy([Entry(still, data)]) == "still"
    assert choose_strategy([Entry(still, data), Entry(scan, None)]) == "lbfgs"
    assert choose_strategy([Entry(still, data)], "gaussian") == "lbfgs"
    r = Refiner([Entry(still, data)], ["scale", "orientation"])
    assert [s.get("kind") for s in r.stages] == ["centroids", "steps"]
    r = Refiner([Entry(still, data)], ["scale", "orientation"], strategy="lbfgs")
    assert all(s.get("kind") is None for s in r.stages) and len(r.stages) > 1
    with pytest.raises(InputError, match="unknown strategy 'default'"):
        Refiner([Entry(still, data)], ["scale"], strategy="default")


def test_refine_command_strategy_option():
    assert parse(["x.expt", "image.cbf", "--out", "o"])["strategy"] == "auto"
    for name in ("still", "lbfgs", "auto"):
        assert parse(["x.expt", "image.cbf", "--out", "o", "--strategy", name])["strategy"] == name
    with pytest.raises(InputError, match="unknown --strategy 'default'; choose auto, lbfgs, still"):
        parse(["x.expt", "image.cbf", "--out", "o", "--strategy", "default"])


def test_refine_command_per_image_option():
    opts = parse(["x.expt", "a.cbf", "b.cbf", "--out", "o", "--refine", "scale,orientation", "--per-image", "scale"])
    assert opts["per_image"] == ["scale"]
    with pytest.raises(InputError, match="--per-image cell: not among the refined groups"):
        parse(["x.expt", "a.cbf", "--out", "o", "--refine", "scale,orientation", "--per-image", "cell"])


def test_refine_command_notes_the_profile_flags():

    from torchbragg.commands.refine import profile_notes
    from torchbragg.io.dials import read_experiments
    experiments = read_experiments(str(DATA / "lcys_02" / "23_integrated.expt"))
    (note,) = profile_notes(experiments, {0}, ["-N", "30"])
    assert "-mosaic 0.0569572" in note and "-phisteps 4" in note and "-divergence" in note
    assert profile_notes(experiments, {0}, ["-mosaic", "0.1"]) == []


def test_engine_start_outside_the_basin_is_not_converged():
    """1.5 degrees off and without the centroid stage, the pixels' steps
    end in a wrong minimum: the engine reports it not converged, with the
    deviance (over the pixels its model picks) far above photon noise."""
    from torchbragg.refine.parameters import Parametrisation
    from torchbragg.refine.refiner import assign
    import torch
    truth, sim, data = trial_case("tetragonal", "bright", 0)
    axis = torch.tensor([0.6, -0.3, 0.74], dtype=torch.float64)
    assign(sim, Parametrisation(["orientation"], sim).substitutions(sim, axis / axis.norm() * 150.0))
    groups = groups_for("bright")
    result = refine(sim, data, groups, strategy=[dict(kind="steps", groups=groups, max_iter=8)], write=False)
    assert not result.converged and not result.fit_acceptable
    assert result.fit["deviance_z"] > 100
    assert any(w.startswith("likely a wrong minimum") for w in result.warnings)
    assert result.stages[-1]["restarts"] == 0
    # with restarts from the six neighbours of the start: tried, kept only if better, still honest
    again = refine(sim, data, groups, strategy=[dict(kind="steps", groups=groups, max_iter=4, restarts=True)],
                   write=False)
    assert again.stages[-1]["restarts"] == 6 and again.renders > 6 * 13
    assert not again.converged and again.fit["deviance_z"] > 100
