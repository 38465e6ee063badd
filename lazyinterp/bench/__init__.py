r"""``lazyinterp bench``: samplers compared at equal, exactly counted network evaluations (NFE).

Every sampler of a run starts from the same per-sample noise Z_i (stream (seed, i), see
:mod:`lazyinterp.noise`), and stochastic samplers draw their Brownian increments from a second family of
streams, so the only difference between two results is the sampler.

**Workloads.**

* ``mnist``: a velocity UNet trained under the linear schedule (``--model``, default the bundled one). The
  value is FID-MNIST (:func:`lazyinterp.metrics.evaluate`) on ``n`` samples; the classifier's mean confidence
  and class entropy come with it. FID depends on ``n``: compare only runs with the same ``n``.
* ``gmm-2d``: the mixture X ~ Σ_k w_k N(m_k, C_k) in R² with 8 components whose means lie on a circle of
  radius 2.5 around (1, −0.5), m_k = (1, −0.5) + 2.5 (cos θ_k, sin θ_k), θ_k = 2πk/8, and whose covariances
  C_k = R_k diag(0.35², 0.08²) R_kᵀ are elongated along the circle (R_k the rotation by θ_k + π/2); weights
  w_k ∝ 1 + 0.6 sin(1.7 k + 0.3).
* ``gmm-64d``: 10 components in R⁶⁴ drawn once from a fixed seed (``torch.Generator().manual_seed(64)``):
  m_k = 0.5 + 0.5 ξ_k with ξ_k ~ N(0, I), C_k = Q_k diag(10^{−2 u}) Q_kᵀ with Q_k the Q factor of a standard
  Gaussian matrix and u ~ U(0, 1)⁶⁴ (eigenvalues spread over two decades), weights w_k = 0.5 + U(0, 1).
* ``--mode-scale S`` multiplies every component covariance of either mixture by S, means and weights kept: S > 1
  moves it towards one Gaussian, S < 1 towards point masses.

Both mixtures have closed-form predictors, so the model (:meth:`GaussianMixture.model`, the exact
linear-schedule velocity v(t, x) = E[X − Z | (1 − t) Z + t X = x]) has no training error and every
difference is discretisation error. Their metrics:

* ``value``, the sliced Wasserstein-2 distance to the target,
  SW₂(P, Q)² = E_θ W₂²(θ♯P, θ♯Q) for θ uniform on the unit sphere, estimated with L = 128 fixed directions
  (the same for every sampler) against M = k·n fresh target samples. On the line, the optimal coupling between
  n equal atoms x_(1) ≤ … ≤ x_(n) and M equal atoms y_(1) ≤ … ≤ y_(M) is monotone, so
  W₂² = (1/M) Σ_j (x_(⌈j/k⌉) − y_(j))² exactly. The "noise floor" reported with the reference is the mean
  (and spread) of SW₂ over 5 sets of n fresh target samples: below it a sampler cannot be told apart from the
  target. Because every sampler starts from the same noise, differences between samplers are less noisy than
  the floor's spread.
* ``path_error`` (every workload), the mean per-sample distance (1/n) Σ_i ‖x_i − x_i^ref‖₂ to the reference
  ODE solution from the same noise: linear-schedule Heun at ``--reference-nfe`` NFE, converged for the exact
  mixture model. All ODE samplers share the probability-flow map Z ↦ X (the conversion is exact), so this
  measures discretisation error pathwise. It is left out (null) for stochastic samplers, whose samples are not
  a function of Z.
* ``sde_path_error`` (the mixtures, by default), its analogue for the samplers of the point-mass SDE with ε*:
  each is run a second time with ``sde_noise="brownian"`` (one Brownian path per sample, the same whatever the
  grid, :mod:`lazyinterp.brownian`) and compared, sample by sample, with the same SDE solved by Euler–Maruyama
  on the same paths, over the SNR-matched grid of ``SDE_REFERENCE_STEPS`` steps with its times rounded to the
  paths' dyadic nodes (:func:`sde_reference_grid`). It measures the strong (pathwise) error of the SDE solvers;
  ``value`` stays the run with independent noise.

**Counting NFE.** Euler, AB2, AB2-PC and Euler–Maruyama use N evaluations for N steps. Heun uses 2N, or 2N − 1 when
its last interval is the denoising step x_1 = η_X(t_{N−1}, x). The lazy schedules centre the data, which makes the
drift at t = 0 known without the network (``li.sample``'s ``known_start``): their N steps cost one evaluation fewer,
so a target K is reached with N = K + 1 steps (Heun: 2N − 1 or 2N − 2 = K). A linear Heun at K = 1 would be a bare
denoising step and is skipped. diffusers' FlowMatchHeun uses 2N − 1 evaluations (Euler on its last interval), DPM-
Solver++ and UniPC N, and flow_matching's midpoint rule 2 per step. Every run is checked against the model's own
evaluation counter (minus the one-off evaluations that estimate E[X] and σ for the lazy schedules, reported as
``estimation_nfe``); a (sampler, K) pair that cannot reach K exactly is listed in ``skipped``.

**Summary** (:func:`~lazyinterp.bench.report.summary`, the JSON's ``summary`` and the Markdown under the value
table): at each NFE the lowest value of ours against the lowest of the peers and baselines; and at each N the best
deterministic Euler-type row in lazy coordinates (lazy VP, or fitted; :attr:`SamplerDef.euler_schedule`) at N NFE
against linear Euler at 2N, values and path errors.

**Fitted Euler** (``lazy-fitted-euler``) is :func:`lazyinterp.fit_euler` at each NFE, fitted once per model before
its run on 4096 noise draws of the benchmark's seed at sample indices from 2⁴⁰ on (:data:`runs.FIT_NOISE_OFFSET`),
which no scored sample uses; the fit's evaluations and time are not charged to the run and are reported in its
entry's ``fit`` (held-out path errors before and after, evaluations, seconds).

**Peers** are driven through their own packages (the ``bench`` extra: ``diffusers``, ``flow_matching``).
diffusers writes x_σ = (1 − σ) x_data + σ ε with the model predicting ε − x_data = −v(1 − σ, x), and its
``timesteps`` are 1000 σ; the model is evaluated at σ = timestep/1000, as diffusers pipelines do (DPM-Solver++
and UniPC truncate their timesteps to integers). flow_matching's ``ScheduleTransformedModel`` moves the linear
model (``CondOTScheduler``) to its ``CosineScheduler``, solved by its ``ODESolver`` with the midpoint rule.

**Modules.** :mod:`~lazyinterp.bench.workloads` (the models and their scores), :mod:`~lazyinterp.bench.samplers`
(what is compared, and the step count that costs each NFE), :mod:`~lazyinterp.bench.peers` (diffusers and
flow_matching, driven through their own packages), :mod:`~lazyinterp.bench.runs` (one sampler over all samples,
shared among ranks), :mod:`~lazyinterp.bench.benchmark` (:func:`run_bench`), :mod:`~lazyinterp.bench.cache`
(resuming an interrupted run), :mod:`~lazyinterp.bench.overhead` (the sampler's time beyond the network),
:mod:`~lazyinterp.bench.report` (Markdown, plot, JSON) and :mod:`~lazyinterp.bench.command` (``lazyinterp bench``).
"""

