"""The engine's still strategy (strategy="still"): a centroid stage, then
Levenberg-Marquardt steps, through the one refinement engine and its
honest result; and its choice on the refine command."""

import pytest

from recovery import assess, groups_for, trial_case
from torchbragg.commands.refine import parse
from torchbragg.errors import InputError
from torchbragg.refine import refine
from golden import DATA


def test_engine_still_strategy_recovers_a_still():
    truth, sim, data = trial_case("tetragonal", "medium", 3)
    result = refine(sim, data, groups_for("medium"), strategy="still")
    kinds = [s.get("kind") for s in result.stages]
    assert kinds == ["centroids", "steps"]
    assert result.converged and result.fit_acceptable
    sigma = {p.name: p.sigma for p in result.parameters}
    errors = assess(truth, sim, type("Fit", (), {"parameters": [dict(name=k, sigma=v) for k, v in sigma.items()]}))
    assert errors["ok"], errors
    assert result.renders < 200


def test_refine_command_strategy_option():
    opts = parse(["x.expt", "image.cbf", "--out", "o", "--strategy", "still"])
    assert opts["strategy"] == "still"
    with pytest.raises(InputError, match="unknown --strategy 'lbfgs'"):
        parse(["x.expt", "image.cbf", "--out", "o", "--strategy", "lbfgs"])


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
