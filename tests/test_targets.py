"""Gaussian mixtures: the closed-form posterior means against an independent density (torch.distributions)."""

import pytest
import torch
from conftest import make_mixture
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import lazyinterp as li
from lazyinterp import targets
from lazyinterp.bench import gmm_64d

F64 = torch.float64


def marginal(mixture: li.GaussianMixture, alpha: float, beta: float) -> MixtureSameFamily:
    """The law of I = αZ + βX: Σ_k w_k N(β m_k, α² I + β² C_k), built by torch.distributions."""
    covs = alpha**2 * torch.eye(mixture.dim, dtype=F64) + beta**2 * mixture.covs
    return MixtureSameFamily(Categorical(probs=mixture.weights), MultivariateNormal(beta * mixture.means, covs))


def score(mixture: li.GaussianMixture, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(marginal(mixture, alpha, beta).log_prob(x).sum(), x)
    return grad


@pytest.mark.parametrize("make", [make_mixture, gmm_64d], ids=["2d", "64d"])
@pytest.mark.parametrize("alpha, beta", [(0.95, 0.05), (0.6, 0.8), (0.3, 0.7), (0.02, 1.0)])
def test_eta_is_tweedie_on_the_marginal_density(make, alpha, beta):
    """η_Z = −α ∇log p_t (Tweedie) and α η_Z + β η_X = x, with p_t the marginal built independently."""
    mixture = make()
    gen = torch.Generator().manual_seed(0)
    x = beta * mixture.sample(64, gen) + alpha * torch.randn(64, mixture.dim, generator=gen, dtype=F64)
    eta_z, eta_x = mixture.eta(x, alpha, beta)
    torch.testing.assert_close(eta_z, -alpha * score(mixture, x, alpha, beta), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(alpha * eta_z + beta * eta_x, x, rtol=1e-10, atol=1e-10)


def test_per_sample_coefficients_match_scalar_ones(mixture):
    """(B,) tensors of α and β give each row the result of its own scalar pair."""
    gen = torch.Generator().manual_seed(1)
    x = mixture.sample(5, gen) + 0.1 * torch.randn(5, 2, generator=gen, dtype=F64)
    alphas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0], dtype=F64)
    betas = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], dtype=F64)
    eta_z, eta_x = mixture.eta(x, alphas, betas)
    for i in range(5):
        z_i, x_i = mixture.eta(x[i : i + 1], float(alphas[i]), float(betas[i]))
        torch.testing.assert_close(eta_z[i : i + 1], z_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eta_x[i : i + 1], x_i, rtol=1e-12, atol=1e-12)


def test_ends_are_exact(mixture):
    """β = 0: the state carries no information about X, so η_X = E[X] and η_Z = x/α. α = 0: x = βX, so
    η_X = x/β."""
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    eta_z, eta_x = mixture.eta(x, 0.7, 0.0)
    torch.testing.assert_close(eta_x, mixture.mean.expand_as(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eta_z, x / 0.7, rtol=1e-12, atol=1e-12)
    _, eta_x = mixture.eta(x, 0.0, 2.0)
    torch.testing.assert_close(eta_x, x / 2.0, rtol=1e-12, atol=1e-12)


def test_samples_have_the_mixture_moments():
    """sample() draws from Σ w_k N(m_k, C_k): the empirical mean and covariance match mean and cov."""
    mixture = gmm_64d()
    x = mixture.sample(200_000, torch.Generator().manual_seed(3))
    assert float((x.mean(0) - mixture.mean).abs().max()) < 0.02
    assert float((torch.cov(x.T) - mixture.cov).abs().max()) < 0.02


def test_blocks_of_rows_give_the_whole_batch(monkeypatch):
    """η over a batch split into blocks of rows (per-sample or shared α, β) is η over the whole batch at once."""
    mixture = gmm_64d()
    gen = torch.Generator().manual_seed(4)
    x = mixture.sample(50, gen)
    alphas, betas = torch.rand(50, generator=gen, dtype=F64), torch.rand(50, generator=gen, dtype=F64)
    coefficient_sets = [(alphas, betas), (0.6, 0.8)]
    whole = [mixture.eta(x, a, b) for a, b in coefficient_sets]
    monkeypatch.setattr(targets, "_BLOCK_ELEMENTS", 7 * mixture.means.numel())  # blocks of 7 rows, the last of 1
    for (a, b), expected in zip(coefficient_sets, whole, strict=True):
        for got, want in zip(mixture.eta(x, a, b), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_bad_parameters_name_the_argument():
    eye = torch.eye(2, dtype=F64)[None]
    cases = [((torch.tensor([1.0]), torch.tensor([[0.0, float("nan")]]), eye), ValueError, "means: expected finite"),
             ((torch.tensor([float("inf")]), torch.zeros(1, 2), eye), ValueError, "weights: expected finite"),
             ((torch.tensor([-1.0]), torch.zeros(1, 2), eye), ValueError, "weights: must be positive"),
             ((torch.tensor([1.0]), torch.zeros(1, 2), -eye), ValueError, "covs: must be positive definite"),
             ((torch.tensor([1.0]), torch.zeros(1, 3), eye), ValueError, "covs: expected"),
             ((None, torch.zeros(1, 2), eye), TypeError, "weights: expected a tensor of numbers, got NoneType"),
             ((torch.tensor([1.0]), "0, 0", eye), TypeError, "means: expected a tensor of numbers, got str"),
             ((torch.tensor([1.0]), torch.zeros(1, 2), [[1, 0], [0]]), TypeError, "covs: expected a tensor of numb")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            li.GaussianMixture(*args)
