"""Refinement of the models against measured images: parametrisations in
well-scaled internal units (parameters), likelihoods (losses), regions of
interest (roi), and the one engine (refiner): parameter groups bound to
entries (simulator, image, region, scan image), staged L-BFGS, uncertainties."""

from .losses import LOSSES, gaussian_nll, poisson_nll
from .parameters import (GROUPS, BeamCentre, Background, Cell, Distance, DomainSize, Group, Mosaic, Orientation,
                         Panels, Parametrisation, Scale, Spectrum, StructureFactorGroup, Wavelength, crystal_system,
                         make_group, reflections_in_view)
from .refiner import (Entry, ParameterResult, RefinementResult, Refiner, default_strategy, refine, refine_joint)
from .roi import roi_box, roi_mask

__all__ = ["LOSSES", "poisson_nll", "gaussian_nll", "GROUPS", "Group", "Orientation", "Cell", "DomainSize", "Scale",
           "Mosaic", "Background", "Distance", "BeamCentre", "Panels", "Wavelength", "Spectrum",
           "StructureFactorGroup", "reflections_in_view", "Parametrisation", "crystal_system",
           "make_group", "Entry", "Refiner", "RefinementResult", "ParameterResult", "refine", "refine_joint",
           "default_strategy", "roi_mask", "roi_box"]
