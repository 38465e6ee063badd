import math
from collections import OrderedDict

import pytest
import torch
from conftest import make_mixture

import lazyinterp as li
from lazyinterp import covariance as covariance_module
from lazyinterp.covariance import Covariance, CovarianceLazyDynamics
from lazyinterp.predictors import CenteredModel

F64 = torch.float64


def anisotropic_gaussian(dim: int = 4, seed: int = 0) -> tuple[li.GaussianMixture, torch.Tensor, torch.Tensor]:
    """N(μ, Σ) with a rotated Σ whose eigenvalues span two decades, and a non-zero mean."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=gen))
    cov = q @ torch.diag(torch.logspace(-1, 1, dim, dtype=F64)) @ q.T
    mean = torch.randn(dim, dtype=F64, generator=gen)
    return li.GaussianMixture.gaussian(mean, cov), mean, cov


def matrix_sqrt(cov: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("solver", ["euler", "ab2", "ab2-pc", "heun"])
def test_covariance_matched_lazy_vp_is_exact_on_anisotropic_gaussians(steps, solver):
    """On N(μ, Σ) the drift in covariance-matched lazy coordinates is zero: Z ↦ μ + Σ^{1/2} Z exactly, where the
    scalar lazy VP schedule is not exact."""
    target, mean, cov = anisotropic_gaussian()
    model = target.model("linear")
    z = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    exact = mean + z @ matrix_sqrt(cov)
    for covariance in (cov, Covariance.from_matrix(cov)):
        out = li.sample(model, z, schedule="lazy-vp", solver=solver, steps=steps, covariance=covariance)
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    scalar = li.sample(model, z, schedule="lazy-vp", solver=solver, steps=steps)
    assert float((scalar - exact).abs().max()) > 1e-2


def test_isotropic_covariance_is_the_scalar_lazy_vp_schedule(mixture):
    """Σ = σ² I gives the scalar lazy VP schedule's samples, on non-Gaussian data too."""
    model = mixture.model("linear")
    z = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    sigma = 0.8
    for solver in ("euler", "ab2", "heun"):
        scalar = li.sample(model, z, schedule=li.lazy_vp(sigma), solver=solver, steps=5)
        matched = li.sample(model, z, schedule=li.lazy_vp(sigma), solver=solver, steps=5,
                            covariance=sigma**2 * torch.eye(2, dtype=F64))
        torch.testing.assert_close(matched, scalar, rtol=1e-12, atol=1e-12)


def test_covariance_matched_path_is_the_models_path(mixture):
    """Theory §6.5 for the matrix time change: from the same noise a fine solve in covariance-matched coordinates
    ends where a fine linear-schedule solve does (Y_0 = Σ^{1/2} Z is the model's X_0 = Z)."""
    model = mixture.model("linear")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    reference = li.sample(model, z, schedule="linear", solver="heun", steps=800)
    matched = li.sample(model, z, schedule="lazy-vp", solver="ab2-pc", steps=800, covariance=mixture.cov)
    assert float((matched - reference).abs().max()) < 1e-4
    coarse = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=4, covariance=mixture.cov)
    assert float((coarse - reference).abs().max()) > 1e-2  # the check can fail: a coarse solve does not pass


