"""Models of an experiment, named as DIALS/dxtbx name them. Each is a
`torch.nn.Module` holding resolved values: continuous ones are parameters
(frozen until marked trainable), fixed data are buffers."""

from .background import Background
from .beam import Beam
from .crystal import Crystal, StructureFactors
from .detector import Detector, DistanceMount, Frame, Panel, PanelGroup
from .goniometer import Goniometer, Scan
from .response import DetectorResponse

__all__ = ["Background", "Beam", "Crystal", "StructureFactors", "Detector", "Panel", "PanelGroup", "Frame",
           "DistanceMount", "Goniometer", "Scan", "DetectorResponse"]
