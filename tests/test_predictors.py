import math
import warnings

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


def test_estimate_mean_and_sigma_are_exact_on_gaussians():
    for sigma, mean in ((0.4, 1.5), (2.0, -0.3)):
        g = li.GaussianMixture.gaussian(torch.full((4,), mean, dtype=F64), torch.tensor(sigma**2, dtype=F64))
        model = g.model("linear")
        mu = li.estimate_mean(model, (4,), dtype=F64)
        torch.testing.assert_close(mu, torch.full((4,), mean, dtype=F64), rtol=0, atol=1e-12)
        for snr in (0.1, 1.0, 5.0):
            assert li.estimate_sigma(model, (4,), snr=snr, dtype=F64) == pytest.approx(sigma, rel=1e-10)
    # Anisotropic: σ² is the mean eigenvalue of the covariance in the low-SNR limit.
    g = li.GaussianMixture.gaussian(torch.zeros(3, dtype=F64), torch.tensor([0.5, 1.0, 1.5], dtype=F64))
    est = li.estimate_sigma(g.model("linear"), (3,), snr=1e-3, probes=256, dtype=F64,
                            generator=torch.Generator().manual_seed(0))
    assert est == pytest.approx(1.0, rel=2e-2)


@pytest.mark.parametrize("trained_under", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("kind", li.KINDS)
@pytest.mark.filterwarnings("ignore::lazyinterp.LowestSNRWarning")  # σ = 1e3 from t_min: exact, with the warning
def test_moments_are_exact_on_gaussians_from_every_prediction_type(trained_under, kind):
    """No t = 0 evaluation (a noise or score network cannot give η_X there; under vp η_X(0, x) still depends on x):
    antithetic probes give μ and σ exactly at any scale."""
    for sigma, mean in ((1e-3, 5.0), (0.4, 1.5), (2.0, -0.3), (1e3, -200.0)):
        g = li.GaussianMixture.gaussian(torch.full((4,), mean, dtype=F64), torch.tensor(sigma**2, dtype=F64))
        model = g.model(trained_under, kind)
        mu, sig = li.estimate_moments(model, (4,), dtype=F64)
        torch.testing.assert_close(mu, torch.full((4,), mean, dtype=F64), rtol=0, atol=1e-9 * sigma)
        assert sig == pytest.approx(sigma, rel=1e-9)
        torch.testing.assert_close(li.estimate_mean(model, (4,), dtype=F64), mu, rtol=0, atol=1e-9 * sigma)
        assert li.estimate_sigma(model, (4,), dtype=F64) == pytest.approx(sigma, rel=1e-9)
        assert li.estimate_sigma(model, (4,), mean=mu, dtype=F64) == pytest.approx(sigma, rel=1e-9)


@pytest.mark.parametrize("trained_under", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("kind", li.KINDS)
def test_mean_of_anisotropic_data_far_from_zero_is_refined(trained_under, kind):
    """Antithetic probes give E[X] exactly for isotropic data; for N(μ, Σ) with Σ anisotropic the level's error
    β(K − kI)(c − μ)/(1 − kβ) only shrinks as the centre c approaches μ. With μ 130σ from 0 it was still 17σ off
    after the first probe and 10σ off as returned (the first probe's centre was kept); probes at data SNR 0.1
    now continue until one moves the centre by at most 1e-3 σ."""
    mean = torch.tensor([77.0, -265.0, -385.5], dtype=F64)
    g = li.GaussianMixture.gaussian(mean, torch.diag(torch.tensor([0.77, 2.74, 5.63], dtype=F64) ** 2))
    model = g.model(trained_under, kind)
    mu, sigma = li.estimate_moments(model, (3,), dtype=F64, generator=torch.Generator().manual_seed(0))
    assert float((mu - mean).abs().max()) < 1e-2 * sigma
    assert 2.0 < sigma < 6.0


def test_sigma_of_a_mixture_is_read_at_low_data_snr_whatever_its_scale():
    """For non-Gaussian data σ̂ is the low-SNR reading of √(tr Cov X / D). A fixed probe SNR r = 0.1 would sit at
    data SNR rσ = 2.4 for the mixture scaled by 20, where its posterior slope is steeper than any Gaussian's; the
    probe moves to rσ̂ ≈ 0.1 instead, for every prediction type."""
    base = make_mixture()
    w = base.weights.to(F64)
    for scale in (0.05, 1.0, 20.0):
        g = li.GaussianMixture(base.weights, base.means * scale, base.covs * scale**2)
        mu = (w[:, None] * g.means).sum(0)
        second = (w[:, None, None] * (g.covs + g.means[:, :, None] * g.means[:, None, :])).sum(0)
        sigma = math.sqrt(float(torch.trace(second - torch.outer(mu, mu))) / 2)
        for trained_under, kind in (("linear", "velocity"), ("linear", "noise"), ("vp", "noise"), ("cosine", "data")):
            model = g.model(trained_under, kind)
            gen = torch.Generator().manual_seed(0)
            assert li.estimate_sigma(model, (2,), probes=64, generator=gen, dtype=F64) == pytest.approx(sigma, rel=0.1)
            mean = li.estimate_mean(model, (2,), probes=64, generator=torch.Generator().manual_seed(0), dtype=F64)
            assert float((mean - mu).norm()) < 0.05 * sigma


@pytest.mark.parametrize("components, dim, spread, width", [(3, 4, 50.0, 0.01), (4, 8, 30.0, 0.02)])
@pytest.mark.parametrize("kind", ["velocity", "noise"])
def test_sigma_of_large_data_with_narrow_modes_is_checked_at_a_lower_snr(components, dim, spread, width, kind):
    """σ ≈ 30–40 with modes 1–2% as wide: at the first probe the data SNR is already past the point where the
    posterior picks a mode, and the slope there read as σ̂ ≈ 0.01–0.1 σ. The check at a 4× lower SNR disagrees,
    and the search continues until two readings agree."""
    gen = torch.Generator().manual_seed(0)
    means = spread * torch.randn(components, dim, generator=gen, dtype=F64)
    target = li.GaussianMixture(torch.ones(components), means,
                                torch.full((components,), (spread * width) ** 2, dtype=F64))
    sigma = math.sqrt(float(target.cov.trace()) / dim)
    _, info = li.sample(target.model("linear", kind), torch.randn(2, dim, dtype=F64), schedule="lazy-vp", steps=1,
                        return_info=True)
    assert 0.7 < info.sigma / sigma < 1.4, info.sigma / sigma


@pytest.mark.parametrize("trained_under", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("kind", li.KINDS)
def test_sigma_of_small_offset_data_is_read_in_float32(trained_under, kind):
    """Data of scale 1e-4 sitting 30σ from 0, probed in float32: at the first probe (r = 0.1, data SNR 1e-5) the
    slope is below the rounding of η_X ≈ μ and some probes read it ≤ 0, which no posterior mean has. The probe
    moves to a higher SNR, not a lower one, and σ is read where the probes resolve it: within 0.1% on the linear and
    cosine schedules, within 10% on vp, whose conversions near t = 1, where this data's SNR 0.1 lies, lose float32
    digits (float64 is exact, test above)."""
    sigma, dim = 1e-4, 16
    g = li.GaussianMixture.gaussian(torch.full((dim,), 30 * sigma, dtype=F64), torch.tensor(sigma**2, dtype=F64))
    model = g.model(trained_under, kind)
    gen = torch.Generator().manual_seed(0)
    mu, sig = li.estimate_moments(model, (dim,), generator=gen, dtype=torch.float32)
    tolerance = 0.15 if trained_under == "vp" else 0.005
    assert sig == pytest.approx(sigma, rel=tolerance)
    assert float((mu.double() - 30 * sigma).abs().max()) < 1e-3 * sigma
    assert li.estimate_sigma(model, (dim,), generator=gen, dtype=torch.float32) == pytest.approx(sigma, rel=tolerance)
    _, info = li.sample(model, shape=(4, dim), schedule="point-mass", steps=2, generator=0, return_info=True)
    assert info.sigma == pytest.approx(sigma, rel=tolerance)


@pytest.mark.parametrize("trained_under, kind", [("linear", "noise"), ("cosine", "score"), ("linear", "data")])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_probe_far_outside_the_data_is_read_again_with_noise_reaching_back(trained_under, kind, dtype):
    """Two modes of width 1, 335 apart, the nearer 300 from 0 (σ ≈ 104). The first antithetic probe, centred at 0
    with noise 10, sits hundreds of widths outside the data: its posterior sees the nearer mode only, and the check
    4× lower, from that mode, cannot see the other, so σ̂ and E[X] were that mode's (σ̂ = 1% of σ, E[X] 1.7σ off).
    The probe's centre moved by far more than the data's marginal width there, so it is read again with noise of
    that distance: σ within 25% (float64 5%), E[X] within 1% of σ."""
    means = torch.tensor([[300.0, 0.0], [480.0, 240.0]], dtype=F64)
    target = li.GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), means, torch.ones(2, dtype=F64))
    sigma = math.sqrt(float(target.cov.trace()) / 2)
    model = target.model(trained_under, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mu, sig = li.estimate_moments(model, (2,), probes=64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert sig == pytest.approx(sigma, rel=0.25)
    assert float((mu.double() - target.mean).norm()) < 0.01 * sigma


def test_estimate_warns_where_the_model_does_not_reach_the_data_low_snr():
    """Two modes of width 1000, 10⁴ apart (σ ≈ 3750). A noise or score network is evaluated no lower than SNR 1e-3
    (its t_min) and a vp network no lower than β₀/α₀ ≈ 6.6e-3, where this data's SNR is 3.7–25: past the point
    where the posterior picks a mode, so the probes read one mode's scale. That reading is returned with a
    LowestSNRWarning instead of silently; velocity and data networks on the linear and cosine schedules reach SNR 0
    and read σ without one. A Gaussian of the same scale is still read exactly."""
    means = torch.tensor([[0.0, 0.0], [10.0, 3.0]], dtype=F64) * 1000
    target = li.GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), means, torch.full((2,), 1000.0**2, dtype=F64))
    sigma = math.sqrt(float(target.cov.trace()) / 2)
    gauss = li.GaussianMixture.gaussian(torch.full((2,), 500.0, dtype=F64), torch.tensor(3000.0**2, dtype=F64))
    for trained_under, kind in (("linear", "noise"), ("cosine", "score"), ("vp", "velocity"), ("vp", "data")):
        with pytest.warns(li.LowestSNRWarning, match="sigma: the model is not evaluated below SNR"):
            _, sig = li.estimate_moments(target.model(trained_under, kind), (2,), dtype=F64)
        assert sig < 0.5 * sigma
        with pytest.warns(li.LowestSNRWarning):
            mu, sig = li.estimate_moments(gauss.model(trained_under, kind), (2,), dtype=F64)
        assert sig == pytest.approx(3000.0, rel=1e-9) and float((mu - 500).abs().max()) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for trained_under, kind in (("linear", "velocity"), ("cosine", "data")):
            # 64 probe directions: 8 in 2-d read this anisotropic data's mean eigenvalue 27% high
            _, sig = li.estimate_moments(target.model(trained_under, kind), (2,), probes=64, dtype=F64,
                                         generator=torch.Generator().manual_seed(0))
            assert sig == pytest.approx(sigma, rel=0.1)
        for trained_under in ("linear", "vp", "cosine"):  # data of unit scale: every model reaches its low SNR
            for kind in li.KINDS:
                li.estimate_moments(make_mixture().model(trained_under, kind), (2,), dtype=F64)


def test_a_model_with_no_gaussian_reading_asks_for_sigma():
    """A posterior mean that falls as x grows (slope k < 0, as from an untrained network) admits no σ."""
    for trained_under in ("linear", "vp"):
        model = li.Model(lambda x, t: -x, trained_under, predicts="data")
        with pytest.raises(ValueError, match="could not estimate sigma.*pass sigma"):
            li.estimate_sigma(model, (3,), dtype=F64)
        with pytest.raises(ValueError, match="pass sigma"):
            li.sample(model, torch.randn(4, 3, dtype=F64), steps=2, schedule="lazy-vp")
        out = li.sample(model, torch.randn(4, 3, dtype=F64), steps=2, schedule=li.lazy_vp(1.0))
        assert bool(torch.isfinite(out).all())
    # Only the missing σ is set aside: an error of the network itself is not taken for one.
    broken = li.Model(lambda x, t: x[:, :2], "vp", predicts="data")
    with pytest.raises(ValueError, match="net: output shape"):
        li.estimate_mean(broken, (3,), dtype=F64)


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


@pytest.mark.parametrize("estimate", [li.estimate_sigma, li.estimate_mean, li.estimate_moments],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape, kwargs, error, needle", [
    ((3,), {"probes": 0}, ValueError, "probes"),
    ((3,), {"probes": 2.0}, ValueError, "probes"),
    ((0, 3), {}, ValueError, "shape"),
    ((True,), {}, ValueError, "shape"),
    (5, {}, TypeError, "shape"),
])
def test_estimators_refuse_bad_shapes_and_probe_counts(estimate, shape, kwargs, error, needle):
    model = li.GaussianMixture.gaussian(torch.zeros(3), torch.tensor(1.0)).model("linear")
    with pytest.raises(error, match=needle):
        estimate(model, shape, **kwargs)


@pytest.mark.parametrize("estimate", [li.estimate_sigma, li.estimate_mean, li.estimate_moments],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("predictor", [None, 3.0, lambda x, t: x], ids=["None", "float", "bare network"])
def test_estimators_refuse_what_is_not_a_model(estimate, predictor):
    with pytest.raises(TypeError, match=r"predictor: expected an li.Model \(or a predictor with .eta and .schedule\)"):
        estimate(predictor, (3,))


@pytest.mark.parametrize("estimate", [li.estimate_sigma, li.estimate_moments], ids=lambda f: f.__name__)
@pytest.mark.parametrize("snr", [0.0, -0.1, math.nan])
def test_estimators_refuse_a_probe_snr_that_is_not_positive(estimate, snr):
    model = li.GaussianMixture.gaussian(torch.zeros(3), torch.tensor(1.0)).model("linear")
    with pytest.raises(ValueError, match="snr"):
        estimate(model, (3,), snr=snr)
