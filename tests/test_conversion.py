import math

import pytest
import torch
import torchdiffeq
from conftest import all_schedules, make_mixture

import lazyinterp as li
from lazyinterp.conversion import time_change
from lazyinterp.predictors import coefficients

F64 = torch.float64
TIMES = [0.03, 0.2, 0.5, 0.8, 0.97]
TARGETS = [s for s in all_schedules() if s.name != "linear"]


def targets_and_sources():
    return [(src, tgt) for src in (li.linear(), li.cosine(), li.vp()) for tgt in TARGETS if src.name != tgt.name]


def in_range(source, target):
    """Times whose SNR the source schedule reaches (vp's SNR starts above 0)."""
    return [t for t in TIMES if float(target.snr(t)) >= float(source.snr(0.0))]


@pytest.mark.parametrize("target", TARGETS, ids=lambda s: s.name)
@pytest.mark.parametrize("data", ["gaussian", "mixture"])
def test_converted_linear_model_reproduces_target_predictors(target, data):
    """Theory §6.4: converting the exact linear model gives the target schedule's exact predictors."""
    g = li.GaussianMixture.gaussian(torch.tensor([0.0, 0.0], dtype=F64), torch.tensor(0.49, dtype=F64)) \
        if data == "gaussian" else make_mixture()
    converted = li.convert(g.model("linear"), target)
    x = g.sample(32, torch.Generator().manual_seed(0)) * 0.7
    for t in TIMES:
        eta_z, eta_x = converted.eta(x, t)
        a, b = float(target.alpha(t)), float(target.beta(t))
        exact_z, exact_x = g.eta(x, a, b)
        torch.testing.assert_close(eta_x, exact_x, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eta_z, exact_z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("source,target", targets_and_sources(), ids=lambda s: s.name)
def test_velocity_and_score_transfer_formulas(source, target, mixture):
    """b'(t, x) = (ċ/c) x + c τ̇ b(τ, x/c) and s'(t, x) = s(τ, x/c)/c, with exact τ̇ and ċ."""
    x = mixture.sample(16, torch.Generator().manual_seed(1))
    for t in in_range(source, target):
        tau, c = (float(v) for v in li.time_change(source, target, t))
        dtau, dc = (float(v) for v in li.time_change_derivatives(source, target, t))
        b_src = mixture.predict(x / c, tau, source, "velocity")
        s_src = mixture.predict(x / c, tau, source, "score")
        torch.testing.assert_close((dc / c) * x + c * dtau * b_src, mixture.predict(x, t, target, "velocity"),
                                   rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(s_src / c, mixture.predict(x, t, target, "score"), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("source,target", targets_and_sources(), ids=lambda s: s.name)
def test_time_change_derivatives_are_exact(source, target):
    """τ̇ and ċ agree with autograd through the closed-form time change (no finite differences)."""
    t = torch.tensor(in_range(source, target), dtype=F64, requires_grad=True)
    tau, c = li.time_change(source, target, t.detach())
    dtau, dc = li.time_change_derivatives(source, target, t.detach())

    def tau_fn(tt):
        return source._snr_inverse(target._beta(tt) / target._alpha(tt))

    (auto_dtau,) = torch.autograd.grad(tau_fn(t).sum(), t)
    torch.testing.assert_close(dtau, auto_dtau, rtol=1e-9, atol=1e-12)
    # c from either coefficient: α'/α(τ) = β'/β(τ).
    torch.testing.assert_close(c, target.alpha(t.detach()) / source.alpha(tau), rtol=1e-10, atol=0)
    torch.testing.assert_close(c, target.beta(t.detach()) / source.beta(tau), rtol=1e-10, atol=0)

    def c_fn(tt):
        return (target._alpha(tt) + target._beta(tt)) / (source._alpha(tau_fn(tt)) + source._beta(tau_fn(tt)))

    (auto_dc,) = torch.autograd.grad(c_fn(t).sum(), t)
    torch.testing.assert_close(dc, auto_dc, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("target", [li.cosine(), li.point_mass(1.0), li.point_mass(0.6), li.lazy_vp(0.5), li.vp()],
                         ids=lambda s: s.name)
def test_optimal_diffusion_maps_to_optimal_diffusion(target):
    """Theory §6.7: c² τ̇ ε*(τ) = ε'*."""
    source = li.linear()
    t = torch.tensor(TIMES, dtype=F64)
    mapped = li.converted_diffusion(source, target, source.optimal_diffusion, t)
    torch.testing.assert_close(mapped, target.optimal_diffusion(t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", [li.cosine(), li.lazy_vp(0.6), li.vp()], ids=lambda s: s.name)
def test_pathwise_ode_equivalence(target, mixture):
    """Theory §6.5: from the same Z, the fine ODE solutions under both schedules give the same sample."""
    z = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    source_model = mixture.model("linear")

    def solve(predictor, t0, t1, x0):
        dyn = li.samplers.Dynamics(predictor, li.samplers.resolve_diffusion("ode", predictor.schedule))
        f = lambda t, x: dyn.drift(x, float(t))  # noqa: E731
        return torchdiffeq.odeint(f, x0, torch.tensor([t0, t1], dtype=F64), method="dopri5",
                                  rtol=1e-11, atol=1e-11)[-1]

    # The target starts at t = 0 with state c_0 X_{τ(0)}; the source starts at τ(0) (0, except for vp, whose
    # SNR starts above 0) from the same point X_{τ(0)}, so both solve for the same path.
    t_src0 = float(li.time_change(li.linear(), target, 0.0)[0])
    x_src0 = (1 - t_src0) * z if t_src0 > 0 else z
    x_lin = solve(source_model, t_src0, 1.0, x_src0)
    x_tgt0 = float(li.time_change(li.linear(), target, 0.0)[1]) * x_src0
    x_tgt = solve(li.convert(source_model, target), 0.0, 1.0, x_tgt0)
    torch.testing.assert_close(x_tgt, x_lin, rtol=1e-7, atol=1e-7)


def test_sde_path_map_error_shrinks_like_h(mixture):
    """Theory §6.6: with coupled Brownian increments, Y_T − c_T X_{τ(T)} = O(h) under Euler–Maruyama."""
    source, target = li.linear(), li.cosine()
    src_model = mixture.model(source)
    tgt_model = li.convert(src_model, target)
    t_start, t_end = 0.25, 0.9
    gen = torch.Generator().manual_seed(3)
    x0 = mixture.sample(400, gen) * t_start + (1 - t_start) * torch.randn(400, 2, dtype=F64, generator=gen)
    n_fine = 2048
    dw_fine = torch.randn(n_fine, 400, 2, dtype=F64, generator=gen) * math.sqrt(1 / n_fine)
    errors = []
    for n in (32, 64, 128):
        # Source grid: uniform in s on [t_start, t_end]; its increments are sums of the fine ones.
        s = torch.linspace(t_start, t_end, n + 1, dtype=F64)
        dw_unit = dw_fine.reshape(n, n_fine // n, 400, 2).sum(1)  # N(0, 1/n) per interval
        dw = dw_unit * torch.sqrt(torch.diff(s) * n).view(-1, 1, 1)
        drift_src = li.samplers.Dynamics(src_model, li.samplers.resolve_diffusion("optimal", source)).drift
        eps_src = lambda t: float(source.optimal_diffusion(t))  # noqa: E731
        path = [x0]
        for k in range(n):
            h = float(s[k + 1] - s[k])
            path.append(path[-1] + h * drift_src(path[-1], float(s[k])) + math.sqrt(2 * eps_src(float(s[k]))) * dw[k])
        converted = li.convert_path(torch.stack(path), s, source, target, increments=dw)
        drift_tgt = li.samplers.Dynamics(tgt_model, li.samplers.resolve_diffusion("optimal", target)).drift
        y = converted.path[0]
        t = converted.grid
        for k in range(n):
            h = float(t[k + 1] - t[k])
            eps = float(target.optimal_diffusion(float(t[k])))
            y = y + h * drift_tgt(y, float(t[k])) + math.sqrt(2 * eps) * converted.increments[k] / 1.0
        errors.append(float((y - converted.path[-1]).norm(dim=1).mean()))
    assert errors[0] > errors[1] > errors[2]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 1.6 < coarse / fine < 2.6, errors


def test_convert_path_maps_states_and_grid():
    source, target = li.linear(), li.point_mass(0.8)
    s = torch.linspace(0, 1, 9, dtype=F64)
    path = torch.randn(9, 3, 2, dtype=F64)
    out = li.convert_path(path, s, source, target)
    torch.testing.assert_close(li.time_change(source, target, out.grid)[0], s, rtol=0, atol=1e-12)
    assert torch.equal(out.path[0], torch.zeros_like(path[0]))  # the point mass: c_0 = 0
    torch.testing.assert_close(out.path[-1], path[-1], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="grid"):
        li.convert_path(path, s.flip(0), source, target)
    with pytest.raises(ValueError, match="increments"):
        li.convert_path(path, s, source, target, increments=torch.zeros(3, 3, 2))


def test_point_mass_start_evaluates_the_model_at_zero(mixture):
    """At a point mass's t = 0, x/c is 0/0: the source is evaluated at τ = 0, y = 0, giving η_X = E[X]."""
    converted = li.convert(mixture.model("linear"), li.point_mass(1.0))
    _, eta_x = converted.eta(torch.zeros(4, 2, dtype=F64), 0.0)
    torch.testing.assert_close(eta_x, mixture.mean.expand(4, 2), rtol=0, atol=1e-12)


def test_noise_predicting_vp_model_converts_like_velocity(mixture):
    """A VP ε-prediction model converted to lazy VP matches the exact lazy-VP predictors inside (0, 1)."""
    target = li.lazy_vp(0.9)
    converted = li.convert(mixture.model(li.vp(), "noise"), target)
    x = mixture.sample(8, torch.Generator().manual_seed(5))
    for t in (0.2, 0.5, 0.9):
        eta_z, eta_x = converted.eta(x, t)
        exact_z, exact_x = mixture.eta(x, float(target.alpha(t)), float(target.beta(t)))
        torch.testing.assert_close(eta_x, exact_x, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eta_z, exact_z, rtol=1e-9, atol=1e-9)
    assert coefficients(target, 0.5)[0] > 0


def test_schedules_by_name_and_bad_arguments():
    tau, scale = time_change("linear", "cosine", 0.3)
    expected = time_change(li.linear(), li.cosine(), 0.3)
    assert torch.equal(tau, expected[0]) and torch.equal(scale, expected[1])
    model = make_mixture().model("linear")
    x = torch.randn(3, 2, dtype=F64)
    assert torch.equal(li.convert(model, "cosine").eta(x, 0.4)[1], li.convert(model, li.cosine()).eta(x, 0.4)[1])
    with pytest.raises(ValueError, match="schedule: unknown schedule"):
        li.convert(model, "banana")
    with pytest.raises(TypeError, match="predictor: expected an li.Model"):
        li.convert(3, "linear")
    with pytest.raises(ValueError, match="target: unknown schedule"):
        time_change("linear", "banana", 0.5)
    with pytest.raises(TypeError, match="source: expected a Schedule"):
        li.converted_diffusion(1.0, "cosine", lambda t: t, 0.5)
    with pytest.raises(TypeError, match=r"epsilon_source: expected a callable eps\(t\), got float"):
        li.converted_diffusion("linear", "cosine", 0.5, 0.5)


def test_remembered_scalar_time_changes_are_the_computed_ones():
    """time_change remembers scalar results per schedule pair: a repeat gives the value of the batch evaluation
    at that time, and changing a returned tensor does not change what is remembered."""
    source, target = li.linear(), li.lazy_vp(0.6)
    times = torch.tensor([0.0, 0.2, 0.55, 0.9, 1.0], dtype=torch.float64)
    tau_batch, scale_batch = time_change(source, target, times)
    for _ in range(2):
        for t, tau_b, scale_b in zip(times, tau_batch, scale_batch, strict=True):
            tau, scale = time_change(source, target, float(t))
            assert float(tau) == pytest.approx(float(tau_b), rel=1e-14, abs=1e-15)
            assert float(scale) == pytest.approx(float(scale_b), rel=1e-14, abs=1e-15)
            tau.fill_(-1.0)
            scale.fill_(-1.0)
