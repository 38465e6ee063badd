import math
import warnings

import pytest
import torch
from conftest import all_schedules, gaussian, gaussian_schedules, make_mixture

import lazyinterp as li
from lazyinterp.noise import KeyedStreams, NoiseStreams
from lazyinterp.predictors import coefficients
from lazyinterp.samplers import default_solver, resolve_diffusion

F64 = torch.float64


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
            for solver in ("euler", "heun", *(li.solvers.ODE_SOLVERS if diffusion == "ode" else ())):
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default and the explicit Euler step do not warn
        one = li.sample(model, steps=1, **kw)
        torch.testing.assert_close(one, li.sample(model, steps=1, solver="euler", **kw), rtol=0, atol=0)
        li.sample(model, steps=2, solver="exponential-2m", **kw)
    # Asked for explicitly, the exponential step is taken, and it warns that every sample is E[X].
    message = "solver: one exponential-2m step from pure noise returns the model's posterior mean"
    with pytest.warns(UserWarning, match=message):
        collapsed = li.sample(model, steps=1, solver="exponential-2m", **kw)
    torch.testing.assert_close(collapsed, torch.ones(2000, 3, dtype=F64), rtol=0, atol=1e-12)
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


def test_lazy_default_switches_to_the_predictor_corrector_for_many_steps():
    model = make_mixture().model("linear")
    z = torch.randn(5, 2, dtype=F64)
    switch = li.samplers.PC_DEFAULT_FROM_STEPS
    for steps, solver in [(switch - 1, "ab2"), (switch, "ab2-pc")]:
        default = li.sample(model, z, steps=steps, schedule=li.lazy_vp(0.8))
        explicit = li.sample(model, z, steps=steps, schedule=li.lazy_vp(0.8), solver=solver)
        torch.testing.assert_close(default, explicit, rtol=0, atol=0)


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
