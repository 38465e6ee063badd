import math

import numpy as np
import pytest
import torch
from conftest import all_schedules, gaussian_schedules, make_mixture

import lazyinterp as li
from lazyinterp.predictors import coefficients

F64 = torch.float64
TIMES = [0.05, 0.3, 0.5, 0.77, 0.95]


def test_linear_gaussian_velocity_closed_form():
    """Theory §6.1: v(t, x) = ((tσ² − (1 − t)) / ((1 − t)² + t²σ²)) x for N(0, σ² I)."""
    for sigma in (0.5, 1.0, 2.0):
        g = li.GaussianMixture.gaussian(torch.zeros(3), torch.tensor(sigma**2, dtype=F64))
        x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        for t in [0.0, *TIMES, 1.0]:
            expected = (t * sigma**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * sigma**2) * x
            torch.testing.assert_close(g.predict(x, t, "linear"), expected, rtol=1e-12, atol=1e-12)


def test_linear_velocity_identities(mixture):
    """η_X = y + (1 − τ) v and η_Z = y − τ v for a linear-schedule velocity model."""
    y = mixture.sample(8, torch.Generator().manual_seed(1)) + 0.3
    for t in TIMES:
        v = mixture.predict(y, t, "linear")
        eta_z, eta_x = li.to_eta("velocity", v, y, *coefficients(li.linear(), t))
        torch.testing.assert_close(eta_x, y + (1 - t) * v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eta_z, y - t * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_every_kind_converts_to_every_other(sched, mixture):
    """Each kind's exact output, turned into (η_Z, η_X) and back into another kind, is that kind's exact output."""
    x = mixture.sample(16, torch.Generator().manual_seed(2)) * 0.8
    for t in TIMES:
        coef = coefficients(sched, t)
        exact = {kind: mixture.predict(x, t, sched, kind) for kind in li.KINDS}
        x_t = x  # any point works: the identities hold pointwise
        for src in li.KINDS:
            eta_z, eta_x = li.to_eta(src, exact[src], x_t, *coef)
            torch.testing.assert_close(coef[0] * eta_z + coef[1] * eta_x, x_t, rtol=1e-10, atol=1e-10)
            for dst in li.KINDS:
                got = li.from_eta(dst, eta_z, eta_x, *coef)
                torch.testing.assert_close(got, exact[dst], rtol=1e-9, atol=1e-9, msg=f"{src}->{dst} at {t}")


def test_mixture_predictors_against_monte_carlo(mixture):
    """The fixture itself: η_X(t, x) is the posterior mean (checked by importance weighting on samples of X)."""
    gen = torch.Generator().manual_seed(3)
    x_data = mixture.sample(400_000, gen)
    sched = li.cosine()
    t = 0.4
    a, b = float(sched.alpha(t)), float(sched.beta(t))
    point = torch.tensor([[0.5, 0.2]], dtype=F64)
    log_w = -0.5 * ((point - b * x_data) ** 2).sum(1) / a**2
    w = torch.softmax(log_w, 0)
    mc = (w[:, None] * x_data).sum(0)
    _, eta_x = mixture.eta(point, a, b)
    torch.testing.assert_close(eta_x[0], mc, rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind", li.KINDS)
@pytest.mark.parametrize("sched", gaussian_schedules(), ids=lambda s: s.name)
def test_model_is_finite_at_both_ends(kind, sched, mixture):
    model = mixture.model(sched, kind)
    x = mixture.sample(5, torch.Generator().manual_seed(4))
    for dtype in (torch.float32, F64):
        for t in (0.0, 1.0):
            eta_z, eta_x = model.eta(x.to(dtype), t)
            assert torch.isfinite(eta_z).all() and torch.isfinite(eta_x).all(), (kind, t, dtype)
            for out_kind in li.KINDS:
                assert torch.isfinite(model.predict(x.to(dtype), t, out_kind)).all()


def test_end_point_limits(mixture):
    x = mixture.sample(5, torch.Generator().manual_seed(5))
    # Data predictor at α = 0: η_Z = E[Z | X = x] = 0 exactly.
    data_model = mixture.model("linear", "data")
    eta_z, eta_x = data_model.eta(x, 1.0)
    assert torch.equal(eta_z, torch.zeros_like(x))
    torch.testing.assert_close(eta_x, x, rtol=0, atol=1e-12)
    # Noise predictor at β = 0: evaluated at t_min (SNR 1e-3), so η_X is E[X] up to O(SNR).
    noise_model = mixture.model("linear", "noise")
    assert noise_model.t_min == pytest.approx(1e-3 / (1 + 1e-3))
    _, eta_x = noise_model.eta(torch.randn(5, 2, dtype=F64), 0.0)
    torch.testing.assert_close(eta_x, mixture.mean.expand(5, 2), rtol=0, atol=1e-2)
    # Velocity on the linear schedule needs no clamping: η_X(0, y) = E[X] exactly for every y.
    _, eta_x = mixture.model("linear").eta(torch.randn(5, 2, dtype=F64), 0.0)
    torch.testing.assert_close(eta_x, mixture.mean.expand(5, 2), rtol=0, atol=1e-12)


def test_half_precision_networks_keep_float32_state():
    seen = {}

    class HalfNet(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))

        def forward(self, x, t):
            seen["x"], seen["t"] = x.dtype, t.dtype
            return self.scale * x

    for dtype in (torch.float16, torch.bfloat16):
        model = li.Model(HalfNet(dtype), "linear")
        out = model.predict(torch.randn(4, 3), 0.5)
        assert seen == {"x": dtype, "t": dtype}
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def exact_ve_denoiser(target: li.GaussianMixture):
    """E[X | X + σZ = y] of a mixture, called as k-diffusion's and EDM's denoisers are: D(y, σ), σ of shape (B,)."""

    def denoise(y, sigma):
        return target.eta(y.reshape(y.shape[0], -1), sigma, 1.0)[1].reshape(y.shape).to(y.dtype)

    return denoise


def test_ve_denoiser_model_is_the_linear_schedules_data_prediction(mixture):
    """I_t / t = X + σZ with σ = (1 − t)/t, so D(x/t; σ) is η_X under the linear schedule, and every conversion of
    it is the mixture's own; outside [σ_min, σ_max] the denoiser is evaluated at the end of its range."""
    model = li.ve_denoiser_model(exact_ve_denoiser(mixture))
    reference = mixture.model("linear", "data")
    x = mixture.sample(16, torch.Generator().manual_seed(3)) * 0.7 + 0.2
    for t in TIMES:
        for kind in li.KINDS:
            torch.testing.assert_close(model.predict(x, t, kind), reference.predict(x, t, kind), rtol=1e-10,
                                       atol=1e-10)
    seen = []

    def spy(y, sigma):
        seen.append(sigma.clone())
        return exact_ve_denoiser(mixture)(y, sigma)

    ranged = li.ve_denoiser_model(spy, sigma_min=0.01, sigma_max=10.0)
    assert ranged.t_min == pytest.approx(1 / 11)
    for t in (0.0, 1.0):
        ranged.eta(x, t)
    torch.testing.assert_close(torch.stack(seen), torch.tensor([[10.0], [0.01]], dtype=F64).expand(2, 16))

    class HalfDenoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.bfloat16))

        def forward(self, y, sigma):
            return self.gain * y / (1 + sigma[:, None] ** 2)

    assert li.ve_denoiser_model(HalfDenoiser()).net_dtype == torch.bfloat16


