"""Refinement of the models against measured images: parametrisations in
well-scaled internal units (parameters), likelihoods (losses), regions of
interest (roi), the staged L-BFGS refiner with uncertainties (refiner), and
joint refinement of several images sharing a detector and beam (joint)."""

from .losses import LOSSES, gaussian_nll, poisson_nll
from .parameters import (GROUPS, BeamCentre, Background, Cell, Distance, Group, Mosaic, Orientation, Panels,
                         Parametrisation, Scale, Spectrum, SpotSize, StructureFactorGroup, Wavelength, crystal_system,
                         make_group, reflections_in_view)
from .refiner import ParameterResult, RefinementResult, Refiner, default_strategy, refine
from .joint import JointResult, refine_joint
from .roi import roi_box, roi_mask

__all__ = ["LOSSES", "poisson_nll", "gaussian_nll", "GROUPS", "Group", "Orientation", "Cell", "SpotSize", "Scale", "Mosaic",
           "Background", "Distance", "BeamCentre", "Panels", "Wavelength", "Spectrum",
           "StructureFactorGroup", "reflections_in_view", "Parametrisation", "crystal_system",
           "make_group", "Refiner", "RefinementResult", "ParameterResult", "refine", "default_strategy",
           "roi_mask", "roi_box", "refine_joint", "JointResult"]
