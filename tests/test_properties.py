"""Property-based checks over random schedules, Gaussian targets and grids."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lazyinterp as li

F64 = torch.float64
# Derandomised: the same examples on every run, so a CI run cannot fail on a draw that no earlier run saw.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def gaussian_base_schedules(draw):
    """α = a0 (1 − t)^p or a0 cos(πt/2)^p, β = t^q or sin(πt/2)^q: increasing SNR, valid boundary values."""
    a0 = draw(st.floats(0.3, 3.0))
    p = draw(st.floats(0.5, 2.0))
    q = draw(st.floats(1.0, 2.0))
    trig = draw(st.booleans())
    h = math.pi / 2
    if trig:
        return li.Schedule(lambda t: a0 * torch.sin(h * (1 - t)) ** p, lambda t: torch.sin(h * t) ** q,
                           name=f"trig({a0:.2f},{p:.2f},{q:.2f})")
    return li.Schedule(lambda t: a0 * (1 - t) ** p, lambda t: t**q, name=f"poly({a0:.2f},{p:.2f},{q:.2f})")


@st.composite
def point_mass_schedules(draw):
    """β = t, α = σ t^a (1 − t)^b with a ∈ [0.5, 0.9]: a point mass with increasing SNR t^(1−a)/(σ(1 − t)^b)."""
    sigma = draw(st.floats(0.2, 3.0))
    a = draw(st.floats(0.5, 0.9))
    b = draw(st.floats(0.5, 1.5))
    return li.Schedule(lambda t: sigma * t**a * (1 - t) ** b, lambda t: t, name=f"pm({sigma:.2f},{a:.2f},{b:.2f})")


@st.composite
def gaussians(draw, dim=2):
    sigma = draw(st.floats(0.05, 5.0))
    mean = draw(st.floats(-3.0, 3.0))
    return li.GaussianMixture.gaussian(torch.full((dim,), mean, dtype=F64), torch.tensor(sigma**2, dtype=F64)), \
        sigma, mean


@st.composite
def grids(draw):
    inner = draw(st.lists(st.floats(0.001, 0.999), min_size=0, max_size=12, unique=True))
    return torch.tensor([0.0, *sorted(inner), 1.0], dtype=F64)


def x_batch(seed=0, n=8, dim=2):
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(target=st.one_of(gaussian_base_schedules(), point_mass_schedules()), data=gaussians(),
       t=st.floats(0.02, 0.98))
def test_conversion_invariants(target, data, t):
    g, _, _ = data
    source = li.linear()
    tau, c = (float(v) for v in li.time_change(source, target, t))
    # I'_t = c I_τ: both coefficients scale by the same c, and the SNRs match.
    assert abs(c * float(source.alpha(tau)) - float(target.alpha(t))) < 1e-10
    assert abs(c * float(source.beta(tau)) - float(target.beta(t))) < 1e-10
    converted = li.convert(g.model(source), target)
    x = x_batch()
    eta_z, eta_x = converted.eta(x, t)
    exact_z, exact_x = g.eta(x, float(target.alpha(t)), float(target.beta(t)))
    torch.testing.assert_close(eta_x, exact_x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(eta_z, exact_z, rtol=1e-8, atol=1e-8)


@SETTINGS
@given(sched=gaussian_base_schedules(), data=gaussians(), t=st.floats(0.02, 0.98))
def test_predictor_round_trips(sched, data, t):
    g, _, _ = data
    x = x_batch(1)
    coef = li.predictors.coefficients(sched, t)
    eta = g.eta(x, coef[0], coef[1])
    for kind in li.KINDS:
        out = li.from_eta(kind, *eta, *coef)
        back = li.to_eta(kind, out, x, *coef)
        torch.testing.assert_close(back[0], eta[0], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(back[1], eta[1], rtol=1e-8, atol=1e-8)


@SETTINGS
@given(sched=gaussian_base_schedules(), data=gaussians(), grid=grids(),
       solver=st.sampled_from(["euler", "heun"]), diffusion=st.sampled_from(["ode", "optimal", 0.5]),
       dtype=st.sampled_from([torch.float32, F64]))
def test_no_nan_on_random_schedules_and_grids(sched, data, grid, solver, diffusion, dtype):
    g, _, _ = data
    out = li.sample(g.model("linear"), x_batch(2).to(dtype), grid=grid, schedule=sched, solver=solver,
                    diffusion=diffusion, generator=0)
    assert out.dtype == dtype and torch.isfinite(out).all()


@SETTINGS
@given(sched=point_mass_schedules(), data=gaussians(), grid=grids(), dtype=st.sampled_from([torch.float32, F64]))
def test_no_nan_from_random_point_masses(sched, data, grid, dtype):
    g, _, _ = data
    out = li.sample(g.model("linear"), shape=(6, 2), grid=grid, schedule=sched, diffusion="optimal", generator=1,
                    dtype=dtype)
    assert torch.isfinite(out).all()


@SETTINGS
@given(data=gaussians(dim=3), grid=grids(), solver=st.sampled_from(["euler", "heun"]))
def test_lazy_vp_is_exact_on_random_gaussians_and_grids(data, grid, solver):
    g, sigma, mean = data
    z = x_batch(3, dim=3)
    out = li.sample(g.model("linear"), z, grid=grid, schedule=li.lazy_vp(), solver=solver)
    torch.testing.assert_close(out, sigma * z + mean, rtol=1e-9, atol=1e-9 * max(1.0, sigma))


@SETTINGS
@pytest.mark.filterwarnings("ignore::lazyinterp.LowestSNRWarning")  # scale 1e2 from t_min: exact, with the warning
@given(trained_under=gaussian_base_schedules(), kind=st.sampled_from(li.KINDS), data=gaussians(dim=3),
       scale=st.sampled_from([1e-2, 1.0, 1e2]))
def test_one_lazy_euler_step_is_exact_for_models_of_any_schedule_and_prediction_type(trained_under, kind, data,
                                                                                     scale):
    """σ and E[X] estimated from a network trained under a random schedule (β̇_0 = 0 for some, so a velocity is
    evaluated from t_min too), predicting any kind, on N(μ, σ²I) at scales 10⁻² to 10²."""
    g, sigma, mean = data
    g = li.GaussianMixture.gaussian(g.means[0] * scale, g.covs[0] * scale**2)
    z = x_batch(4, dim=3)
    out = li.sample(g.model(trained_under, kind), z, steps=1, schedule="lazy-vp", solver="euler")
    torch.testing.assert_close(out, scale * (sigma * z + mean), rtol=0, atol=1e-8 * scale * (sigma + abs(mean)))


@SETTINGS
@given(sigma=st.floats(1e-3, 1e3), steps=st.sampled_from([1, 1000]))
def test_extreme_sigma_and_step_counts_stay_finite(sigma, steps):
    g = li.GaussianMixture.gaussian(torch.zeros(2, dtype=F64), torch.tensor(sigma**2, dtype=F64))
    model = g.model("linear")
    z = x_batch(4, n=3)
    out = li.sample(model, z.float(), steps=steps, schedule=li.lazy_vp(sigma))
    torch.testing.assert_close(out.double(), sigma * z, rtol=1e-4, atol=1e-4 * sigma)
    pm = li.sample(model, shape=(3, 2), steps=steps, schedule=li.point_mass(sigma), diffusion="optimal",
                   generator=0)
    assert torch.isfinite(pm).all()


@st.composite
def anisotropic_gaussians(draw):
    """N(μ, Σ) in 1–4 dimensions: a random rotation, eigenvalues in [0.2, 10] (above the floor of 1e-2 × their
    mean), a mean in [−3, 3]."""
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=gen))
    values = torch.tensor(draw(st.lists(st.floats(0.2, 10.0), min_size=dim, max_size=dim)), dtype=F64)
    mean = torch.tensor(draw(st.lists(st.floats(-3.0, 3.0), min_size=dim, max_size=dim)), dtype=F64)
    cov = rotation @ torch.diag(values) @ rotation.T
    return li.GaussianMixture.gaussian(mean, cov), mean, rotation @ torch.diag(values.sqrt()) @ rotation.T


@SETTINGS
@given(data=anisotropic_gaussians(), grid=grids(), solver=st.sampled_from(["euler", "ab2", "ab2-pc", "heun"]))
def test_covariance_matched_lazy_vp_is_exact_on_random_gaussians_and_grids(data, grid, solver):
    """Matched to Σ, lazy VP maps Z to μ + Σ^{1/2} Z on any grid with any ODE solver."""
    target, mean, root = data
    z = torch.randn(6, mean.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    out = li.sample(target.model("linear"), z, schedule="lazy-vp", grid=grid, solver=solver,
                    covariance=target.cov)
    torch.testing.assert_close(out, mean + z @ root, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(data=gaussians(dim=3), grid=grids(), solver=st.sampled_from(["euler", "ab2"]), seed=st.integers(0, 2**40))
def test_point_mass_sde_on_a_brownian_path_ends_at_its_value_at_1(data, grid, solver, seed):
    """On N(μ, σ²I) the lazy point-mass SDE is X_t = tμ + σW_t: on a Brownian path (sde_noise="brownian") any grid,
    σ estimated from the model and E[X] centred, ends at μ + σ W(1)."""
    g, sigma, mean = data
    out = li.sample(g.model("linear"), shape=(4, 3), grid=grid, schedule="point-mass", diffusion="optimal",
                    solver=solver, last_step="euler", generator=seed, dtype=F64, sde_noise="brownian")
    w1 = li.BrownianPaths(seed, range(4), (3,), dtype=F64).values([1.0])[0]
    torch.testing.assert_close(out, mean + sigma * w1, rtol=1e-9, atol=1e-9 * max(1.0, sigma))
