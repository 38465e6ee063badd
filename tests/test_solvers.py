"""The solvers as pure functions, their orders and NFE counts, against closed forms."""

import math

import pytest
import torch
from conftest import all_schedules, gaussian, make_mixture

import lazyinterp as li
from lazyinterp.noise import NoiseStreams
from lazyinterp.solvers import (
    _StateCheck,
    ab2_weights,
    am3_weights,
    exponential_coefficients,
    exponential_slope_weight,
    log_snr,
)

F64 = torch.float64


def test_alpha_matched_steps_are_euler_in_the_time_variable_alpha():
    """On lazy VP (α = σ cos θ, θ = πt/2) the step from θ_0 > 0 is (cos θ_0 − cos θ_1)/(sin θ_0 · π/2): the noise
    coefficient lands on α(t_1); at θ_0 = 0, where α̇ = 0, the step keeps its length. On the linear schedule it is
    the plain step."""
    grid = torch.tensor([0.0, 0.1, 0.35, 0.8, 1.0], dtype=F64)
    theta = grid * math.pi / 2
    expected = [0.1] + [float((torch.cos(theta[k]) - torch.cos(theta[k + 1])) / (torch.sin(theta[k]) * math.pi / 2))
                        for k in range(1, 4)]
    assert li.alpha_matched_steps(li.lazy_vp(0.6), grid) == pytest.approx(expected, rel=1e-12)
    assert li.alpha_matched_steps(li.linear(), grid) == pytest.approx(torch.diff(grid).tolist(), rel=1e-12)


def test_nfe_counts_are_exact():
    for solver, last_step, steps, expected in [("euler", "euler", 5, 5), ("heun", "euler", 5, 10),
                                               ("heun", "denoise", 5, 9), ("euler", "denoise", 3, 3),
                                               ("ab2-pc", "euler", 5, 5), ("ab2-pc", "denoise", 4, 4)]:
        model = gaussian(1.0).model("linear")
        _, info = li.sample(model, torch.randn(4, 3), steps=steps, solver=solver, last_step=last_step,
                            return_info=True)
        assert model.nfe == expected == info.nfe == li.count_nfe(solver, steps, last_step)
    for known_start, expected in [(False, 7), (True, 6)]:
        # Centred data make the drift at t = 0 known (a point-mass start is centred by default): one call fewer.
        model = gaussian(1.0).model("linear")
        _, info = li.sample(model, shape=(4, 3), steps=4, schedule=li.point_mass(), diffusion="optimal",
                            solver="heun", return_info=True, generator=0, known_start=known_start)
        assert info.nfe == expected == li.count_nfe("heun", 4, "denoise", known_start)
        assert model.nfe == expected + info.estimation_nfe and info.estimation_nfe == 3  # E[X], σ, σ's check