from ..metrics import SLICED_DIRECTIONS, TARGET_POINTS, SlicedW2
from .benchmark import DEFAULT_NFE, check_run_arguments, parse_nfe, run_bench
from .cache import RunCache, code_identity, default_work_dir
from .command import bench
from .overhead import OVERHEAD_SAMPLERS, OVERHEAD_SDE_NOISES, measure_overhead
from .peers import PEER_PACKAGES, diffusers_sample, flow_matching_sample, linear_velocity
from .report import markdown_report, plot_results, summary, write_json, write_text
from .runs import RunFailed, run_batch, run_sampler
from .samplers import (
    FAMILIES,
    MAX_REFERENCE_NFE,
    REFERENCE,
    SAMPLER_NAMES,
    SAMPLERS,
    SDE_REFERENCE,
    SDE_REFERENCE_STEPS,
    SamplerDef,
    sde_reference_grid,
    select_samplers,
    solves_reference_sde,
)
from .workloads import (
    DEFAULT_BATCH,
    DEFAULT_N,
    WORKLOADS,
    Workload,
    check_mode_scale,
    gmm_2d,
    gmm_64d,
    make_workload,
    scale_modes,
)

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_N", "DEFAULT_NFE", "FAMILIES", "MAX_REFERENCE_NFE", "OVERHEAD_SAMPLERS",
    "OVERHEAD_SDE_NOISES", "PEER_PACKAGES", "REFERENCE", "SAMPLERS", "SAMPLER_NAMES", "SDE_REFERENCE",
    "SDE_REFERENCE_STEPS", "SLICED_DIRECTIONS", "TARGET_POINTS", "WORKLOADS", "RunCache", "RunFailed", "SamplerDef",
    "SlicedW2", "Workload", "bench", "check_mode_scale", "check_run_arguments", "code_identity", "default_work_dir",
    "diffusers_sample", "flow_matching_sample", "gmm_2d", "gmm_64d", "linear_velocity", "make_workload",
    "markdown_report", "measure_overhead", "parse_nfe", "plot_results", "run_batch", "run_bench", "run_sampler",
    "scale_modes", "sde_reference_grid", "select_samplers", "solves_reference_sde", "summary", "write_json",
    "write_text",
]
