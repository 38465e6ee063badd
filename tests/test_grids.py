"""Time grids: uniform, SNR-matched, shifted and blended with a lazy schedule's own."""

import math

import pytest
import torch
from conftest import make_mixture

import lazyinterp as li
from lazyinterp.grids import GRID_SIGMA_RANGE, MATCHED_GRID_SIGMA_RANGE, make_grid, own_grid_weight, snr_matched_grid

F64 = torch.float64


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("target", [li.lazy_vp(0.6), li.point_mass(0.8), li.cosine()], ids=lambda s: s.name)
def test_grid_shift_divides_the_snr_of_every_node(target, shift):
    """grid="model" with grid_shift s: r(t_k) = r_lin(k/N)/s at every interior node; diffusers' shifted sigmas
    σ' = sσ/(1 + (s − 1)σ) give the same linear-schedule times, 1 − σ'."""

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
    from lazyinterp.bench import gmm_2d
    from lazyinterp.metrics import SlicedW2
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
    from lazyinterp.bench import gmm_2d
    from lazyinterp.metrics import SlicedW2

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
    from lazyinterp.metrics import SlicedW2

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