def test_multistep_weights_fall_back_to_one_step_rules_after_a_tiny_step():
    """After a step more than MAX_STEP_RATIO times shorter, AB2 is Euler and AM3 the trapezoid: the drifts' difference
    is rounding there. Regression: on the grid (0, a, next float after a, 1) covariance-matched AB2 on N(0, 1) was
    off by 2.0 (rounding of order 1e-16 times ρ ≈ 5e18), and is exact now."""
    assert li.solvers.ab2_weights(1.0, 1e-7) == (1.0, 0.0)
    assert li.solvers.am3_weights(1.0, 1e-7) == (0.5, 0.5, 0.0)
    h, h_prev = 0.3, 0.1
    assert li.solvers.ab2_weights(h, h_prev) == pytest.approx((h * 2.5, -h * 1.5))
    target = li.GaussianMixture.gaussian(torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64))
    z = torch.randn(6, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = 0.001
    grid = torch.tensor([0.0, a, math.nextafter(a, 1.0), 1.0], dtype=F64)
    for solver in ("ab2", "ab2-pc"):
        out = li.sample(target.model("linear"), z, schedule="lazy-vp", grid=grid, solver=solver,
                        covariance=torch.eye(1, dtype=F64))
        torch.testing.assert_close(out, z, rtol=1e-12, atol=1e-12)


def test_exponential_2m_falls_back_to_the_frozen_step_after_a_tiny_step():
    """A node one float after the one before gives a log-SNR slope of rounding over rounding: 2M then takes the
    frozen η_X, and the run equals the exponential step on the grid without that node."""
    model = make_mixture().model("linear")
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    a = 0.3
    kwargs = dict(schedule=li.cosine(), dtype=F64, center=False)
    with_twin = li.sample(model, z, grid=torch.tensor([0.0, a, math.nextafter(a, 1.0), 0.6, 1.0], dtype=F64),
                          solver="exponential-2m", **kwargs)
    without = li.sample(model, z, grid=torch.tensor([0.0, a, 0.6, 1.0], dtype=F64), solver="exponential", **kwargs)
    torch.testing.assert_close(with_twin, without, rtol=1e-9, atol=1e-9)


def test_adams_bashforth2_is_second_order_and_lazy_exact():
    mixture = make_mixture()
    model = mixture.model("linear")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    reference = li.sample(model, z, steps=2000, solver="heun")
    errors = [float((li.sample(model, z, steps=n, solver="ab2") - reference).norm(dim=1).mean()) for n in (40, 80, 160)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.0 < coarse / fine < 5.0, errors  # second order: halving h quarters the error
    g = gaussian(0.7, mean=0.4)
    out = li.sample(g.model("linear"), z[:, :1].expand(64, 3).contiguous(), steps=3, schedule=li.lazy_vp(),
                    solver="ab2")
    torch.testing.assert_close(out, 0.7 * z[:, :1].expand(64, 3) + 0.4, rtol=1e-12, atol=1e-12)
    assert li.count_nfe("ab2", 5) == 5


def test_predictor_corrector_is_third_order_and_lazy_exact():
    mixture = make_mixture()
    model = mixture.model("linear")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    reference = li.sample(model, z, steps=1000, solver="heun")  # another solver's limit, error ~5e-7
    for schedule, grid in ((li.linear(), "uniform"), (li.lazy_vp(0.8), "model")):
        errors = [float((li.sample(model, z, steps=n, schedule=schedule, grid=grid, solver="ab2-pc")
                         - reference).norm(dim=1).mean()) for n in (20, 40, 80)]
        for coarse, fine in zip(errors, errors[1:], strict=False):
            assert 6.0 < coarse / fine < 10.0, (schedule, errors)  # third order: halving h divides by 8
        assert errors[-1] < 3e-5, errors
    ab2 = li.sample(model, z, steps=80, schedule=li.lazy_vp(0.8), solver="ab2")
    assert errors[-1] < 0.2 * float((ab2 - reference).norm(dim=1).mean())
    g = gaussian(0.7, mean=0.4)
    out = li.sample(g.model("linear"), z[:, :1].expand(64, 3).contiguous(), steps=3, schedule=li.lazy_vp(),
                    solver="ab2-pc")
    torch.testing.assert_close(out, 0.7 * z[:, :1].expand(64, 3) + 0.4, rtol=1e-12, atol=1e-12)
    assert li.count_nfe("ab2-pc", 5) == li.count_nfe("ab2-pc", 5, "denoise") == 5
    with pytest.raises(ValueError, match="solver: ab2-pc is an ODE solver"):
        li.sample(model, z, steps=2, solver="ab2-pc", diffusion="optimal")


def test_predictor_corrector_weights_integrate_polynomials_exactly():
    """With a drift f(t) that ignores x, every evaluation is exact, so each interval is a quadrature rule: AB2
    (last interval) and the trapezoid (first) are exact for linear f, the AM3 corrector for quadratic f."""
    grid = torch.tensor([0.0, 0.1, 0.35, 0.45, 0.8, 1.0], dtype=F64)
    x0 = torch.zeros(1, dtype=F64)
    linear = li.solvers.adams_predictor_corrector(lambda x, t: torch.full_like(x, 2 - 3 * t), x0, grid)
    torch.testing.assert_close(linear, torch.tensor([2 - 1.5], dtype=F64), rtol=0, atol=1e-14)

    def antiderivative(t):
        return 1.5 * t - t**2 + 2 * t**3

    seen = []
    li.solvers.adams_predictor_corrector(lambda x, t: torch.full_like(x, 1.5 - 2 * t + 6 * t * t), x0, grid,
                                          callback=lambda k, t, x: seen.append((k, t, float(x))))
    assert [(k, t) for k, t, _ in seen] == list(enumerate(grid[1:].tolist()))
    states = [0.0] + [x for _, _, x in seen]
    for k in range(1, len(grid) - 2):  # the corrected intervals after the first
        exact = antiderivative(float(grid[k + 1])) - antiderivative(float(grid[k]))
        assert states[k + 1] - states[k] == pytest.approx(exact, abs=1e-14)
    first = antiderivative(float(grid[1]))
    assert abs(states[1] - first) > 1e-4  # the trapezoid alone is not exact for a quadratic


def test_deferred_state_check_names_the_first_bad_step():
    """On an accelerator the per-step finiteness flags are read once, at the end; the report is the same."""

    good, bad = torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0])
    check = _StateCheck(good)
    check.deferred = True  # as on a GPU; CPU tensors keep the arithmetic the same
    for step, (x, t) in enumerate([(good, 0.25), (bad, 0.5), (bad, 0.75)]):
        check(x, step, t)  # nothing is read yet
    with pytest.raises(li.NonFiniteError, match=r"step 2 \(t=0.5\)") as info:
        check.finish()
    assert info.value.step == 1 and info.value.t == 0.5
    clean = _StateCheck(good)
    clean.deferred = True
    clean(good, 0, 0.5)
    clean.finish()


