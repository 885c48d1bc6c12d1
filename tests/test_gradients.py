"""Gradient checks of every continuous parameter of the simulator.

The checks live in the package (torchbragg.checks.gradients) so that
`torchbragg gradcheck` runs them from an installed package too; importing them
here makes `make test` collect them with the rest of the suite.
"""

from torchbragg.checks.gradients import *  # noqa: F401,F403
