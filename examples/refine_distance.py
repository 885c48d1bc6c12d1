"""Recover a detector distance from an image with a torch optimiser.

A target image is rendered at the true distance; the simulator then starts
from a wrong distance and L-BFGS minimises the mean squared difference
between its image and the target, following autograd gradients through the
whole simulation. Run from the source checkout:

    python examples/refine_distance.py
"""

import torch

from torchbragg import Simulator

# A 48x48 detector (0.1 mm pixels) with the direct beam at its corner, so it
# shows a few dozen spots from the 2nd to the 50th pixel out.
ARGS = ["-cell", "100", "110", "120", "85", "95", "100", "-misset", "3", "-5", "7",
        "-default_F", "100", "-N", "5", "-lambda", "1", "-detpixels", "48", "-pixel", "0.1",
        "-Xbeam", "0", "-Ybeam", "0", "-oversample", "2", "-dtype", "float64"]
TRUE_DISTANCE = 100.0  # mm
START_DISTANCE = 98.5  # mm


def refine(start: float = START_DISTANCE, true: float = TRUE_DISTANCE) -> float:
    sim = Simulator.from_args(ARGS + ["-distance", str(true)])
    with torch.no_grad():
        target = sim.render()
    scale = target.max()

    # Every continuous value is a frozen nn.Parameter: set it, then mark it trainable.
    distance = sim.get_parameter("detector.panels.0.frame.distance")
    with torch.no_grad():
        distance.fill_(start)
    distance.requires_grad_(True)
    opt = torch.optim.LBFGS([distance], lr=1.0, max_iter=40, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = ((sim.render() - target) / scale).pow(2).mean()
        loss.backward()
        return loss

    print(f"start distance: {start:.6f} mm  (loss {closure().item():.3e})")
    opt.step(closure)
    final = distance.item()
    print(f"final distance: {final:.6f} mm  (loss {closure().item():.3e})")
    print(f"true distance:  {true:.6f} mm")
    return final


if __name__ == "__main__":
    refine()