def test_coefficients_are_lazy_and_their_derivatives_exact():
    """A_k² + λ_k B_k² = λ_k at a common SNR, and (Ȧ, Ḃ) equal autograd derivatives of A(t), B(t)."""
    target, mean, cov = anisotropic_gaussian(3)
    covariance = Covariance.from_matrix(cov)
    sigma = math.sqrt(covariance.mean_eigenvalue)
    schedule = li.lazy_vp(sigma)
    dynamics = CovarianceLazyDynamics(li.convert(CenteredModel(target.model("linear"), mean), schedule), covariance)
    lam = covariance.eigenvalues
    for t in (0.0, 0.13, 0.5, 0.91, 1.0):
        (a_k, _), (da_k, _), (db_k, _), (to_scalar, _) = dynamics._coefficients(t)
        tt = torch.tensor(t, dtype=F64, requires_grad=True)
        # Lazy VP (theory §5): α = σ cos(πt/2), β = sin(πt/2).
        alpha, beta = sigma * torch.cos(math.pi / 2 * tt), torch.sin(math.pi / 2 * tt)
        q = alpha**2 + beta**2 * lam
        a_auto, b_auto = alpha * lam.sqrt() / q.sqrt(), beta * lam.sqrt() / q.sqrt()
        grads = [torch.autograd.grad(v, tt, retain_graph=True)[0] for v in (*a_auto, *b_auto)]
        torch.testing.assert_close(a_k, a_auto.detach(), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(a_k**2 + lam * (b_auto.detach()) ** 2, lam, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(da_k, torch.stack(grads[:3]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db_k, torch.stack(grads[3:]), rtol=1e-12, atol=1e-12)
        # The scalar schedule's state at the same SNR: Ỹ = (α/A) Y, so α_t / A_k is the map.
        torch.testing.assert_close(to_scalar * a_k, torch.full_like(lam, float(alpha.detach())), rtol=1e-12,
                                   atol=1e-14)


def test_apply_is_the_matrix_function():
    """Σ_i f_i(Σ) x_i through the spectrum equals the dense U f(Λ) Uᵀ, for full and low-rank spectra."""
    _, _, cov = anisotropic_gaussian(5)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 5, dtype=F64, generator=gen), torch.randn(7, 5, dtype=F64, generator=gen)
    full = Covariance.from_matrix(cov)
    low = full.truncated(2)
    for spectrum in (full, low):
        basis, lam = spectrum.basis, spectrum.eigenvalues
        complement = torch.eye(5, dtype=F64) - basis @ basis.T
        dense_cov = basis @ torch.diag(lam) @ basis.T + spectrum.rest * complement
        if spectrum is full:
            torch.testing.assert_close(dense_cov, cov, rtol=1e-12, atol=1e-12)
        f = ((lam.sqrt(), math.sqrt(spectrum.rest)), (1 / lam, 1 / spectrum.rest if spectrum.rest else 0.0))
        got = spectrum.apply([(f[0], x), (f[1], y)])
        dense = [basis @ torch.diag(v) @ basis.T + r * complement for v, r in f]
        torch.testing.assert_close(got, x @ dense[0] + y @ dense[1], rtol=1e-12, atol=1e-12)
    # Truncation keeps the trace: the complement's eigenvalue is the mean of the dropped ones.
    assert low.mean_eigenvalue == pytest.approx(float(torch.trace(cov)) / 5, rel=1e-12)
    dropped = torch.sort(torch.linalg.eigvalsh(cov)).values[:3]
    assert low.rest == pytest.approx(float(dropped.mean()), rel=1e-12)


def test_from_samples_full_and_low_rank():
    """The sample covariance's spectrum; the low-rank form (an SVD of the centred samples) has the same top
    eigenpairs and the rest of the total variance on the complement."""
    _, mean, cov = anisotropic_gaussian(6)
    gen = torch.Generator().manual_seed(5)
    samples = mean + torch.randn(500, 6, dtype=F64, generator=gen) @ matrix_sqrt(cov)
    sample_cov = torch.cov(samples.T)
    full = Covariance.from_samples(samples.reshape(500, 2, 3))
    assert full.shape == (2, 3) and full.rank == 6
    torch.testing.assert_close(full.basis @ torch.diag(full.eigenvalues) @ full.basis.T, sample_cov,
                               rtol=1e-10, atol=1e-12)
    low = Covariance.from_samples(samples, rank=2)
    values, vectors = torch.linalg.eigh(sample_cov)
    torch.testing.assert_close(low.eigenvalues, values.flip(0)[:2], rtol=1e-10, atol=1e-12)
    overlap = (low.basis.T @ vectors[:, -2:]).abs()
    torch.testing.assert_close(overlap.max(dim=1).values, torch.ones(2, dtype=F64), rtol=1e-8, atol=1e-8)
    assert low.rest == pytest.approx(float(values[:4].mean()), rel=1e-10)


def test_a_matrix_is_decomposed_once(monkeypatch):
    """li.sample with the same (D, D) matrix on every batch decomposes it once; other content or floor is new."""
    target, _, matrix = anisotropic_gaussian(5, 21)
    model = target.model("linear")
    z = torch.randn(6, 5, dtype=F64)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or eigh(m))
    monkeypatch.setattr(covariance_module, "_DECOMPOSED", OrderedDict())
    first = li.sample(model, z[:3], schedule="lazy-vp", covariance=matrix.clone())
    second = li.sample(model, z[3:], schedule="lazy-vp", covariance=matrix.clone())
    assert len(calls) == 1
    torch.testing.assert_close(torch.cat([first, second]), li.sample(model, z, schedule="lazy-vp",
                                                                      covariance=matrix))
    changed = matrix.clone()
    changed[0, 0] += 0.5
    assert Covariance.from_matrix(changed) is not Covariance.from_matrix(matrix)
    assert Covariance.from_matrix(matrix, floor=0.1) is not Covariance.from_matrix(matrix)
    assert Covariance.from_matrix(matrix) is Covariance.from_matrix(matrix.clone())
    assert len(calls) == 3


def spiked_samples(dim: int, count: int, spikes: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """N(0.3, σ²I + Σ_k (λ_k − σ²) u_k u_kᵀ) samples, with the spikes λ_k in random orthonormal directions u_k."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, spikes.numel(), generator=gen, dtype=F64))
    z = torch.randn(count, dim, generator=gen, dtype=F64)
    along = z @ basis
    return 0.3 + math.sqrt(noise) * (z - along @ basis.T) + (along * spikes.sqrt()) @ basis.T


def test_spiked_estimate_follows_the_spiked_model():
    """With γ = D/(N − 1) = 2 a spike λ = 10σ² has the sample eigenvalue λ + γσ²λ/(λ − σ²) and eigenvector cosine²
    c² = (1 − γ/(x − 1)²)/(1 + γ/(x − 1)); the estimate is σ²(1 + (x − 1)c²) = 8.18σ² and the noise σ² itself,
    where the plain top eigenpairs report the inflated sample values and a deflated rest."""
    noise, dim, count = 0.5, 800, 401
    samples = spiked_samples(dim, count, torch.tensor([10 * noise], dtype=F64), noise, seed=3)
    estimate = Covariance.spiked_from_samples(samples, max_rank=20)
    x, gamma = 10.0, dim / (count - 1)
    cos2 = (1 - gamma / (x - 1) ** 2) / (1 + gamma / (x - 1))
    assert estimate.rank == 1
    assert float(estimate.eigenvalues[0]) == pytest.approx(noise * (1 + (x - 1) * cos2), rel=0.1)
    assert estimate.rest == pytest.approx(noise, rel=0.01)
    plain = Covariance.from_samples(samples, rank=20)
    assert float(plain.eigenvalues[0]) == pytest.approx(x * noise + gamma * noise * x / (x - 1), rel=0.1)
    assert float(plain.eigenvalues[1]) > noise * (1 + math.sqrt(gamma)) ** 2 * 0.9  # noise at the bulk's edge
    isotropic = Covariance.spiked_from_samples(spiked_samples(dim, count, torch.tensor([noise], dtype=F64), noise, 4))
    assert float(isotropic.eigenvalues[0]) == pytest.approx(isotropic.rest) == pytest.approx(noise, rel=0.01)


def test_spiked_covariance_samples_better_than_the_plain_top_eigenpairs():
    """N = 512 ≪ D = 4200 (the regime of covariance="model" above FULL_RANK_MAX_DIM): lazy coordinates matched to
    the plain top-256 eigenpairs are far worse than the scalar schedule; the spiked estimate is better than both.
    The data are N(μ, diag(v)) with 10 variances of 4 and the rest 0.25, whose exact velocity is closed-form."""
    dim, mean = 4200, 0.3
    variances = torch.cat([torch.full((10,), 4.0), torch.full((dim - 10,), 0.25)]).to(F64)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = 1 - t.to(F64).reshape(-1, 1), t.to(F64).reshape(-1, 1)
        offset = x.to(F64) - b * mean
        scale = a * a + b * b * variances
        return (mean + b * variances * offset / scale - a * offset / scale).to(x.dtype)

    model = li.Model(velocity, "linear", "velocity")
    samples = mean + torch.randn(512, dim, dtype=F64, generator=torch.Generator().manual_seed(1)) * variances.sqrt()
    z = torch.randn(64, dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = mean + z * variances.sqrt()

    def error(covariance) -> float:
        x = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=2, covariance=covariance)
        return float((x - exact).pow(2).mean().sqrt())

    scalar = error(None)
    plain = error(Covariance.from_samples(samples, rank=256))
    spiked = error(Covariance.spiked_from_samples(samples))
    assert plain > 5 * scalar
    assert spiked < 0.9 * scalar


def test_eigenvalues_are_floored():
    """A direction without variance is floored at 1e-2 of the mean eigenvalue (C⁻¹ stays finite)."""
    cov = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    spectrum = Covariance.from_matrix(cov)
    assert float(spectrum.eigenvalues.min()) == pytest.approx(1e-2 * 1.0)
    model = li.GaussianMixture.gaussian(torch.zeros(3, dtype=F64), cov + 1e-12 * torch.eye(3, dtype=F64)
                                        ).model("linear")
    z = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    out = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=4, covariance=spectrum)
    assert bool(torch.isfinite(out).all())
    # The directions are independent here: the two with variance are still exact.
    torch.testing.assert_close(out[:, :2], z[:, :2] * torch.tensor([2.0, 1.0], dtype=F64).sqrt(), rtol=1e-10,
                               atol=1e-10)


def test_covariance_from_the_model_alone():
    """covariance="model" estimates Σ from the model's own samples: close to exact on an anisotropic Gaussian,
    far closer than the scalar schedule; it is cached on the model and its cost is reported as estimation."""
    target, mean, cov = anisotropic_gaussian()
    model = target.model("linear")
    z = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    exact = mean + z @ matrix_sqrt(cov)
    out, info = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=3, covariance="model",
                          return_info=True)
    scalar = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=3)
    error, scalar_error = float((out - exact).abs().max()), float((scalar - exact).abs().max())
    assert error < 0.1 * scalar_error
    assert info.estimation_nfe > 0 and info.nfe == 2
    model.nfe = 0
    _, again = li.sample(model, z, schedule="lazy-vp", solver="euler", steps=3, covariance="model",
                         return_info=True)
    assert again.estimation_nfe == 0 and model.nfe == 2


def test_covariance_errors():
    model = make_mixture().model("linear")
    z = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="covariance: applies to the probability-flow ODE"):
        li.sample(model, shape=(4, 2), schedule="point-mass", diffusion="optimal", covariance="model")
    with pytest.raises(ValueError, match="covariance: applies"):
        li.sample(model, z, schedule="lazy-vp", diffusion="optimal", covariance="model")
    with pytest.raises(ValueError, match="covariance: applies"):
        li.sample(model, z, schedule="linear", covariance="model")
    with pytest.raises(ValueError, match="cuda_graph: not supported with covariance"):
        li.sample(model, z, schedule="lazy-vp", covariance="model", cuda_graph=True)
    with pytest.raises(ValueError, match=r"covariance: expected a \(2, 2\) matrix"):
        li.sample(model, z, schedule="lazy-vp", covariance=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="covariance: built for 3 entries"):
        li.sample(model, z, schedule="lazy-vp", covariance=Covariance.from_matrix(torch.eye(3, dtype=F64)))
    with pytest.raises(ValueError, match='covariance: expected "model"'):
        li.sample(model, z, schedule="lazy-vp", covariance="data")
    with pytest.raises(TypeError, match="covariance: expected"):
        li.sample(model, z, schedule="lazy-vp", covariance=[[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="covariance: expected finite entries"):
        Covariance.from_matrix(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))
    with pytest.raises(ValueError, match="covariance: expected a positive trace"):
        Covariance.from_matrix(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="covariance: expected a symmetric matrix"):
        li.sample(model, z, schedule="lazy-vp", covariance=torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="samples: expected finite values"):
        Covariance.from_samples(torch.tensor([[0.0, math.inf], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="rank: expected an integer from 1 to 2"):
        Covariance.from_samples(torch.randn(3, 4), rank=3)
    with pytest.raises(ValueError, match="rank: expected"):
        Covariance.from_matrix(torch.eye(2)).truncated(0)
    with pytest.raises(ValueError, match="^max_rank: expected an integer from 1 to 2, got 5$"):
        Covariance.spiked_from_samples(torch.randn(3, 4), max_rank=5)
    for floor, error in ((-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError), (True, TypeError),
                         ("0.01", TypeError)):
        with pytest.raises(error, match="floor: expected a finite number >= 0"):
            Covariance.from_matrix(torch.eye(2), floor=floor)
        with pytest.raises(error, match="floor: expected a finite number >= 0"):
            Covariance.from_samples(torch.randn(8, 2), rank=1, floor=floor)
    for shape, error in ((4, TypeError), ((2.0,), TypeError), ((True, 2), TypeError), ((0, 2), ValueError),
                         ((), ValueError)):
        with pytest.raises(error, match="shape: expected the shape of one sample"):
            Covariance.from_matrix(torch.eye(2), shape)
    with pytest.raises(ValueError, match=r"basis: expected shape \(D, r\) with D = 3"):
        Covariance.from_matrix(torch.eye(2), (3,))


@pytest.mark.parametrize("steps,expected", [(3, "euler"), (6, "euler"), (7, "ab2"), (11, "ab2"), (12, "ab2-pc")])
def test_default_solver_with_covariance(mixture, steps, expected):
    """With covariance the default lazy ODE solver is Euler below 7 steps (AB2 overshoots there on MNIST), then AB2,
    and AB2-AM3 from 12 steps, as without."""
    model = mixture.model("linear")
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    default = li.sample(model, z, schedule="lazy-vp", steps=steps, covariance=mixture.cov)
    chosen = li.sample(model, z, schedule="lazy-vp", steps=steps, covariance=mixture.cov, solver=expected)
    torch.testing.assert_close(default, chosen, rtol=0, atol=0)
    for other in {"euler", "ab2", "ab2-pc"} - {expected}:
        different = li.sample(model, z, schedule="lazy-vp", steps=steps, covariance=mixture.cov, solver=other)
        assert not torch.allclose(default, different)
