import math

import pytest
import torch
from conftest import make_mixture

import lazyinterp as li
from lazyinterp.fitting import MAX_BASIS_DIM, FittedEuler, _eta, _ScheduleCoefficients, _TimeOfLogSNR, fit_euler

F64 = torch.float64


def anisotropic_gaussian(dim: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=gen))
    cov = q @ torch.diag(torch.logspace(-1, 1, dim, dtype=F64)) @ q.T
    mean = torch.randn(dim, dtype=F64, generator=gen)
    return li.GaussianMixture.gaussian(mean, cov), mean, cov


def exact_gaussian_steps(schedule: li.Schedule, times: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    """Hand-built weights that follow the ODE of N(μ, Σ) exactly. Per principal direction (variance λ) the state at
    t is β_t μ + c_t z with c_t = √(β_t² λ + α_t²), and η_X − μ = β_t λ/c_t² (x − β_t μ); so from t_k to t_{k+1}
    the weight on η_X is u = c_{k+1} c_k/(β_k λ), none on η_Z, and the shift is β_{k+1} μ − Q(u ⊙ Qᵀ μ)."""
    lam, basis = torch.linalg.eigh(cov)
    nodes = torch.cat([times, torch.ones(1, dtype=F64)])
    alpha, beta = schedule.alpha(nodes), schedule.beta(nodes)
    c = (beta[:, None] ** 2 * lam + alpha[:, None] ** 2).sqrt()
    steps = times.numel() + 1
    u = torch.zeros(steps, lam.numel(), dtype=F64)
    v = torch.zeros_like(u)
    w = torch.zeros(steps, lam.numel(), dtype=F64)
    v[0], w[0] = c[0], beta[0] * mean
    for k in range(1, steps):
        u[k] = c[k] * c[k - 1] / (beta[k - 1] * lam)
        w[k] = beta[k] * mean - basis @ (u[k] * (basis.T @ mean))
    return FittedEuler(times, u, v, w, basis, (lam.numel(),))


@pytest.mark.parametrize("schedule", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("nodes", [[0.4], [0.2, 0.55, 0.9]])
@pytest.mark.parametrize("predicts", ["velocity", "noise", "data"])
def test_per_direction_steps_can_be_exact_on_an_anisotropic_gaussian(schedule, nodes, predicts):
    """The step family holds the exact ODE map of any Gaussian, Z ↦ μ + Σ^{1/2} Z, for every training schedule and
    prediction: the fitted sampler's coordinates contain the covariance-matched lazy ones."""
    target, mean, cov = anisotropic_gaussian()
    model = target.model(schedule, predicts)
    steps = exact_gaussian_steps(model.schedule, torch.tensor(nodes, dtype=F64), mean, cov)
    z = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    values, vectors = torch.linalg.eigh(cov)
    model.nfe = 0
    out = steps.sample(model, z)
    assert model.nfe == len(nodes) == steps.nfe
    torch.testing.assert_close(out, mean + z @ (vectors * values.sqrt()) @ vectors.T, rtol=0, atol=1e-10)


def test_fit_finds_the_exact_map_of_a_gaussian():
    """From DDIM's step, the fit moves to Z ↦ μ + Σ^{1/2} Z on noise it never saw."""
    target, mean, cov = anisotropic_gaussian()
    model = target.model("linear")
    fitted = fit_euler(model, 1, (3,), samples=512, iterations=600, batch_size=256)
    z = torch.randn(256, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    values, vectors = torch.linalg.eigh(cov)
    exact = mean + z @ (vectors * values.sqrt()) @ vectors.T
    error = float((fitted.sample(model, z) - exact).norm(dim=1).mean())
    report = fitted.report
    assert report["held_out_path_error"] < report["held_out_path_error_initial"] / 20
    assert error < 0.01 * math.sqrt(float(torch.trace(cov)))


def test_fitted_euler_beats_linear_euler_at_twice_the_evaluations_on_a_mixture():
    """On a non-Gaussian mixture, two fitted steps come closer to the model's converged ODE than DDIM's start
    and than four linear Euler steps, on fresh noise."""
    model = make_mixture().model("linear")
    fitted = fit_euler(model, 2, (2,), samples=2048, iterations=800)
    z = torch.randn(4000, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    reference = li.sample(model, z, steps=200, solver="heun")

    def path_error(x):
        return float((x - reference).norm(dim=1).mean())

    fitted_error = path_error(fitted.sample(model, z))
    assert fitted_error < 0.8 * path_error(li.sample(model, z, steps=4, schedule="linear"))
    assert fitted.report["held_out_path_error"] < 0.5 * fitted.report["held_out_path_error_initial"]
    assert torch.all(torch.diff(fitted.times) > 0) and 0 < float(fitted.times[0]) and float(fitted.times[-1]) < 1


@pytest.mark.parametrize("schedule", ["linear", "vp", "cosine"])
def test_time_of_log_snr_and_its_derivative(schedule):
    sched = li.get_schedule(schedule)
    log_snr = torch.tensor([-2.0, 0.3, 1.7], dtype=F64, requires_grad=True)
    t = _TimeOfLogSNR.apply(log_snr, sched)
    torch.testing.assert_close(torch.log(sched.snr(t.detach())), log_snr.detach(), rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(lambda s: _TimeOfLogSNR.apply(s, sched), (log_snr,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "vp", "cosine"])
def test_schedule_coefficients_carry_their_time_derivatives(schedule):
    sched = li.get_schedule(schedule)
    t = torch.tensor(0.37, dtype=F64, requires_grad=True)
    values = _ScheduleCoefficients.apply(t, sched)
    torch.testing.assert_close(values[:2], torch.stack([sched.alpha(0.37), sched.beta(0.37)]).reshape(2))
    (slope_alpha,) = torch.autograd.grad(values[0], t)
    torch.testing.assert_close(slope_alpha, sched.dalpha(0.37).reshape(()), rtol=1e-6, atol=1e-8)


def test_eta_is_differentiable_in_time_for_a_network_that_is_not():
    """The exact mixture model reads its time without a gradient; the fit still gets ∂η/∂t (finite difference of
    the network plus the schedule's own derivatives), matching a central difference of η itself."""
    model = make_mixture().model("linear")
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.6, dtype=F64, requires_grad=True)
    eta_z, eta_x = _eta(model, x, t)
    (grad,) = torch.autograd.grad((eta_x.sum() + 0.5 * eta_z.sum()), t)
    with torch.no_grad():
        h = 1e-5
        hi = model.eta(x, 0.6 + h)
        lo = model.eta(x, 0.6 - h)
        central = ((hi[1].sum() + 0.5 * hi[0].sum()) - (lo[1].sum() + 0.5 * lo[0].sum())) / (2 * h)
    torch.testing.assert_close(grad, central, rtol=5e-3, atol=1e-4)


def test_the_fit_never_returns_steps_worse_than_its_start_on_held_out_noise():
    """Even where Adam's steps are far too large, the steps kept are the best seen on the held-out paths."""
    model = make_mixture().model("linear")
    fitted = fit_euler(model, 6, (2,), samples=256, iterations=40, learning_rate=2.0, reference_nfe=64)
    assert fitted.report["held_out_path_error"] <= fitted.report["held_out_path_error_initial"]
    z = torch.randn(512, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(fitted.sample(model, z)).all()


def test_save_and_load_give_the_same_samples(tmp_path):
    model = make_mixture().model("linear")
    fitted = fit_euler(model, 2, (2,), samples=64, iterations=5, reference_nfe=16)
    path = tmp_path / "steps.safetensors"
    fitted.save(path)
    loaded = FittedEuler.load(path)
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.sample(model, z), fitted.sample(model, z), rtol=0, atol=0)
    assert loaded.report == fitted.report and loaded.sample_shape == (2,)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="path"):
        FittedEuler.load(tmp_path / "bad.safetensors")


def test_scalar_weights_when_asked():
    model = make_mixture().model("linear")
    fitted = fit_euler(model, 1, (2,), samples=64, iterations=3, reference_nfe=16, per_direction=False)
    assert fitted.basis is None and fitted.data_weights.shape == (2, 1)
    assert fitted.sample(model, torch.zeros(3, 2, dtype=F64)).shape == (3, 2)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"nfe": 0}, ValueError, "nfe"),
    ({"nfe": 1.5}, TypeError, "nfe"),
    ({"iterations": -1}, ValueError, "iterations"),
    ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ({"reference_nfe": 1}, ValueError, "reference_nfe"),
    ({"per_direction": "yes"}, TypeError, "per_direction"),
    ({"noise": torch.zeros(4, 3, dtype=F64)}, ValueError, "noise"),
    ({"noise": torch.full((4, 2), math.nan, dtype=F64)}, ValueError, "noise"),
    ({"noise": [[0.0, 0.0]]}, TypeError, "noise"),
    ({"sample_shape": None}, ValueError, "sample_shape"),
    ({"dtype": torch.int64}, TypeError, "dtype"),
])
def test_fit_names_the_bad_argument(kwargs, error, match):
    model = make_mixture().model("linear")
    args = {"nfe": 1, "sample_shape": (2,), "samples": 8, "iterations": 1, "reference_nfe": 4, **kwargs}
    with pytest.raises(error, match=match):
        fit_euler(model, **args)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(TypeError, match="model"):
        fit_euler(lambda x, t: x, 1, (2,))
    big = li.Model(lambda x, t: torch.zeros_like(x), "linear")
    with pytest.raises(ValueError, match="per_direction"):
        fit_euler(big, 1, (MAX_BASIS_DIM + 1,), per_direction=True)
    point = li.Model(lambda x, t: torch.zeros_like(x), li.point_mass(1.0), "data")
    with pytest.raises(ValueError, match="model"):
        fit_euler(point, 1, (2,))


