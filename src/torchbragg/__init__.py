"""torchbragg: differentiable, GPU-ready nanoBragg."""

__version__ = "0.1.0"

__all__ = ["Simulator", "Crystal", "Beam", "Detector", "SimulationConfig", "parse_args", "__version__"]


def __getattr__(name):
    # torch is heavy: import it only when the API is used, not for `nanoBragg -h`
    if name == "Simulator":
        from .simulator import Simulator
        return Simulator
    if name in ("Crystal", "Beam", "Detector"):
        from . import models
        return getattr(models, name)
    if name == "SimulationConfig":
        from .config import SimulationConfig
        return SimulationConfig
    if name == "parse_args":
        from .flags import parse_args
        return parse_args
    raise AttributeError(name)
