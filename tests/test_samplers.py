import math
import sys
import warnings

import pytest
import torch
from conftest import all_schedules, gaussian_schedules, make_mixture

import lazyinterp as li
from lazyinterp.noise import KeyedStreams, NoiseStreams
from lazyinterp.predictors import coefficients
from lazyinterp.samplers import default_solver, resolve_diffusion

F64 = torch.float64


def gaussian(sigma: float, dim: int = 3, mean: float = 0.0) -> li.GaussianMixture:
    return li.GaussianMixture.gaussian(torch.full((dim,), mean, dtype=F64), torch.tensor(sigma**2, dtype=F64))


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_linear_euler_on_standard_gaussian_is_the_closed_form_product(steps):
    """Theory §6.2: Z ↦ Z Π_k [1 + h (2t_k − 1)/((1 − t_k)² + t_k²)]: not exact."""
    z = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = li.sample(gaussian(1.0).model("linear"), z, steps=steps)
    h = 1 / steps
    factor = math.prod(1 + h * (2 * t - 1) / ((1 - t) ** 2 + t**2) for t in (k * h for k in range(steps)))
    torch.testing.assert_close(out, z * factor, rtol=1e-13, atol=1e-13)
    assert abs(factor - 1) > 1e-3  # linear Euler is not exact


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("sigma,mean", [(1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (0.5, 1.3)])
@pytest.mark.parametrize("solver", ["euler", "euler-alpha", "heun", "ab2-pc"])
def test_lazy_vp_is_exact_on_gaussians(steps, sigma, mean, solver):
    """Lazy VP Euler on N(μ, σ² I) maps Z to σZ + μ exactly for any number of steps (centred on E[X])."""
    z = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = gaussian(sigma, mean=mean).model("linear")
    for schedule in (li.lazy_vp(sigma), li.lazy_vp()):  # explicit σ, and σ estimated from the model
        out = li.sample(model, z, steps=steps, schedule=schedule, solver=solver)
        torch.testing.assert_close(out, sigma * z + mean, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("steps", [2, 3, 8])
def test_euler_alpha_is_exact_on_a_point_mass_and_plain_lazy_euler_is_not(steps):
    """X = μ: after centring η_X = 0 and the lazy VP drift is −tan θ x, which Euler in time α integrates exactly
    (x_{k+1} = x_k cos θ_{k+1}/cos θ_k), so every sample ends at μ; Euler in θ does not. Linear Euler (DDIM) is
    exact too."""
    mu = torch.tensor([1.5, -0.5], dtype=F64)

    def velocity(x, t):  # linear schedule, X = μ: v = (μ − x)/(1 − t)
        return (mu - x) / (1 - t[:, None])

    model = li.Model(velocity, "linear", predicts="velocity", t_min=0.0)
    z = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=steps, schedule=li.lazy_vp(1.0), grid="uniform")
    torch.testing.assert_close(li.sample(model, z, solver="euler-alpha", **kw), mu.expand(6, 2), rtol=0, atol=1e-12)
    assert float((li.sample(model, z, solver="euler", **kw) - mu).abs().max()) > 1e-3


@pytest.mark.parametrize("trained_under", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("kind", li.KINDS)
def test_one_lazy_euler_step_is_exact_whatever_the_model_predicts(trained_under, kind):
    """σ and E[X] estimated from a noise, score or data network, or under vp (β_0 > 0), at scales far from 1:
    lazy VP Euler still maps Z to σZ + μ in one step."""
    z = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    reads_at_0 = trained_under != "vp" and kind in ("velocity", "data")  # else one antithetic batch gives both
    for sigma, mean in ((1e-3, 5.0), (0.4, 1.5), (1e3, -200.0)):
        model = gaussian(sigma, dim=4, mean=mean).model(trained_under, kind)
        # σ = 1e3 at the model's lowest SNR (its t_min, or vp's start) is at data SNR ≥ 1: read there, unchecked
        alpha, beta = (float(c) for c in coefficients(model.schedule, model.t_min)[:2])
        clamped = beta / alpha * sigma > 0.4
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, info = li.sample(model, z, steps=1, schedule="lazy-vp", solver="euler", return_info=True)
        torch.testing.assert_close(out, sigma * z + mean, rtol=0, atol=1e-9 * sigma)
        assert [w.category for w in caught] == [li.LowestSNRWarning] * clamped
        # the probe and its check at a 4× lower SNR, and one more probe first where σ is more than 4× from 1
        assert info.estimation_nfe == (2 if reads_at_0 else 1) + 1 + (sigma != 0.4) - clamped


def test_point_mass_drift_at_the_data_end_is_the_exact_alpha_zero_limit_for_every_model():
    """At the point mass's t = 1, α = 0 and α̇ is infinite: η_Z's coefficient is of size 1/√END_OFFSET. The drift
    there takes the posterior at α = 0, exact for any data (η_Z = 0, η_X = x), whatever the model was trained
    under. Stochastic Heun's last corrector, the one step that evaluates it, then stays bounded on narrow modes,
    where a vp model's own η_Z (read at its regularised SNR 1e5) sent it 141 data scales away, and every model
    gives the same samples on a Gaussian."""
    kw = dict(schedule="point-mass", steps=5, solver="heun", last_step="euler", sde_noise="brownian", generator=0,
              dtype=F64)
    g = torch.Generator().manual_seed(0)
    means = 0.02 * torch.randn(5, 8, generator=g, dtype=F64)
    root = torch.randn(5, 8, 8, generator=g, dtype=F64)
    narrow = li.GaussianMixture(torch.ones(5, dtype=F64), means,
                                0.003**2 * (root @ root.transpose(1, 2) / 8 + 0.05 * torch.eye(8, dtype=F64)))
    scale = float(narrow.cov.trace().sqrt())
    gauss = gaussian(0.5, mean=0.3)
    first = None
    for trained_under in ("linear", "vp", "cosine"):
        for kind in li.KINDS:
            x = li.sample(narrow.model(trained_under, kind), shape=(2000, 8), **kw)
            assert float((x - narrow.mean).norm(dim=1).mean()) < 2 * scale, (trained_under, kind)
            y = li.sample(gauss.model(trained_under, kind), shape=(2000, 3), **kw)
            first = y if first is None else first
            torch.testing.assert_close(y, first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "ab2", "heun"])
def test_a_one_step_sde_keeps_its_only_step(solver):
    """An SDE's default last step is the denoising one, except on a one-step grid: there it would replace the
    only step, and every sample would be E[X]. With two steps and more the default is the denoising step."""
    model = gaussian(0.8, mean=0.3).model("linear")
    kw = dict(shape=(3000, 3), schedule="point-mass", solver=solver, generator=3, dtype=F64)
    one = li.sample(model, steps=1, **kw)
    torch.testing.assert_close(one, li.sample(model, steps=1, last_step="euler", **kw), rtol=0, atol=0)
    assert float(one.std()) > 0.5 and float(li.sample(model, steps=1, last_step="denoise", **kw).std()) < 1e-9
    torch.testing.assert_close(li.sample(model, steps=3, **kw), li.sample(model, steps=3, last_step="denoise", **kw),
                               rtol=0, atol=0)
    assert li.sample(model, steps=1, return_info=True, **kw)[1].nfe == li.count_nfe(solver, 1, "euler", True)


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("sde_noise", "streams"), [("independent", NoiseStreams), ("keyed", KeyedStreams)])
def test_point_mass_euler_maruyama_is_exact_on_gaussians(steps, sigma, sde_noise, streams):
    """Theory §6.3: with β = t the sampler is σ W_t from 0, so X_1 = σ Σ_k √h_k ξ_k exactly, pathwise."""
    model = gaussian(sigma).model("linear")
    grid = torch.tensor(sorted({0.0, 1.0, *torch.rand(steps - 1, generator=torch.Generator().manual_seed(2)).tolist()}),
                        dtype=F64)
    out = li.sample(model, shape=(2000, 3), grid=grid, schedule=li.point_mass(sigma), diffusion="optimal",
                    solver="euler", generator=7, last_step="euler", dtype=F64, center=False, sde_noise=sde_noise)
    # The SDE takes its increments in one block per sample (see NoiseStreams.draw_block), in step order.
    draws = streams(7, range(2000), (3,), dtype=F64).draw_block(len(grid) - 1)
    expected = sum(sigma * math.sqrt(float(h)) * draws[k] for k, h in enumerate(torch.diff(grid)))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.std().item() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_point_mass_ab2_sde_is_euler_maruyama_on_gaussians(steps):
    """AB2 on the lazy point-mass SDE extrapolates a drift that is identically 0 on N(0, σ²): it is Euler–Maruyama,
    and exact, pathwise; on a mixture the extrapolation changes the samples."""
    sigma = 0.6
    kwargs = dict(shape=(64, 3), steps=steps, schedule=li.point_mass(sigma), diffusion="optimal", generator=4,
                  last_step="euler", dtype=F64, center=False)
    model = gaussian(sigma).model("linear")
    torch.testing.assert_close(li.sample(model, solver="ab2", **kwargs), li.sample(model, solver="euler", **kwargs),
                               rtol=1e-12, atol=1e-12)
    if steps > 2:
        mixture = make_mixture().model("linear")
        kwargs.update(shape=(64, 2), schedule=li.point_mass(0.8))
        assert not torch.allclose(li.sample(mixture, solver="ab2", **kwargs),
                                  li.sample(mixture, solver="euler", **kwargs))