def test_fitted_steps_check_their_parts_and_the_noise():
    model = make_mixture().model("linear")
    fitted = fit_euler(model, 1, (2,), samples=16, iterations=1, reference_nfe=4)
    with pytest.raises(ValueError, match="noise"):
        fitted.sample(model, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="times"):
        FittedEuler(torch.tensor([0.7, 0.2], dtype=F64), torch.ones(3, 1), torch.ones(3, 1), torch.zeros(3, 2), None,
                    (2,))
    with pytest.raises(ValueError, match="shifts"):
        FittedEuler(torch.tensor([0.5], dtype=F64), torch.ones(2, 1), torch.ones(2, 1), torch.zeros(2, 3), None, (2,))


@pytest.mark.parametrize("schedule", ["linear", "vp"])
def test_without_iterations_the_steps_are_ddim_on_the_snr_matched_grid(schedule):
    """The fit's start: nodes of the SNR-matched grid, and DDIM's step x' = α(t') η_Z + β(t') η_X from E[X]."""
    model = make_mixture().model(schedule)
    fitted = fit_euler(model, 3, (2,), samples=64, iterations=0, reference_nfe=16, dtype=F64)
    grid = li.snr_matched_grid(4, model.schedule)
    torch.testing.assert_close(fitted.times, grid[1:-1], rtol=0, atol=1e-12)
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    sched = model.schedule
    x = sched.alpha(grid[1]) * z + fitted.shifts[0]
    for k in range(1, 4):
        eta_z, eta_x = model.eta(x, float(grid[k]))
        x = sched.alpha(grid[k + 1]) * eta_z + sched.beta(grid[k + 1]) * eta_x
    torch.testing.assert_close(fitted.sample(model, z), x, rtol=0, atol=1e-12)
