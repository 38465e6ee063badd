"""lazyinterp: few-step sampling for pretrained flow and diffusion models.

A model trained under one interpolation schedule is converted exactly (a time change and a rescaling) to
another schedule and diffusion coefficient; the continuous-time samples are the same, only the discretisation
error changes. Lazy schedules make that error vanish for Gaussian data.
"""

from .brownian import BrownianPaths
from .conversion import (
    ConvertedModel,
    ConvertedPath,
    convert,
    convert_path,
    converted_diffusion,
    time_change,
    time_change_derivatives,
)
from .covariance import Covariance
from .estimates import LowestSNRWarning, estimate_mean, estimate_moments, estimate_sigma, reads_mean_directly
from .fitting import FittedEuler, fit_euler
from .grids import check_grid, make_grid, snr_matched_grid, uniform_grid
from .predictors import KINDS, CenteredModel, Model, NonFiniteError, from_eta, to_eta, ve_denoiser_model
from .samplers import SampleInfo, sample
from .schedules import (
    SCHEDULES,
    LazySchedule,
    Schedule,
    cosine,
    get_schedule,
    lazy_vp,
    linear,
    point_mass,
    vp,
)
from .solvers import (
    adams_bashforth2,
    alpha_matched_steps,
    count_nfe,
    euler,
    euler_maruyama,
    heun,
    steps_for_nfe,
    stochastic_heun,
)
from .targets import GaussianMixture

__version__ = "0.1.0"

__all__ = [
    "adams_bashforth2",
    "alpha_matched_steps",
    "BrownianPaths",
    "CenteredModel",
    "ConvertedModel",
    "ConvertedPath",
    "Covariance",
    "FittedEuler",
    "GaussianMixture",
    "KINDS",
    "LazySchedule",
    "LowestSNRWarning",
    "Model",
    "NonFiniteError",
    "SCHEDULES",
    "SampleInfo",
    "Schedule",
    "check_grid",
    "convert",
    "convert_path",
    "converted_diffusion",
    "cosine",
    "count_nfe",
    "steps_for_nfe",
    "estimate_mean",
    "estimate_moments",
    "estimate_sigma",
    "fit_euler",
    "euler",
    "euler_maruyama",
    "from_eta",
    "reads_mean_directly",
    "get_schedule",
    "heun",
    "lazy_vp",
    "linear",
    "make_grid",
    "point_mass",
    "sample",
    "snr_matched_grid",
    "stochastic_heun",
    "time_change",
    "time_change_derivatives",
    "to_eta",
    "uniform_grid",
    "ve_denoiser_model",
    "vp",
]