def test_steps_for_nfe_inverts_count_nfe():
    for solver in ("euler", "ab2", "ab2-pc", "heun"):
        for last_step in ("euler", "denoise"):
            for known_start in (False, True):
                for nfe in range(1, 12):
                    steps = li.steps_for_nfe(solver, nfe, last_step, known_start)
                    if steps is None:
                        assert all(li.count_nfe(solver, s, last_step, known_start) != nfe for s in range(1, 20))
                    else:
                        assert li.count_nfe(solver, steps, last_step, known_start) == nfe
    assert li.steps_for_nfe("heun", 4, "euler") == 2 and li.steps_for_nfe("heun", 3, "euler") is None
    assert li.steps_for_nfe("ab2", 4, known_start=True) == 5
    assert li.steps_for_nfe("euler", 0, known_start=True) == 1 and li.steps_for_nfe("euler", 0) is None
    for nfe, error in ((-1, ValueError), (2.0, TypeError), ("4", TypeError), (True, TypeError)):
        with pytest.raises(error, match="nfe: expected an integer >= 0"):
            li.steps_for_nfe("euler", nfe)


def test_multistep_weights_integrate_polynomials_exactly():
    """AB2's weights integrate a linear f over [t, t + h] from f(t) and f(t − h_prev); AM3's a quadratic from
    f(t + h), f(t) and f(t − h_prev); the trapezoid a linear f from its two ends."""

    def f(t):
        return 0.7 - 1.3 * t + 2.1 * t * t

    def integral(a, b):
        return (0.7 * b - 0.65 * b * b + 0.7 * b**3) - (0.7 * a - 0.65 * a * a + 0.7 * a**3)

    for t, h, h_prev in [(0.3, 0.1, 0.2), (0.5, 0.25, 0.05), (0.1, 0.4, 0.1)]:
        w0, w1 = ab2_weights(h, h_prev)
        slope = -1.3
        assert w0 * (slope * t) + w1 * (slope * (t - h_prev)) == pytest.approx(slope * (h * t + h * h / 2), abs=1e-14)
        a, b, c = am3_weights(h, h_prev)
        assert a * f(t + h) + b * f(t) + c * f(t - h_prev) == pytest.approx(integral(t, t + h), abs=1e-14)
        p, q = am3_weights(h, None)
        assert p * (slope * (t + h)) + q * (slope * t) == pytest.approx(slope * (h * t + h * h / 2), abs=1e-14)
        assert w0 + w1 == pytest.approx(h) and a + b + c == pytest.approx(h)  # constants integrate exactly


# The exponential step -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: s.name)
def test_exponential_step_solves_the_sde_with_eta_x_frozen(schedule, kappa):
    """With η_X held at x̂ the SDE of theory §2, b^ε = (α̇/α − ε/α²) x + (β̇ − α̇β/α + εβ/α²) x̂ with ε = κ α² λ̇,
    is linear: its mean m and variance V solve ṁ = p m + q x̂ and V̇ = 2 p V + 2ε. Integrated numerically, they
    match the closed form x_s = keep x_t + lift x̂ + spread ξ."""
    from scipy.integrate import solve_ivp


    def rates(u):
        a, b = float(schedule.alpha(u)), float(schedule.beta(u))
        da, db = float(schedule.dalpha(u)), float(schedule.dbeta(u))
        eps = kappa * a * a * (db / b - da / a)
        return da / a - eps / (a * a), db - da * b / a + eps * b / (a * a), eps

    def moments(u, state):
        p, q, eps = rates(u)
        m, v = state
        return [p * m + q * x_hat, 2 * p * v + 2 * eps]

    x_t, x_hat = 0.7, -1.3
    for t, s in [(0.05, 0.3), (0.3, 0.31), (0.4, 0.9), (0.8, 0.97)]:
        sol = solve_ivp(moments, (t, s), [x_t, 0.0], method="DOP853", rtol=1e-12, atol=1e-14)
        mean, var = sol.y[:, -1]
        keep, lift, spread = exponential_coefficients(schedule, t, s, kappa)
        assert keep * x_t + lift * x_hat == pytest.approx(mean, rel=1e-8, abs=1e-10)
        assert spread**2 == pytest.approx(var, rel=1e-8, abs=1e-12)
        if kappa == 0:
            assert spread == 0.0


