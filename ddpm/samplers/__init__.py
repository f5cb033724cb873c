"""Sampling loops, one small object per sampler, all reading ONE descending list of timesteps.

- :mod:`~ddpm.samplers.base`: the step contract, :func:`run_loop`, the defaults tables.
- :mod:`~ddpm.samplers.timesteps`: where the model is called (``linspace``, ``leading``,
  ``trailing``, ``karras``).
- :mod:`~ddpm.samplers.ancestral`: ``ddpm`` (Ho et al. 2020, respaced), with Analytic-DPM's variance.
- :mod:`~ddpm.samplers.ddim`: ``ddim`` and its eta.
- :mod:`~ddpm.samplers.dpm_solver`: ``dpmpp`` (DPM-Solver++ 2M), ``dpmpp-3m``, ``dpmpp-2m-sde``.
- :mod:`~ddpm.samplers.unipc`: ``unipc`` (UniPC-3, bh2).
- :mod:`~ddpm.samplers.edm`: ``edm`` (Karras et al. 2022, Algorithm 2).
- :mod:`~ddpm.samplers.registry`: samplers by name, :func:`make_sampler`, :func:`generate`.

Step i calls the model once, at ``timesteps[i]`` (an original training timestep), so ``steps``
counts model calls for every sampler. Noise (x_T and every step's) comes from one
:class:`ddpm.noise.NoiseSource`, so per-sample ``seeds`` make sample i independent of its batch.
"""

from __future__ import annotations

from ddpm.samplers.ancestral import AnalyticDDPMSampler, DDPMSampler, estimate_ms_eps
from ddpm.samplers.base import DEFAULT_SPACING, DEFAULT_STEPS, Stepper, run_loop
from ddpm.samplers.ddim import DDIMSampler, check_eta
from ddpm.samplers.dpm_solver import DPMSolverPP3MSampler, DPMSolverPPSampler, SDEDPMSolverPPSampler
from ddpm.samplers.edm import EDMSampler
from ddpm.samplers.registry import (SAMPLERS, check_sampler, config_spacing, default_spacing, default_steps, generate,
                                    make_sampler)
from ddpm.samplers.timesteps import SPACINGS, space_timesteps
from ddpm.samplers.unipc import UniPCSampler

__all__ = ["AnalyticDDPMSampler", "DDIMSampler", "DDPMSampler", "DEFAULT_SPACING", "DEFAULT_STEPS",
           "DPMSolverPP3MSampler", "DPMSolverPPSampler", "EDMSampler", "SAMPLERS", "SDEDPMSolverPPSampler",
           "SPACINGS", "Stepper", "UniPCSampler", "check_eta", "check_sampler", "config_spacing", "default_spacing", "default_steps",
           "estimate_ms_eps", "generate", "make_sampler", "run_loop", "space_timesteps"]