@pytest.mark.parametrize("sigma, mean", [(0.5, 0.3), (4.0, -2.0)])
def test_one_lazy_euler_step_from_a_ve_denoiser_is_exact_on_gaussians(sigma, mean):
    """σ and E[X] are read from the denoiser by antithetic probes (its t_min is 1/81), and one lazy VP Euler step
    maps Z to σZ + μ."""
    target = li.GaussianMixture.gaussian(torch.full((4,), mean, dtype=F64), torch.tensor(sigma**2, dtype=F64))
    model = li.ve_denoiser_model(exact_ve_denoiser(target))
    z = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    out, info = li.sample(model, z, steps=1, schedule="lazy-vp", solver="euler", return_info=True)
    assert info.sigma == pytest.approx(sigma, rel=1e-9)
    torch.testing.assert_close(out, sigma * z + mean, rtol=0, atol=1e-9 * sigma)


def test_ve_denoiser_model_argument_errors():
    with pytest.raises(TypeError, match="denoise: expected a callable"):
        li.ve_denoiser_model(3)
    with pytest.raises(ValueError, match="sigma_min, sigma_max: need sigma_min < sigma_max"):
        li.ve_denoiser_model(lambda y, s: y, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(TypeError, match="sigma_max: expected a positive number"):
        li.ve_denoiser_model(lambda y, s: y, sigma_max="80")
    with pytest.raises(ValueError, match="sigma_min: expected a positive finite number"):
        li.ve_denoiser_model(lambda y, s: y, sigma_min=0.0)


def test_non_finite_network_output_is_reported():
    model = li.Model(lambda x, t: x * math.nan, "linear")
    with pytest.raises(li.NonFiniteError, match="t=0.25"):
        model.eta(torch.randn(2, 3), 0.25)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="predicts"):
        li.Model(lambda x, t: x, "linear", predicts="epsilon")
    with pytest.raises(TypeError, match="net"):
        li.Model(3, "linear")
    with pytest.raises(ValueError, match="schedule"):
        li.Model(lambda x, t: x, "banana")
    with pytest.raises(ValueError, match="net: output shape"):
        li.Model(lambda x, t: x[:, :1], "linear").eta(torch.randn(2, 3), 0.5)
    with pytest.raises(TypeError, match=r"net: expected a tensor output, got tuple; return the tensor itself"):
        li.Model(lambda x, t: (x,), "linear").eta(torch.randn(2, 3), 0.5)
    with pytest.raises(TypeError, match=r"net: expected a tensor output, got NoneType$"):
        li.Model(lambda x, t: None, "linear").eta(torch.randn(2, 3), 0.5)
    with pytest.raises(ValueError, match="t: expected"):
        li.Model(lambda x, t: x, "linear").raw(torch.randn(2, 3), torch.zeros(3))
    model = li.Model(lambda x, t: x, "linear")
    for call in (model.eta, model.raw, model.predict):
        for x in ([[0.0, 1.0]], torch.zeros(2, 3, dtype=torch.int64), torch.tensor(0.5), None):
            with pytest.raises(TypeError, match=r"x: expected a floating-point tensor of shape \(batch, ...\)"):
                call(x, 0.5)
        for t in (None, "0.5", [0.5, 0.5], True):
            with pytest.raises(TypeError, match="t: expected a time"):
                call(torch.randn(2, 3), t)
    assert model.eta(torch.randn(2, 3), np.float32(0.5))[1].shape == (2, 3)  # numpy scalars are numbers