def test_exponential_step_over_a_single_ulp_is_finite():
    """Times one float apart can round to a log-SNR that falls over the step; the step is then the identity in law
    (keep 1, spread 0), not a square root of a negative number."""

    schedule = li.Schedule(lambda t: t**0.5 * (1 - t), lambda t: t, name="point-mass-like")
    t, s = 0.001, math.nextafter(0.001, 1.0)
    keep, lift, spread = exponential_coefficients(schedule, t, s, 1.0)
    assert keep == pytest.approx(1.0, abs=1e-12) and abs(lift) < 1e-12 and 0.0 <= spread < 1e-6
    model = gaussian(1.0).model("linear")
    out = li.sample(model, shape=(6, 3), grid=torch.tensor([0.0, t, s, 1.0], dtype=F64), schedule=schedule,
                    diffusion="optimal", solver="exponential", generator=1, dtype=F64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kappa", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: s.name)
def test_exponential_slope_weight_integrates_eta_x_linear_in_log_snr(schedule, kappa):
    """With η_X(u) = x̂ + (λ_u − λ_t) D over the step (λ = log r) the mean of the linear SDE, integrated numerically,
    is keep x_t + lift x̂ + w D."""
    from scipy.integrate import solve_ivp


    def mean_rate(u, state, t):
        a, b = float(schedule.alpha(u)), float(schedule.beta(u))
        da, db = float(schedule.dalpha(u)), float(schedule.dbeta(u))
        eps = kappa * a * a * (db / b - da / a)
        eta = x_hat + (log_snr(schedule, u) - log_snr(schedule, t)) * slope
        return [(da / a - eps / (a * a)) * state[0] + (db - da * b / a + eps * b / (a * a)) * eta]

    x_t, x_hat, slope = 0.4, 1.1, -0.6
    for t, s in [(0.05, 0.3), (0.4, 0.9), (0.8, 0.97)]:
        sol = solve_ivp(mean_rate, (t, s), [x_t], args=(t,), method="DOP853", rtol=1e-12, atol=1e-14)
        keep, lift, _ = exponential_coefficients(schedule, t, s, kappa)
        weight = exponential_slope_weight(schedule, t, s, kappa)
        assert keep * x_t + lift * x_hat + weight * slope == pytest.approx(sol.y[0, -1], rel=1e-8, abs=1e-10)
        assert weight != 0.0


def test_exponential_2m_is_second_order():
    """Doubling the steps of a log-SNR-uniform grid shrinks the ODE's path error about 4× with η_X extrapolated
    (exponential-2m) and about 2× with η_X frozen (exponential), on the 2-D mixture's exact flow."""
    model = make_mixture().model("linear")
    sched = li.cosine()
    z = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(6))

    def grid(n):  # n − 2 nodes uniform in λ from r = 0.05 to r = 50, and the two ends
        lam = torch.linspace(math.log(0.05), math.log(50.0), n - 1, dtype=F64)
        return torch.cat([torch.zeros(1, dtype=F64), sched.snr_inverse(lam.exp()), torch.ones(1, dtype=F64)])

    def final(solver, n):
        return li.sample(model, z, schedule=sched, grid=grid(n), solver=solver, dtype=F64, center=False)

    fine = final("exponential-2m", 4096)
    for solver, low, high in (("exponential-2m", 3.0, 6.0), ("exponential", 1.5, 2.6)):
        errors = [float((final(solver, n) - fine).norm(dim=1).mean()) for n in (16, 32, 64)]
        ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
        assert all(low < r < high for r in ratios), (solver, errors)


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: s.name)
def test_exponential_step_limits_at_the_ends(schedule):
    """At SNR 0 with κ > 0 nothing of x_t is kept and x_s ~ β_s x̂ + α_s ξ (the limit of t → 0); a step to t = 1
    lands on x̂."""

    s = 0.4
    assert exponential_coefficients(schedule, 0.6, 1.0, 1.0) == (0.0, pytest.approx(1.0), 0.0)
    if float(schedule.beta(0.0)) != 0.0:
        return  # (vp starts at a small SNR, not at 0)
    keep, lift, spread = exponential_coefficients(schedule, 0.0, s, 1.0)
    assert keep == 0.0
    assert (lift, spread) == pytest.approx((float(schedule.beta(s)), float(schedule.alpha(s))))
    t = 1e-10
    near_keep, near_lift, near_spread = exponential_coefficients(schedule, t, s, 1.0)
    # What is kept of a state of the size it has at t (α_t, or 0 on a point mass) vanishes.
    assert near_keep * float(schedule.alpha(t)) == pytest.approx(0.0, abs=1e-4)
    assert (near_lift, near_spread) == pytest.approx((lift, spread), abs=1e-4)