@pytest.mark.parametrize("schedule", ["point-mass", "lazy-vp", "cosine"])
def test_default_diffusion_is_the_optimal_sde_on_a_point_mass_and_the_ode_elsewhere(schedule):
    model = make_mixture().model("linear")
    kwargs = dict(shape=(32, 2), steps=4, schedule=schedule, generator=5, dtype=F64)
    expected = "optimal" if schedule == "point-mass" else "ode"
    other = "ode" if schedule == "point-mass" else "optimal"
    default = li.sample(model, **kwargs)
    torch.testing.assert_close(default, li.sample(model, diffusion=expected, **kwargs), rtol=0, atol=0)
    if schedule != "point-mass":  # the ODE cannot leave the point mass; elsewhere the SDE gives other samples
        assert not torch.allclose(default, li.sample(model, diffusion=other, **kwargs))


def test_point_mass_denoise_last_step_returns_the_posterior_mean():
    model = gaussian(1.0).model("linear")
    kwargs = dict(shape=(64, 3), steps=4, grid="uniform", schedule=li.point_mass(1.0), diffusion="optimal",
                  solver="euler", generator=3, dtype=F64, center=False)
    euler = li.sample(model, last_step="euler", **kwargs)
    denoised = li.sample(model, last_step="denoise", **kwargs)
    draws = NoiseStreams(3, range(64), (3,), dtype=F64).draw_block(4)
    # On N(0, 1) data η_X(t, x) = x on this schedule: denoising returns x_{N-1}, without the last noise.
    torch.testing.assert_close(denoised, sum(0.5 * d for d in draws[:3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(euler, denoised + 0.5 * draws[3], rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("diffusion", ["ode", "optimal"])
def test_same_seed_same_samples_whatever_the_batch(diffusion):
    model = make_mixture().model("linear")
    schedule = li.point_mass(0.8) if diffusion == "optimal" else li.lazy_vp(0.8)
    whole = li.sample(model, shape=(7, 2), steps=3, schedule=schedule, diffusion=diffusion, generator=11)
    parts = [li.sample(model, shape=(len(idx), 2), steps=3, schedule=schedule, diffusion=diffusion,
                       generator=11, indices=idx) for idx in (range(0, 3), range(3, 7))]
    assert torch.equal(whole, torch.cat(parts))
    again = li.sample(model, shape=(7, 2), steps=3, schedule=schedule, diffusion=diffusion,
                      generator=torch.Generator().manual_seed(5))
    again2 = li.sample(model, shape=(7, 2), steps=3, schedule=schedule, diffusion=diffusion,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, again2) and not torch.equal(again, whole)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_solver_produces_nan_or_inf(sched, dtype):
    mixture = make_mixture()
    diffusions = ["optimal", 0.5] if sched.base == "point_mass" else ["ode", "optimal", 2.0]
    for predicts in ("velocity", "noise", "data"):
        model = mixture.model("linear" if predicts == "velocity" else li.vp(), predicts)
        for diffusion in diffusions:
            for solver in ("euler", "heun", *(li.samplers.ODE_SOLVERS if diffusion == "ode" else ())):
                for steps in (1, 2, 10):
                    for last_step in ("euler", "denoise"):
                        out = li.sample(model, shape=(6, 2), steps=steps, schedule=sched, diffusion=diffusion,
                                        solver=solver, generator=0, dtype=dtype, last_step=last_step)
                        assert out.dtype == dtype
                        assert torch.isfinite(out).all(), (predicts, diffusion, solver, steps, last_step)


def test_images_and_vectors_shapes():
    image_mixture = li.GaussianMixture.gaussian(torch.zeros(2 * 4 * 4, dtype=F64), torch.tensor(0.3, dtype=F64))
    model = image_mixture.model("linear")
    z = torch.randn(3, 2, 4, 4)
    out = li.sample(model, z, steps=2, schedule="lazy-vp")
    assert out.shape == (3, 2, 4, 4)
    torch.testing.assert_close(out, math.sqrt(0.3) * z, rtol=1e-5, atol=1e-5)
    assert li.sample(model, shape=(5, 32), steps=2, schedule="point-mass", diffusion="optimal").shape == (5, 32)


def test_sde_keeps_the_marginals_of_a_mixture():
    """Fine-grid Euler–Maruyama with ε* from a Gaussian base and from a point mass reaches the mixture's moments."""
    mixture = make_mixture()
    model = mixture.model("linear")
    for schedule in (li.linear(), li.point_mass(1.0)):
        out = li.sample(model, shape=(4000, 2), steps=200, schedule=schedule, diffusion="optimal", generator=1,
                        dtype=F64)
        torch.testing.assert_close(out.mean(0), mixture.mean, rtol=0, atol=0.05)
        torch.testing.assert_close(torch.cov(out.T), mixture.cov, rtol=0, atol=0.08)


def test_callable_diffusion_and_kappa_agree():
    model = make_mixture().model("linear")
    sched = li.point_mass(1.0)
    a = li.sample(model, shape=(5, 2), steps=4, schedule=sched, diffusion=0.5, solver="euler", generator=3, dtype=F64)
    b = li.sample(model, shape=(5, 2), steps=4, schedule=sched, diffusion=lambda t: 0.5 * sched.optimal_diffusion(t),
                  generator=3, dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_network_nan_is_reported_with_step_and_time():
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return x * (math.nan if calls["n"] == 3 else 1.0)

    with pytest.raises(li.NonFiniteError, match=r"step 3, t=0.5"):
        li.sample(li.Model(net, "linear"), torch.randn(2, 3), steps=4)
    calls["n"] = 0
    # A bad network is bad input like any other: callers that catch ValueError catch it too.
    with pytest.raises(ValueError, match=r"NaN or inf"):
        li.sample(li.Model(net, "linear"), torch.randn(2, 3), steps=4)


def test_fp16_network_through_sample():
    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float16))

        def forward(self, x, t):
            assert x.dtype == torch.float16
            return -x * self.w  # velocity of a point at 0 ... any finite field will do

    out = li.sample(li.Model(Half(), "linear"), torch.randn(4, 3), steps=3, schedule="lazy-vp")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mixture = make_mixture()

    def net(x, t):
        return mixture.predict(x.cpu(), t.cpu(), "linear").to(x.device)

    model = li.Model(net, "linear")
    z = torch.randn(8, 2)
    cpu = li.sample(model, z, steps=4, schedule="lazy-vp")
    gpu = li.sample(model, z.cuda(), steps=4, schedule="lazy-vp")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    model = make_mixture().model("linear")
    z = torch.randn(4, 2)
    cases = [
        (dict(noise=z, schedule="banana"), ValueError, "schedule"),
        (dict(noise=z, steps=0), ValueError, "steps"),
        (dict(noise=z, steps=2.5), TypeError, "steps"),
        (dict(noise=z, grid=[0.0, 0.6, 0.4, 1.0]), ValueError, "grid: times must increase"),
        (dict(noise=z, grid=[0.1, 0.5, 1.0]), ValueError, "grid: must run from 0 to 1"),
        (dict(noise=z, grid=[0.0, 0.5, 0.9]), ValueError, "grid: must run from 0 to 1"),
        (dict(shape=(4, 2), schedule="point-mass", diffusion="ode"), ValueError, "diffusion: a point-mass schedule"),
        (dict(noise=z, shape=(3, 2)), ValueError, "shape"),
        (dict(), ValueError, "noise, shape"),
        (dict(noise=z, solver="rk45"), ValueError, "solver"),
        (dict(noise=z, diffusion="loud"), ValueError, "diffusion"),
        (dict(noise=z, diffusion=-1.0), ValueError, "diffusion"),
        (dict(noise=z, last_step="magic"), ValueError, "last_step"),
        (dict(noise=z, schedule="point-mass", diffusion="optimal"), ValueError, "noise"),
        (dict(noise=torch.zeros(4, 2, dtype=torch.long)), TypeError, "noise"),
        (dict(noise=torch.tensor([[0.0, math.nan]] * 4)), ValueError, "noise: expected finite values"),
        (dict(noise=z, device="banana"), ValueError, "device: expected a torch device"),
        (dict(noise=z, device="meta"), ValueError, "device: the meta device holds no values"),
        (dict(noise=z, device="cuda:99"), ValueError, "device: 'cuda:99' asked for, but"),
        (dict(noise=z, dtype="float"), TypeError, "dtype: expected a floating-point"),
        (dict(noise=z, dtype=torch.int32), TypeError, "dtype: expected a floating-point"),
        (dict(shape=(2, 2), indices=[0]), ValueError, "indices: expected 2 indices"),
        (dict(shape=(2, 2), steps=2**20 + 1), ValueError, "steps: expected at most 1048576 intervals, got 1048577"),
        (dict(shape=(2, 2), indices=[-1, 0]), ValueError, "indices: expected non-negative"),
        (dict(shape=(2, 2), indices=["a", "b"]), TypeError, "indices: expected a range or a sequence of non-neg"),
        (dict(shape=(2, 2), indices=[0.0, 1.5]), TypeError, "indices: expected a range or a sequence of non-neg"),
        (dict(shape=(2, 2), indices=torch.tensor([0.0, 1.0])), TypeError, "indices: expected a range or a sequ"),
        (dict(shape=(2, 2), indices=2), TypeError, "indices: expected a range or a sequence of non-negative"),
        (dict(noise=z, callback=3), TypeError, "callback: expected a callable"),
        (dict(noise=z, steps=3, grid=[0.0, 0.5, 1.0]), ValueError, "steps: 3 does not match the explicit grid's 2"),
        (dict(noise=z, center="yes"), TypeError, "center: expected True, False, None or E\\[X\\] as a tensor"),
        (dict(noise=z, center=torch.zeros(3)), ValueError, r"center: E\[X\] must broadcast to one sample's shape"),
        (dict(noise=z, center=torch.zeros(2, dtype=torch.int64)), TypeError, "center: expected .* floating tensor"),
        (dict(noise=z, center=torch.tensor([0.0, math.nan])), ValueError, "center: E\\[X\\] has non-finite"),
        (dict(noise=z, known_start=1), TypeError, "known_start: expected True, False or None"),
        (dict(shape=(4, 2), schedule="point-mass", diffusion="optimal", solver="euler-alpha"), ValueError,
         "solver: euler-alpha is an ODE solver"),
        (dict(noise=z, schedule="lazy-vp", solver="euler-alpha", covariance=torch.eye(2)), ValueError,
         "covariance: euler-alpha matches one scalar noise coefficient"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            li.sample(model, **kwargs)
    # steps that agree with an explicit grid are accepted
    two = [0.0, 0.5, 1.0]
    torch.testing.assert_close(li.sample(model, z, steps=2, grid=two), li.sample(model, z, grid=two))
    with pytest.raises(TypeError, match="model"):
        li.sample(lambda x, t: x, z)
    with pytest.raises(ValueError, match="shape"):
        li.sample(li.Model(lambda x, t: x[:, :1], "linear"), z)


def test_gaussian_schedules_start_at_alpha0_z():
    model = gaussian(1.0).model("linear")
    z = torch.randn(3, 3, dtype=F64)
    seen = []
    li.sample(model, z, steps=2, schedule=li.lazy_vp(0.3), center=False, grid="uniform",
              callback=lambda k, t, x: seen.append((k, t)))
    assert seen == [(0, 0.5), (1, 1.0)]
    for sched in gaussian_schedules():
        assert float(sched.alpha(0.0)) > 0


def test_multistep_weights_fall_back_to_one_step_rules_after_a_tiny_step():
    """After a step more than MAX_STEP_RATIO times shorter, AB2 is Euler and AM3 the trapezoid: the drifts' difference
    is rounding there. Regression: on the grid (0, a, next float after a, 1) covariance-matched AB2 on N(0, 1) was
    off by 2.0 (rounding of order 1e-16 times ρ ≈ 5e18), and is exact now."""
    assert li.samplers.ab2_weights(1.0, 1e-7) == (1.0, 0.0)
    assert li.samplers.am3_weights(1.0, 1e-7) == (0.5, 0.5, 0.0)
    h, h_prev = 0.3, 0.1
    assert li.samplers.ab2_weights(h, h_prev) == pytest.approx((h * 2.5, -h * 1.5))
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


def test_callable_diffusion_is_honoured_at_a_gaussian_start():
    """ε* is infinite at a Gaussian base's t = 0, but a user's finite ε(0) still drives the first step."""
    model = gaussian(1.0).model("linear")
    z = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    runs = [li.sample(model, z, steps=1, diffusion=lambda t: 0.3 + 0 * t, generator=g, last_step="euler")
            for g in (1, 2)]
    assert not torch.equal(runs[0], runs[1])
    xi = NoiseStreams(1, range(6), (3,), dtype=F64).draw_block(1)[0]
    # One EM step from t = 0: b^ε = α̇ η_Z + β̇ η_X − ε η_Z/α with η_Z = z, η_X = 0 (N(0, 1) data, linear).
    expected = z + 1.0 * (-z - 0.3 * z) + math.sqrt(2 * 0.3) * xi
    torch.testing.assert_close(runs[0], expected, rtol=1e-12, atol=1e-12)


def test_lazy_default_solver_is_ab2():
    model = make_mixture().model("linear")
    z = torch.randn(5, 2, dtype=F64)
    default = li.sample(model, z, steps=4, schedule=li.lazy_vp(0.8))
    torch.testing.assert_close(default, li.sample(model, z, steps=4, schedule=li.lazy_vp(0.8), solver="ab2"),
                               rtol=0, atol=0)
    assert not torch.equal(default, li.sample(model, z, steps=4, schedule=li.lazy_vp(0.8), solver="euler"))


def test_lazy_point_mass_sde_default_solver_is_ab2():
    """ε = ε* on the point mass is lazy (zero drift on Gaussian data), so its default is AB2, as for lazy ODEs;
    with any other κ, or on a Gaussian-base schedule, the SDE default is the 2M step."""
    model = make_mixture().model("linear")
    kwargs = dict(shape=(5, 2), steps=4, schedule="point-mass", generator=3, dtype=F64)
    for diffusion in ("optimal", 1.0):
        default = li.sample(model, diffusion=diffusion, **kwargs)
        torch.testing.assert_close(default, li.sample(model, diffusion=diffusion, solver="ab2", **kwargs),
                                   rtol=0, atol=0)
        assert not torch.allclose(default, li.sample(model, diffusion=diffusion, solver="exponential-2m", **kwargs))
    cases = ((li.lazy_vp(0.8), 1.0), (li.get_schedule("cosine"), "optimal"), (li.get_schedule("point-mass"), 0.5))
    for schedule, diffusion in cases:
        assert default_solver(schedule, resolve_diffusion(diffusion, schedule)) == "exponential-2m", schedule


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
    linear = li.samplers.adams_predictor_corrector(lambda x, t: torch.full_like(x, 2 - 3 * t), x0, grid)
    torch.testing.assert_close(linear, torch.tensor([2 - 1.5], dtype=F64), rtol=0, atol=1e-14)

    def antiderivative(t):
        return 1.5 * t - t**2 + 2 * t**3

    seen = []
    li.samplers.adams_predictor_corrector(lambda x, t: torch.full_like(x, 1.5 - 2 * t + 6 * t * t), x0, grid,
                                          callback=lambda k, t, x: seen.append((k, t, float(x))))
    assert [(k, t) for k, t, _ in seen] == list(enumerate(grid[1:].tolist()))
    states = [0.0] + [x for _, _, x in seen]
    for k in range(1, len(grid) - 2):  # the corrected intervals after the first
        exact = antiderivative(float(grid[k + 1])) - antiderivative(float(grid[k]))
        assert states[k + 1] - states[k] == pytest.approx(exact, abs=1e-14)
    first = antiderivative(float(grid[1]))
    assert abs(states[1] - first) > 1e-4  # the trapezoid alone is not exact for a quadratic


@pytest.mark.parametrize("schedule, diffusion, solver", [("lazy-vp", "ode", "ab2"), ("lazy-vp", "ode", "heun"),
                                                         ("linear", "ode", "euler"),
                                                         ("point-mass", "optimal", "euler")])
def test_known_start_skips_the_network_at_t0_and_changes_nothing_else(schedule, diffusion, solver):
    """For centred data η_X(0, x) = 0 and η_Z(0, x) = x/α_0 exactly, so skipping the evaluation at t = 0 gives the
    same samples as evaluating the exact mixture model there, with one evaluation fewer."""
    mixture = make_mixture()
    seen_times = []

    def velocity(x, t):
        seen_times.append(float(t.min()))
        return exact.predict(x, t, "velocity")

    exact = mixture.model("linear")
    model = li.Model(velocity, "linear", "velocity")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(steps=5, schedule=schedule, diffusion=diffusion, solver=solver, center=True, generator=4,
                  return_info=True, shape=z.shape, dtype=F64)
    start = None if schedule == "point-mass" else z
    evaluated, info_evaluated = li.sample(model, start, known_start=False, **kwargs)
    seen_times.clear()
    skipped, info_skipped = li.sample(model, start, known_start=True, **kwargs)
    assert min(seen_times) > 0  # the estimates of E[X] and σ are cached on the model: only sampling calls here
    assert info_skipped.nfe == info_evaluated.nfe - 1 == len(seen_times)
    torch.testing.assert_close(skipped, evaluated, rtol=1e-9, atol=1e-9)


def test_known_start_needs_centring():
    model = make_mixture().model("linear")
    with pytest.raises(ValueError, match="known_start"):
        li.sample(model, torch.randn(3, 2), steps=2, schedule="linear", known_start=True)
    _, info = li.sample(model, torch.randn(3, 2), steps=2, schedule="linear", return_info=True)
    assert info.nfe == 2  # no centring by default off the lazy schedules, so t = 0 is evaluated
    _, info = li.sample(model, torch.randn(3, 2), steps=2, schedule="lazy-vp", return_info=True)
    assert info.nfe == 1


@pytest.mark.parametrize("schedule, diffusion", [("lazy-vp", "optimal"), ("lazy-vp", 0.5), ("point-mass", 2.0)])
def test_a_one_step_sde_takes_euler_maruyama_where_the_default_is_exponential(schedule, diffusion):
    """The exponential steps end at η_X, which one step from t = 0 makes E[X] for every sample (the known start
    evaluates nothing). With the solver left to its default a one-step run steps by Euler–Maruyama instead, exact
    for the lazy VP SDE on Gaussian data; from two steps the default is the exponential 2M step."""
    model = gaussian(0.5, mean=1.0).model("linear")
    z = torch.randn(2000, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    start = dict(shape=(2000, 3)) if schedule == "point-mass" else dict(noise=z)
    kw = dict(schedule=schedule, diffusion=diffusion, generator=0, dtype=F64, **start)
    one = li.sample(model, steps=1, **kw)
    torch.testing.assert_close(one, li.sample(model, steps=1, solver="euler", **kw), rtol=0, atol=0)
    torch.testing.assert_close(li.sample(model, steps=1, solver="exponential-2m", **kw), torch.ones(2000, 3, dtype=F64),
                               rtol=0, atol=1e-12)
    if schedule == "lazy-vp":
        torch.testing.assert_close(one, 0.5 * z + 1.0, rtol=0, atol=1e-12)
    else:  # Euler–Maruyama from the point with ε = κε*: N(μ, κσ²)
        assert float(one.std(dim=0).mean()) == pytest.approx(0.5 * math.sqrt(diffusion), rel=0.05)
    two = li.sample(model, steps=2, **kw)
    torch.testing.assert_close(two, li.sample(model, steps=2, solver="exponential-2m", **kw), rtol=0, atol=0)


def test_center_given_as_a_tensor_is_the_mean_used():
    """center=E[X] centres about the caller's mean, with no estimate of it: on N(μ, σ²I) with σ given too, one
    lazy Euler step is σZ + μ at no estimation cost, and a mean off by 1 moves every sample by 1 (the known start
    evaluates nothing). With σ left open it is estimated about the given mean."""
    z = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    mean = torch.full((4,), 1.3, dtype=F64)
    model = gaussian(0.7, dim=4, mean=1.3).model("linear", "noise")
    kw = dict(steps=1, solver="euler", return_info=True)
    out, info = li.sample(model, z, schedule=li.lazy_vp(0.7), center=mean, **kw)
    torch.testing.assert_close(out, 0.7 * z + 1.3, rtol=0, atol=1e-12)
    assert info.estimation_nfe == 0 and model.nfe == 0 and torch.equal(info.mean, mean)
    off, _ = li.sample(model, z, schedule=li.lazy_vp(0.7), center=mean + 1, **kw)
    torch.testing.assert_close(off, 0.7 * z + 2.3, rtol=0, atol=1e-12)
    out, info = li.sample(model, z, schedule="lazy-vp", center=torch.tensor([1.3], dtype=F64), **kw)
    assert info.sigma == pytest.approx(0.7, rel=1e-9) and info.estimation_nfe > 0
    torch.testing.assert_close(out, 0.7 * z + 1.3, rtol=0, atol=1e-9)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_network_bound_to_the_batch_is_told_why_the_estimate_failed_and_how_to_skip_it():
    """Per-sample conditioning bound to a batch of 4 breaks on the estimate's own batches (8 probes, or the 2048
    samples of covariance='model'): the network's error stands, with a note naming the cause and the arguments that
    skip the estimate. Given them, the same network samples; an error of the sampling run itself gets no note."""
    target = gaussian(0.7, dim=3, mean=1.3)
    exact = target.model("linear")
    labels = torch.arange(4, dtype=F64)

    def bound(x, t):  # an offset per sample, as a class embedding bound to the batch would add
        return exact.net(x, t) + 0 * labels[:, None]

    model = li.Model(bound, "linear", "velocity")
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"covariance": "model"}):
        with pytest.raises(RuntimeError, match="size of tensor") as caught:
            li.sample(model, z, steps=2, schedule="lazy-vp", **kwargs)
        notes = getattr(caught.value, "__notes__", [])
        assert len(notes) == 1 and "batch of 4" in notes[0] and "center=E[X]" in notes[0], notes
    x = li.sample(model, z, steps=1, solver="euler", schedule=li.lazy_vp(0.7), center=target.mean)
    torch.testing.assert_close(x, 0.7 * z + 1.3, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="size of tensor") as caught:
        li.sample(model, torch.cat([z, z]), steps=2, schedule=li.lazy_vp(0.7), center=target.mean)
    assert not getattr(caught.value, "__notes__", [])


def test_given_sigma_and_mean_sample_data_whose_modes_the_probes_cannot_both_see():
    """Two modes of width 1, 300 apart, one at the origin. A noise network's probes start centred at 0, where the
    data at their SNR is that one mode, and its check 4× lower sees no other: σ̂ and E[X] are that mode's and every
    sample lands on it. Given σ and E[X] (center=mean), 8 lazy VP steps find both modes in their proportions."""
    means = torch.tensor([[0.0, 0.0], [300.0, 90.0]], dtype=F64)
    target = li.GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), means, torch.ones(2, dtype=F64))
    model = target.model("linear", "noise")
    z = torch.randn(2000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sigma = math.sqrt(float(target.cov.trace()) / 2)
    estimated, info = li.sample(model, z, steps=8, schedule="lazy-vp", return_info=True)
    assert info.sigma < 0.05 * sigma and float((torch.cdist(estimated, means)[:, 1] < 5).double().mean()) == 0
    x = li.sample(model, z, steps=8, schedule=li.lazy_vp(sigma), center=target.mean)
    distances = torch.cdist(x, means)
    assert 0.5 < float((distances[:, 1] < 5).double().mean()) < 0.7
    assert float((distances.min(dim=1).values < 5).double().mean()) > 0.9


def test_lazy_default_switches_to_the_predictor_corrector_for_many_steps():
    model = make_mixture().model("linear")
    z = torch.randn(5, 2, dtype=F64)
    switch = li.samplers.PC_DEFAULT_FROM_STEPS
    for steps, solver in [(switch - 1, "ab2"), (switch, "ab2-pc")]:
        default = li.sample(model, z, steps=steps, schedule=li.lazy_vp(0.8))
        explicit = li.sample(model, z, steps=steps, schedule=li.lazy_vp(0.8), solver=solver)
        torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_deferred_state_check_names_the_first_bad_step():
    """On an accelerator the per-step finiteness flags are read once, at the end; the report is the same."""
    from lazyinterp.samplers import _StateCheck

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


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("target", [li.lazy_vp(0.6), li.point_mass(0.8), li.cosine()], ids=lambda s: s.name)
def test_grid_shift_divides_the_snr_of_every_node(target, shift):
    """grid="model" with grid_shift s: r(t_k) = r_lin(k/N)/s at every interior node; diffusers' shifted sigmas
    σ' = sσ/(1 + (s − 1)σ) give the same linear-schedule times, 1 − σ'."""
    from lazyinterp.samplers import snr_matched_grid

    steps = 6
    grid = snr_matched_grid(steps, target, "linear", shift)
    u = torch.arange(1, steps, dtype=torch.float64) / steps
    torch.testing.assert_close(target.snr(grid[1:-1]), (u / (1 - u)) / shift, rtol=1e-10, atol=0)
    sigma = 1 - u
    shifted_sigma = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(li.linear().snr_inverse(target.snr(grid[1:-1])), 1 - shifted_sigma, rtol=1e-10,
                               atol=1e-12)
    assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0


def test_sample_uses_the_shifted_grid_and_checks_the_shift(mixture):
    """li.sample(grid_shift=s) samples on the shifted model grid (and moves the samples); a shift that is not a
    positive number, or one given with any grid but "model", is refused before sampling."""
    from lazyinterp.samplers import snr_matched_grid

    model = mixture.model("linear")
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, info = li.sample(model, z, steps=4, schedule=li.lazy_vp(1.0), grid_shift=2.0, return_info=True)
    torch.testing.assert_close(info.grid, snr_matched_grid(4, li.lazy_vp(1.0), "linear", 2.0))
    assert float((x - li.sample(model, z, steps=4, schedule=li.lazy_vp(1.0))).abs().max()) > 1e-3
    for bad, error in ((0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                       ("2", TypeError), (True, TypeError)):
        with pytest.raises(error, match="grid_shift"):
            li.sample(model, z, steps=4, schedule="lazy-vp", grid_shift=bad)
    for grid in ("uniform", [0.0, 0.5, 1.0]):
        with pytest.raises(ValueError, match="grid_shift"):
            li.sample(model, z, schedule="lazy-vp", grid=grid, grid_shift=2.0)
    with pytest.raises(ValueError, match="grid_shift"):
        li.sample(model, z, steps=4, grid_shift=2.0)  # the linear schedule's default grid is uniform
    with pytest.raises(ValueError, match="grid: expected an explicit grid or one of uniform, model, linear, got 'snr'"):
        li.sample(model, z, steps=4, schedule="lazy-vp", grid="snr", grid_shift=2.0)  # the grid is what is wrong
    # A shift so far from 1 that the schedule's times cannot resolve the shifted SNRs would merge nodes.
    with pytest.raises(ValueError, match="grid_shift: 1e-30 moves nodes of the 4-step grid"):
        li.sample(model, z, steps=4, schedule="lazy-vp", grid_shift=1e-30)


@pytest.mark.parametrize("family", [li.lazy_vp, li.point_mass], ids=["lazy-vp", "point-mass"])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_model_grid_is_the_lazy_schedules_own_for_sigma_far_from_one(family, shift):
    """Inside the family's MATCHED_GRID_SIGMA_RANGE the "model" grid matches the model's SNRs (r = r_lin(k/N)/s);
    outside GRID_SIGMA_RANGE it is the lazy schedule's own uniform grid with the same shift (r = r(k/N)/s), which
    depends on the data's SNR rσ alone, so it is the same grid for every σ beyond the range."""
    from lazyinterp.samplers import GRID_SIGMA_RANGE, MATCHED_GRID_SIGMA_RANGE, make_grid, snr_matched_grid

    low, high = MATCHED_GRID_SIGMA_RANGE[family().family]
    for sigma in (low, 1.0, high):
        grid = make_grid("model", 6, family(sigma), li.linear(), shift)
        torch.testing.assert_close(grid, snr_matched_grid(6, family(sigma), li.linear(), shift))
    outer_low, outer_high = GRID_SIGMA_RANGE
    far = [make_grid("model", 6, family(sigma), li.linear(), shift)
           for sigma in (outer_low, outer_low / 3, 1e-3, outer_high, outer_high * 2, 1e4) if not low <= sigma <= high]
    own = snr_matched_grid(6, family(1e-3), family(1e-3), shift)
    for grid in far:
        torch.testing.assert_close(grid, own, rtol=0, atol=1e-12)
    if shift == 1.0:
        torch.testing.assert_close(own, torch.linspace(0, 1, 7, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 2.0])
@pytest.mark.parametrize("sigma, weight", [(2 * 2**0.5, 0.5), (2 * 2**0.25, 0.25), (0.5 / 2**0.75, 0.75)])
def test_lazy_vp_model_grid_blends_the_log_snrs_between_the_ranges(shift, sigma, weight):
    """Between MATCHED_GRID_SIGMA_RANGE [1/2, 2] and GRID_SIGMA_RANGE [1/4, 4] the lazy VP grid's node log-SNRs are
    (1 − w) log r_lin(k/N)/s + w log r_own(k/N)/s with w linear in |log σ|, and the grid is continuous in σ at both
    ends of the blend."""
    from lazyinterp.samplers import make_grid, own_grid_weight, snr_matched_grid

    schedule = li.lazy_vp(sigma)
    assert own_grid_weight(schedule) == pytest.approx(weight, abs=1e-12)
    grid = make_grid("linear", 5, schedule, li.linear(), shift)
    matched = snr_matched_grid(5, schedule, li.linear(), shift)
    own = snr_matched_grid(5, schedule, schedule, shift)
    inner = slice(1, -1)
    expected = (1 - weight) * schedule.snr(matched[inner]).log() + weight * schedule.snr(own[inner]).log()
    torch.testing.assert_close(schedule.snr(grid[inner]).log(), expected, rtol=0, atol=1e-9)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and bool((grid[1:] > grid[:-1]).all())
    for edge in (0.25, 0.5, 2.0, 4.0):
        near = [make_grid("linear", 5, li.lazy_vp(edge * (1 + side)), li.linear(), shift) for side in (-1e-9, 1e-9)]
        torch.testing.assert_close(near[0], near[1], rtol=0, atol=1e-7)


def test_blended_grid_beats_both_grids_it_blends_on_a_wide_mixture():
    """gmm-2d with every length doubled (σ ≈ 3.7, w ≈ 0.89): at 2 NFE the default lazy VP sampler on the blended
    grid is closer to the target than on the linear schedule's grid or on its own uniform grid (sliced W2 0.134
    against 0.167 and 0.151 of the doubled scale when measured)."""
    from lazyinterp.bench import SlicedW2, gmm_2d
    from lazyinterp.samplers import snr_matched_grid
    from lazyinterp.targets import GaussianMixture

    base = gmm_2d()
    target = GaussianMixture(base.weights, base.means * 2, base.covs * 4)
    n = 8000
    z = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    model = target.model("linear")
    x, info = li.sample(model, z, steps=3, schedule="lazy-vp", return_info=True)
    assert 2.0 < info.sigma < 4.0
    sliced = SlicedW2(target, n)
    values = {"blend": sliced(x)}
    for name, reference in (("linear", li.linear()), ("own", info.schedule)):
        grid = snr_matched_grid(3, info.schedule, reference)
        values[name] = sliced(li.sample(model, z, grid=grid, schedule="lazy-vp"))
    assert values["blend"] < 0.95 * min(values["linear"], values["own"]), values


def test_default_lazy_grid_is_the_linear_schedules_whatever_the_model_was_trained_under():
    """The conversion is exact, so only the grid can make a VP noise network and a rectified-flow velocity network
    of the same data sample differently: by default both visit the SNRs t/(1 − t) of the linear uniform grid. On
    their own uniform grids the VP model was twice as far from the mixture at 2 NFE (sliced W2 0.23 against 0.11)."""
    from lazyinterp.bench import SlicedW2, gmm_2d
    from lazyinterp.samplers import snr_matched_grid

    target = gmm_2d()
    z = torch.randn(4000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    schedule = li.lazy_vp(1.8)
    values, grids = {}, {}
    for trained_under, kind in (("linear", "velocity"), ("vp", "noise"), ("cosine", "score")):
        model = target.model(trained_under, kind)
        x, info = li.sample(model, z, steps=3, schedule=schedule, return_info=True)
        grids[trained_under] = info.grid
        values[trained_under] = SlicedW2(target, 4000)(x)
        own = li.sample(model, z, steps=3, schedule=schedule, grid="model")
        if trained_under == "linear":
            torch.testing.assert_close(own, x)
        values[trained_under + " own"] = SlicedW2(target, 4000)(own)
    for grid in grids.values():
        torch.testing.assert_close(grid, snr_matched_grid(3, schedule, "linear"), rtol=0, atol=1e-12)
    assert values["vp"] == pytest.approx(values["linear"], rel=0.05)
    assert values["cosine"] == pytest.approx(values["linear"], rel=0.05)
    assert values["vp own"] > 1.5 * values["vp"], values


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_lazy_samples_scale_with_the_data_beyond_the_grid_range(scale):
    """Lazy VP with σ scaled like the data gives samples scaled like the data once the grid is the schedule's own,
    and samples a mixture 100× smaller or larger as well as the mixture itself, where the model's uniform grid
    crowds its nodes at one end (sliced W2 / σ at 4 NFE: 0.058 at scales 0.01 and 100, 0.050 at 1; on the model's
    grid 0.63 and 0.38)."""
    from lazyinterp.bench import SlicedW2

    base = make_mixture()
    scaled = li.GaussianMixture(base.weights, base.means * scale, base.covs * scale**2)
    z = torch.randn(4000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sigma = math.sqrt(float(scaled.cov.trace()) / 2)
    far = li.sample(scaled.model("linear"), z, steps=5, schedule=li.lazy_vp(sigma))
    farther = li.sample(li.GaussianMixture(base.weights, base.means * scale * 3, base.covs * (scale * 3) ** 2)
                        .model("linear"), z, steps=5, schedule=li.lazy_vp(3 * sigma))
    torch.testing.assert_close(farther, 3 * far, rtol=1e-6, atol=1e-9 * sigma)
    default = li.sample(scaled.model("linear"), z, steps=5, schedule="lazy-vp")
    assert SlicedW2(scaled, 4000)(default) / sigma < 0.1


def test_multistep_weights_integrate_polynomials_exactly():
    """AB2's weights integrate a linear f over [t, t + h] from f(t) and f(t − h_prev); AM3's a quadratic from
    f(t + h), f(t) and f(t − h_prev); the trapezoid a linear f from its two ends."""
    from lazyinterp.samplers import ab2_weights, am3_weights

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

    from lazyinterp.samplers import exponential_coefficients

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
    from lazyinterp.samplers import exponential_coefficients

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

    from lazyinterp.samplers import exponential_coefficients, exponential_slope_weight, log_snr

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
    from lazyinterp.samplers import exponential_coefficients

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


@pytest.mark.parametrize("solver", ["euler", "ab2"])
def test_brownian_noise_makes_the_point_mass_sde_one_sample_for_any_grid(solver):
    """On N(μ, σ²I) the point-mass SDE is X_t = tμ + σ W_t (theory §6.3): Euler–Maruyama (and AB2, whose drift μ is
    constant) reads it exactly from the increments, so with a Brownian path every grid ends at μ + σ W(1)."""
    sigma, mean = 0.7, torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    model = li.GaussianMixture.gaussian(mean, torch.tensor(sigma**2, dtype=F64)).model("linear")
    w1 = li.BrownianPaths(3, range(5), (3,), dtype=F64).values([1.0])[0]
    random_grid = torch.tensor([0.0, 0.011, 0.2, 0.37, 0.9, 1.0], dtype=F64)
    for grid in (1, 3, 8, 50, random_grid):
        steps = grid if isinstance(grid, int) else None
        out = li.sample(model, shape=(5, 3), steps=steps, grid=None if steps else grid, schedule=li.point_mass(sigma),
                        diffusion="optimal", solver=solver, last_step="euler", generator=3, dtype=F64,
                        center=False, sde_noise="brownian")
        torch.testing.assert_close(out, mean + sigma * w1, rtol=1e-12, atol=1e-12)


def test_brownian_noise_converges_to_one_sample_as_steps_grow(mixture):
    """With a Brownian path the samples of N and 2N steps approach each other (strong convergence); with a fresh
    normal per step they stay a whole noise apart."""
    model = mixture.model("linear")

    def gaps(sde_noise: str) -> list[float]:
        runs = [li.sample(model, shape=(1000, 2), steps=steps, schedule="point-mass", diffusion="optimal",
                          solver="euler", generator=1, dtype=F64, sde_noise=sde_noise) for steps in (16, 32, 64, 128)]
        return [float((a - b).norm(dim=1).mean()) for a, b in zip(runs[:-1], runs[1:], strict=True)]

    brownian, independent = gaps("brownian"), gaps("independent")
    assert all(later < 0.7 * earlier for earlier, later in zip(brownian[:-1], brownian[1:], strict=True))
    assert brownian[-1] < 0.1 * min(independent)
    assert min(independent) > 0.5


def test_sde_noise_is_checked_and_leaves_the_start_and_odes_alone(mixture):
    model = mixture.model("linear")
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=4, schedule="lazy-vp", generator=2)
    for sde_noise in ("keyed", "brownian"):
        assert torch.equal(li.sample(model, z, sde_noise=sde_noise, **kwargs), li.sample(model, z, **kwargs))
    with pytest.raises(ValueError, match="sde_noise: expected one of independent, keyed, brownian"):
        li.sample(model, z, sde_noise="bridge", **kwargs)
    # Only the increments differ: a 1-step SDE whose last step denoises uses no increment at all.
    sde = dict(shape=(16, 2), steps=1, schedule="lazy-vp", diffusion="optimal", solver="euler", generator=2,
               dtype=F64)
    for sde_noise in ("keyed", "brownian"):
        assert torch.equal(li.sample(model, sde_noise=sde_noise, **sde), li.sample(model, **sde))