def test_conversion_coefficients_are_numbers_or_one_per_sample():
    """to_eta and from_eta take α, β, α̇, β̇ as numbers, or tensors of one value or one per sample; any other shape
    or type is refused naming the coefficient (it had surfaced as torch's own shape or scalar-conversion error)."""
    x = torch.randn(4, 3, dtype=F64)
    good = (0.6, 0.4, -1.0, 1.0)
    per_sample = tuple(torch.full((4,), c, dtype=F64) for c in good)
    torch.testing.assert_close(li.to_eta("velocity", x, x, *per_sample), li.to_eta("velocity", x, x, *good))
    torch.testing.assert_close(li.from_eta("score", x, x, *per_sample), li.from_eta("score", x, x, *good))
    bad = [((torch.ones(4, 3, dtype=F64),), ValueError, r"alpha: expected a number or a tensor of shape \(4,\)"),
           ((0.6, torch.ones(3, dtype=F64)), ValueError, r"beta: .* one value per sample, got shape \(3,\)"),
           ((0.6, 0.4, "x"), TypeError, "dalpha: expected a number or a tensor, got str"),
           ((0.6, 0.4, -1.0, None), TypeError, "dbeta: expected a number or a tensor, got NoneType")]
    for prefix, error, message in bad:
        coefs = (*prefix, *good[len(prefix):])
        with pytest.raises(error, match=message):
            li.to_eta("noise", x, x, *coefs)
        with pytest.raises(error, match=message):
            li.from_eta("velocity", x, x, *coefs)