@pytest.mark.filterwarnings("ignore:solver. one exponential")  # asked for on purpose: the run returns E[X]
def test_exponential_ode_step_is_ddim_that_is_linear_euler():
    """κ = 0: the step depends on the SNRs alone, so on lazy VP and the SNR-matched grid it gives the same samples as
    Euler on the linear schedule's uniform grid (DDIM), from the same noise."""
    model = make_mixture().model("linear")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    for steps in (1, 3, 6):
        ddim = li.sample(model, z, steps=steps, schedule="linear", solver="euler")
        for schedule in (li.lazy_vp(0.6), li.cosine()):
            out = li.sample(model, z, steps=steps, schedule=schedule, grid="model", solver="exponential", center=False)
            torch.testing.assert_close(out, ddim, rtol=1e-10, atol=1e-10)


def test_exponential_sde_step_does_not_depend_on_the_coordinates():
    """κ = 1 from a point mass on its SNR-matched grid and from the linear schedule's Gaussian base on its uniform
    grid: the same draws give the same samples (DDPM's ancestral step on one SNR grid)."""
    model = make_mixture().model("linear")
    for steps in (2, 5):
        kwargs = dict(shape=(32, 2), steps=steps, diffusion="optimal", solver="exponential", generator=5, dtype=F64,
                      center=False)
        for solver in ("exponential", "exponential-2m"):
            kwargs["solver"] = solver
            from_point = li.sample(model, schedule=li.point_mass(0.8), grid="model", **kwargs)
            noise = torch.randn(32, 2, dtype=F64)  # discarded by the first step (SNR 0, κ > 0)
            from_noise = li.sample(model, noise, schedule="linear", grid="uniform", **kwargs)
            torch.testing.assert_close(from_point, from_noise, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:solver. one exponential")  # asked for on purpose: the run returns E[X]
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_exponential_sde_is_not_exact_on_gaussians(steps):
    """Unlike Euler–Maruyama (§6.3) the frozen-η_X step loses variance on N(0, σ²): there η_X = x on the point mass
    with β = t, so each step adds σ²(1 − t_{k+1})(t_{k+1} − t_k)/(1 − t_k) and the last lands on x_{N−1}."""
    sigma = 0.8
    model = gaussian(sigma).model("linear")
    grid = li.uniform_grid(steps)
    out = li.sample(model, shape=(16, 3), grid=grid, schedule=li.point_mass(sigma), diffusion="optimal",
                    solver="exponential", generator=9, dtype=F64, center=False)
    draws = NoiseStreams(9, range(16), (3,), dtype=F64).draw_block(steps)
    t = grid.tolist()
    expected = sum(sigma * math.sqrt((1 - t[k + 1]) * (t[k + 1] - t[k]) / (1 - t[k])) * draws[k]
                   for k in range(steps - 1)) if steps > 1 else torch.zeros(16, 3, dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_exponential_solver_counts_and_refusals():
    model = make_mixture().model("linear")
    assert li.count_nfe("exponential", 5) == 5 and li.count_nfe("exponential", 5, "denoise", True) == 4
    _, info = li.sample(model, shape=(4, 2), steps=5, schedule="point-mass", diffusion="optimal", generator=0,
                        return_info=True)
    assert info.nfe == 4  # centred: the first step needs no network
    # The default for an SDE that is not lazy (κ ≠ 1 on the point mass) is the 2M step.
    kwargs = dict(shape=(4, 2), steps=5, schedule="point-mass", diffusion=2.0, generator=0, dtype=F64)
    default = li.sample(model, **kwargs)
    torch.testing.assert_close(default, li.sample(model, solver="exponential-2m", **kwargs), rtol=0, atol=0)
    for other in ("euler", "exponential", "ab2"):
        assert not torch.allclose(default, li.sample(model, solver=other, **kwargs))
    with pytest.raises(ValueError, match="solver: the exponential step needs"):
        li.sample(model, shape=(4, 2), schedule="point-mass", diffusion=lambda t: 0.3, solver="exponential")
    with pytest.raises(ValueError, match="covariance: the exponential step"):
        li.sample(model, torch.randn(4, 2), schedule="lazy-vp", solver="exponential", covariance=torch.eye(2))
