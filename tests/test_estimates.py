"""E[X], σ and Σ from the model alone: exact on Gaussians, checked on mixtures, with clear refusals."""

import math
import sys
import warnings

import pytest
import torch
from conftest import gaussian, make_mixture

import lazyinterp as li

F64 = torch.float64


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


@pytest.mark.parametrize("estimate", [li.estimate_sigma, li.estimate_mean, li.estimate_moments],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape, kwargs, error, needle", [
    ((3,), {"probes": 0}, ValueError, "probes"),
    ((3,), {"probes": 2.0}, TypeError, "probes"),
    ((0, 3), {}, ValueError, "shape"),
    ((True,), {}, TypeError, "shape"),
    ((3.0,), {}, TypeError, "shape"),
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


def test_a_reading_that_no_lower_probe_confirms_is_returned_with_a_warning():
    """Data that read wider at every lower SNR (as modes far apart do, each lower probe seeing more of them) never
    give two agreeing readings; the search stops after its rounds with the last reading and a LowestSNRWarning
    instead of silently. A probe whose reading its lower check confirms returns without one."""
    from lazyinterp.estimates import _in_linear_regime

    def gaussian_slope(sigma: float, r: float) -> tuple:
        a = 1 / math.sqrt(1 + r * r)
        b = r * a
        return b * sigma**2 / (a * a + b * b * sigma**2), a, b, None, 0.0

    probed = []

    def widening(r: float) -> tuple:
        probed.append(r)
        return gaussian_slope(0.05 / math.sqrt(r), r)  # σ̂ doubles at every 4x lower SNR

    with pytest.warns(li.LowestSNRWarning, match="no reading was confirmed by a second one at a lower SNR"):
        sigma, _ = _in_linear_regime(widening, 0.1)
    assert len(probed) == 8 and sigma == pytest.approx(0.05 / math.sqrt(probed[-1]), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma, _ = _in_linear_regime(lambda r: gaussian_slope(3.0, r), 0.1)
    assert sigma == pytest.approx(3.0, rel=1e-9)
