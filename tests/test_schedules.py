import math

import numpy as np
import pytest
import torch
from conftest import all_schedules

import lazyinterp as li

F64 = torch.float64
INTERIOR = torch.linspace(0.01, 0.99, 99, dtype=F64)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_derivatives_match_autograd(sched):
    auto = li.Schedule(sched._alpha, sched._beta, check=False)  # derivatives by autograd only
    torch.testing.assert_close(sched.dalpha(INTERIOR), auto.dalpha(INTERIOR), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sched.dbeta(INTERIOR), auto.dbeta(INTERIOR), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_snr_inverse_round_trip(sched):
    r = sched.snr(INTERIOR)
    assert bool((torch.diff(r) > 0).all())
    torch.testing.assert_close(sched.snr_inverse(r), INTERIOR, rtol=0, atol=1e-12)
    bisected = li.Schedule(sched._alpha, sched._beta, check=False).snr_inverse(r)
    torch.testing.assert_close(bisected, INTERIOR, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_boundaries(sched):
    assert float(sched.alpha(1.0)) == pytest.approx(0.0, abs=1e-15)
    assert float(sched.beta(1.0)) == pytest.approx(1.0, abs=1e-15)
    assert float(sched.snr(0.0)) == pytest.approx(0.0, abs=7e-3)  # vp's beta(0) is small, not 0
    assert math.isinf(float(sched.snr(1.0)))
    assert float(sched.snr_inverse(math.inf)) == 1.0
    assert float(sched.snr_inverse(0.0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_snr_inverse_of_huge_ratios_is_the_data_end(sched):
    """r² overflows float64 from r ≈ 1.3e154; the inverse must still be the t = 1 end, not the noise end."""
    t = sched.snr_inverse(torch.tensor([1e100, 1e200, 1e300], dtype=F64))
    assert bool((t > 1 - 1e-6).all()), t


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [-1.0, -1e-300, math.nan])
def test_snr_inverse_refuses_negative_or_nan_ratios(sched, bad):
    with pytest.raises(ValueError, match="r: expected signal-to-noise ratios"):
        sched.snr_inverse(torch.tensor([0.5, bad], dtype=F64))


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_coefficients_refuse_non_finite_times(sched, bad):
    for method in (sched.alpha, sched.beta, sched.dalpha, sched.dbeta, sched.snr):
        with pytest.raises(ValueError, match="t: expected finite times"):
            method(torch.tensor([0.5, bad], dtype=F64))
        with pytest.raises(ValueError, match="t: expected finite times"):
            method(bad)


def test_vp_start_is_documented_truncation():
    sched = li.vp(0.1, 20.0)
    assert float(sched.beta(0.0)) == pytest.approx(math.exp(-(0.1 + 0.5 * 19.9) / 2), rel=1e-12)
    assert float(sched.alpha(0.0)) ** 2 + float(sched.beta(0.0)) ** 2 == pytest.approx(1.0, abs=1e-14)


def test_optimal_diffusion_closed_forms():
    t = INTERIOR
    torch.testing.assert_close(li.linear().optimal_diffusion(t), (1 - t) / t, rtol=1e-12, atol=0)
    torch.testing.assert_close(li.cosine().optimal_diffusion(t), (math.pi / 2) / torch.tan(math.pi * t / 2),
                               rtol=1e-12, atol=0)
    for sigma in (0.3, 1.0, 2.5):
        pm = li.point_mass(sigma)
        generic = li.Schedule(pm._alpha, pm._beta, check=False)
        expected = torch.full_like(t, sigma**2 / 2)  # σ² β̇ / 2 with β = t
        torch.testing.assert_close(pm.optimal_diffusion(t), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(generic.optimal_diffusion(t), expected, rtol=1e-10, atol=0)


def test_lazy_vp_variance_is_constant():
    for sigma in (0.2, 1.0, 3.0):
        s = li.lazy_vp(sigma)
        v = s.alpha(INTERIOR) ** 2 + sigma**2 * s.beta(INTERIOR) ** 2
        torch.testing.assert_close(v, torch.full_like(v, sigma**2), rtol=1e-14, atol=0)


def test_point_mass_is_a_point_mass():
    s = li.point_mass(0.8)
    assert s.base == "point_mass"
    assert float(s.alpha(0.0)) == 0.0 and float(s.beta(0.0)) == 0.0
    assert float(s.snr(0.0)) == 0.0


def test_point_mass_drift_coefficients_match_generic_form():
    pm = li.point_mass(0.7)
    generic = li.Schedule(pm._alpha, pm._beta, check=False)
    for t in (0.05, 0.3, 0.45):
        for kappa in (0.5, 1.0, 2.0):
            assert pm.drift_coefficients(t, kappa) == pytest.approx(generic.drift_coefficients(t, kappa),
                                                                    rel=1e-9)
    # κ = 1: bounded at t = 0 with b*(0, 0) = β̇_0 E[X], i.e. B(0) = 1.
    assert pm.drift_coefficients(0.0, 1.0) == (-1.0, 1.0)
    assert generic.drift_coefficients(0.0, 1.0) == pytest.approx((-1.0, 1.0), abs=1e-6)


def test_custom_schedule_validation():
    with pytest.raises(ValueError, match="SNR"):
        li.Schedule(lambda t: (1 - t) * (1 + 200 * t**2 * (1 - t)), lambda t: t)
    with pytest.raises(ValueError, match="boundary"):
        li.Schedule(lambda t: 1 - t, lambda t: 0.5 + 0.5 * t)
    with pytest.raises(ValueError, match="boundary"):
        li.Schedule(lambda t: 1 - 0.5 * t, lambda t: t)
    with pytest.raises(TypeError, match="alpha"):
        li.Schedule(1.0, lambda t: t)


def test_schedule_names_and_errors():
    assert li.get_schedule("lazy-vp").name.startswith("lazy_vp")
    assert li.get_schedule("point_mass").base == "point_mass"
    with pytest.raises(ValueError, match="schedule: unknown schedule 'nope'"):
        li.get_schedule("nope")
    with pytest.raises(TypeError, match="schedule"):
        li.get_schedule(3)
    with pytest.raises(ValueError, match="sigma"):
        li.lazy_vp(-1.0)
    with pytest.raises(TypeError, match="sigma"):
        li.point_mass("1")
    for unresolved in (lambda: li.lazy_vp().alpha(0.5), lambda: li.lazy_vp().dbeta(0.5),
                       lambda: li.snr_matched_grid(4, li.lazy_vp()), lambda: li.point_mass().snr_inverse(1.0)):
        with pytest.raises(ValueError, match="sigma is None"):
            unresolved()
    with pytest.raises(TypeError, match="t: expected a time"):
        li.linear().alpha("half")
    assert torch.equal(li.cosine().alpha(np.float32(0.25)), li.cosine().alpha(0.25))
    assert torch.equal(li.cosine().beta(1), li.cosine().beta(torch.tensor(1.0)))
    with pytest.raises(ValueError, match="beta_min"):
        li.vp(5.0, 1.0)


def test_remembered_scalar_values_equal_fresh_ones_and_are_not_shared():
    sched = li.lazy_vp(0.7)
    fresh = li.lazy_vp(0.7)
    for t in (0.0, 0.25, 1.0):
        first = sched.alpha(t)
        first += 1.0  # a caller changing its tensor must not change what the schedule remembers
        assert torch.equal(sched.alpha(t), fresh.alpha(torch.tensor(t, dtype=torch.float64)))
        assert torch.equal(sched.dbeta(t), fresh.dbeta(torch.tensor([t], dtype=torch.float64))[0])


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_regular_time_is_the_same_for_scalars_and_batches(sched):
    """A scalar time and the same time in a batch move inside alike: only where α̇ or β̇ is infinite (vp at 1, a
    point mass at 0), by END_OFFSET."""
    times = torch.tensor([0.0, 1e-12, 0.3, 0.5, 1 - 1e-12, 1.0], dtype=torch.float64)
    batch = sched.regular_time(times)
    for t, expected in zip(times, batch, strict=True):
        assert float(sched.regular_time(float(t))) == float(expected), float(t)
    moved = {float(t) for t, r in zip(times, batch, strict=True) if float(r) != float(t)}
    infinite = {float(t) for t in times
                if not (math.isfinite(float(sched.dalpha(t))) and math.isfinite(float(sched.dbeta(t))))}
    assert moved == infinite


def test_resolve_returns_one_member_per_sigma():
    """Resolving a family at the same σ gives the same object (its remembered values serve every call); another
    σ gives another member."""
    family = li.lazy_vp(None)
    first = family.resolve(0.7)
    assert family.resolve(0.7) is first and li.point_mass(None).resolve(0.7) is not first
    assert family.resolve(0.8) is not first
    assert float(first.alpha(0.25)) == pytest.approx(0.7 * math.cos(math.pi / 8), rel=1e-15)
    for sigma, error in (("0.7", TypeError), (None, TypeError), (-0.7, ValueError), (math.nan, ValueError)):
        with pytest.raises(error, match="sigma: expected a positive"):
            family.resolve(sigma)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_scalar_coefficients_are_the_batch_values_at_the_regular_time(sched):
    times = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=F64)
    regular = sched.regular_time(times)
    batch = torch.stack([sched.alpha(regular), sched.beta(regular), sched.dalpha(regular), sched.dbeta(regular)])
    for i, t in enumerate(times.tolist()):
        values = sched.scalar_coefficients(t)
        assert all(isinstance(v, float) for v in values)
        assert values == tuple(batch[:, i].tolist())
        assert sched.scalar_coefficients(t) is values  # remembered


def test_a_name_gives_one_schedule_object():
    """A model trained under "linear" and a sampler asked for "linear" share the object, so the conversion between
    them is the identity and remembered values serve every call."""
    for name in li.SCHEDULES:
        assert li.get_schedule(name) is li.get_schedule(name.replace("-", "_").upper())
    model = li.Model(lambda x, t: x, "linear")
    assert li.convert(model, "linear") is model


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (li.linear(), "CondOTScheduler", {}), (li.cosine(), "CosineScheduler", {}), (li.vp(), "VPScheduler", {}),
    (li.vp(0.5, 12.0), "VPScheduler", {"beta_min": 0.5, "beta_max": 12.0})],
    ids=["linear", "cosine", "vp", "vp-0.5-12"])
def test_schedules_are_flow_matchings_with_the_coefficients_renamed(ours, theirs, kwargs):
    """flow_matching (and SiT's transport) write x_t = σ_t x_0 + α_t x_1 with x_0 the noise and t = 1 at the data:
    their σ_t is our α_t (the noise's coefficient), their α_t our β_t, and their SNR α_t/σ_t our r = β/α."""
    scheduler = pytest.importorskip("flow_matching.path.scheduler")
    them = getattr(scheduler, theirs)(**kwargs)
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    out = them(t)
    torch.testing.assert_close(ours.alpha(t), out.sigma_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.beta(t), out.alpha_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.dalpha(t), out.d_sigma_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.dbeta(t), out.d_alpha_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.snr(t), out.alpha_t / out.sigma_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(them.snr_inverse(ours.snr(t)), t, rtol=0, atol=1e-9)