def test_mixture_fixture_is_anisotropic_with_nonzero_mean():
    g = make_mixture()
    eig = torch.linalg.eigvalsh(g.cov)
    assert float(eig.max() / eig.min()) > 1.5 and float(g.mean.norm()) > 0.3


def test_linear_combination_is_the_plain_sum_and_leaves_its_inputs_alone():
    from lazyinterp.predictors import linear_combination

    g = torch.Generator().manual_seed(0)
    x, u, v = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    x0 = x.clone()
    out = linear_combination([(0.3, u), (-1.7, v)], base=x)
    torch.testing.assert_close(out, x + 0.3 * u - 1.7 * v, rtol=1e-15, atol=1e-15)
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(linear_combination([(2.0, u), (0.5, v)]), 2 * u + 0.5 * v, rtol=1e-15, atol=1e-15)
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(-1, 1, 1)
    torch.testing.assert_close(linear_combination([(per_sample, u), (0.5, v)], base=x),
                               x + per_sample * u + 0.5 * v, rtol=1e-15, atol=1e-15)
    # A smaller operand broadcasts, and a wider dtype promotes, as in the plain expression.
    mean = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_combination([(1.0, u), (0.25, mean)]), u + 0.25 * mean)
    assert linear_combination([(1.0, mean), (1.0, u)]).shape == u.shape
    assert linear_combination([(1.0, u.float()), (1.0, v)]).dtype == torch.float64
    with pytest.raises(ValueError, match="terms"):
        linear_combination([])


def test_the_network_sees_a_clamped_time_of_its_own_dtype_for_a_scalar_time():
    seen = []

    def net(x, t):
        seen.append(t)
        return x

    model = li.Model(net, "linear", t_min=0.1)
    x = torch.randn(3, 2, dtype=torch.float64)
    model.raw(x, 0.0)
    model.raw(x, torch.tensor(0.5))
    model.raw(x, torch.tensor([0.05, 0.5, 0.9], dtype=torch.float64))
    assert [t.tolist() for t in seen] == [[0.1] * 3, [0.5] * 3, [0.1, 0.5, 0.9]]
    assert all(t.dtype == torch.float64 and t.shape == (3,) for t in seen)


def test_merge_terms_adds_the_coefficients_of_one_tensor():
    from lazyinterp.predictors import linear_combination, merge_terms

    u, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    same_values = u.clone()  # equal values, another tensor: kept apart
    terms = [(0.5, u), (2.0, v), (-0.25, u), (1.0, same_values)]
    merged = merge_terms(terms)
    assert [(c, id(t)) for c, t in merged] == [(0.25, id(u)), (2.0, id(v)), (1.0, id(same_values))]
    torch.testing.assert_close(linear_combination(merged), linear_combination(terms), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("kind", ["velocity", "noise", "data", "score"])
def test_eta_terms_evaluate_to_eta(kind, mixture):
    from lazyinterp.predictors import eta_terms, linear_combination

    """The linear combinations evaluate to the mixture's exact posterior means (Tweedie, closed form)."""
    x = torch.randn(6, 2, dtype=torch.float64)
    for schedule, t in ((li.vp(), 0.4), (li.lazy_vp(0.8), 0.7)):
        model = mixture.model(li.vp(), predicts=kind)
        predictor = model if schedule.name == "vp" else li.convert(model, schedule)
        eta_z, eta_x = eta_terms(predictor, x, t)
        exact = mixture.eta(x, schedule.alpha(t), schedule.beta(t))
        torch.testing.assert_close(linear_combination(eta_z), exact[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(linear_combination(eta_x), exact[1], rtol=1e-10, atol=1e-10)
