r"""Targets with closed-form predictors: Gaussian mixtures (a single Gaussian is the one-component case).

For X ~ Σ_k w_k N(m_k, C_k) and I_t = α Z + β X, component k gives I_t ~ N(β m_k, S_k) with
S_k = α² I + β² C_k. With responsibilities π_k(x) ∝ w_k N(x; β m_k, S_k):

    η_X(t, x) = Σ_k π_k [m_k + β C_k S_k⁻¹ (x − β m_k)],   η_Z(t, x) = Σ_k π_k α S_k⁻¹ (x − β m_k).

Both are exact at the ends (β = 0 or α = 0). Everything runs in float64 on flattened samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .predictors import Model, check_kind, coefficients, from_eta
from .schedules import Schedule, as_time, get_schedule

Tensor = torch.Tensor
_BLOCK_ELEMENTS = 1 << 18


def _as_float64(value: Any, name: str) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a tensor of numbers, got {type(value).__name__}") from exc


class GaussianMixture:
    """A Gaussian mixture in R^D with full covariances.

    Args:
        weights: (K,) positive, normalised internally.
        means: (K, D).
        covs: (K, D, D) symmetric positive definite, or (K, D) diagonals, or a (K,) scalar variance each.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        w, m, c = (_as_float64(value, name) for value, name in ((weights, "weights"), (means, "means"), (covs, "covs")))
        if m.ndim != 2 or w.shape != (m.shape[0],):
            raise ValueError(f"means, weights: expected (K, D) and (K,), got {tuple(m.shape)}, {tuple(w.shape)}")
        k, d = m.shape
        if c.shape == (k,):
            c = c[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif c.shape == (k, d):
            c = torch.diag_embed(c)
        if c.shape != (k, d, d):
            raise ValueError(f"covs: expected (K,), (K, D) or (K, D, D), got {tuple(c.shape)}")
        for name, value in (("weights", w), ("means", m), ("covs", c)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: expected finite values")
        if not bool((w > 0).all()):
            raise ValueError("weights: must be positive")
        self.weights = w / w.sum()
        self.means = m
        self.covs = 0.5 * (c + c.transpose(1, 2))
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)
        if not bool((self.eigvals > 0).all()):
            raise ValueError("covs: must be positive definite")
        # B = [V_1 … V_K] (D, K·D), so x @ B holds every component's eigen-coordinates; [B; BΛ]ᵀ (K·D, 2D) maps
        # them back by V_k and by V_k Λ_k; and V_kᵀ m_k (K, D).
        self._bases = self.eigvecs.permute(1, 0, 2).reshape(d, -1).contiguous()
        lam_bases = (self.eigvecs * self.eigvals[:, None, :]).permute(1, 0, 2).reshape(d, -1)
        self._back = torch.cat([self._bases, lam_bases], 0).T.contiguous()
        self._projected_means = torch.einsum("kd,kde->ke", m, self.eigvecs)

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> GaussianMixture:
        """The single Gaussian N(mean, cov) (cov: (D, D), (D,) or a scalar tensor)."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        return cls(torch.ones(1), mean[None], cov[None] if cov.ndim else cov.reshape(1))

    @property
    def dim(self) -> int:
        """The dimension of the samples."""
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        """E[X] = Σ_k w_k m_k."""
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        """Cov X = Σ_k w_k (C_k + (m_k − μ)(m_k − μ)ᵀ)."""
        mu = self.mean
        centred = self.means - mu
        return (self.weights[:, None, None] * (self.covs + centred[:, :, None] * centred[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, D) in float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = self.eigvecs * self.eigvals.sqrt()[:, None, :]
        return self.means[comp] + torch.einsum("nij,nj->ni", root[comp], z)

    def eta(self, x: Tensor, alpha: Tensor | float, beta: Tensor | float) -> tuple[Tensor, Tensor]:
        """(η_Z, η_X) at flattened x (B, D); α, β floats or (B,) tensors.

        In C_k's eigenbasis V_k (C_k = V_k Λ_k V_kᵀ) S_k is diagonal, so with p_k = V_kᵀ (x − β m_k):
        η_Z = α Σ_k π_k V_k (p_k / s_k) and η_X = Σ_k π_k m_k + β Σ_k π_k V_k (λ_k p_k / s_k), s_k = α² + β² λ_k.
        Each sum over k and the eigenbasis is one matrix product with the stacked bases.
        """
        x = x.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
        b = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
        # Rows in blocks whose (rows, K, D) temporaries stay small: large ones are mapped fresh from the OS on
        # every allocation, and their page faults cost more than the arithmetic.
        rows = max(1, _BLOCK_ELEMENTS // self.means.numel())
        if x.shape[0] <= rows:
            return self._eta_block(x, a, b)
        parts = [self._eta_block(x[i:i + rows], a if a.numel() == 1 else a[i:i + rows],
                                 b if b.numel() == 1 else b[i:i + rows]) for i in range(0, x.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _eta_block(self, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        k, d = self.means.shape
        a, b = a.reshape(-1, 1, 1), b.reshape(-1, 1, 1)
        var = a * a + b * b * self.eigvals[None]  # (B or 1, K, D): eigenvalues of S_k
        proj = (x @ self._bases).reshape(-1, k, d) - b * self._projected_means  # (B, K, D)
        scaled = proj * var.reciprocal()
        log_pdf = -0.5 * torch.einsum("bkd,bkd->bk", proj, scaled) - 0.5 * torch.log(var).sum(-1) \
            - 0.5 * self.dim * math.log(2 * math.pi)
        resp = torch.softmax(torch.log(self.weights)[None] + log_pdf, dim=1)  # (B, K)
        # π_k S_k⁻¹ (x − β m_k) in each eigenbasis, mapped back by V_k and by V_k Λ_k in one product.
        weighted = (resp[..., None] * scaled).reshape(-1, k * d)
        both = weighted @ self._back
        eta_z = a.reshape(-1, 1) * both[:, :d]
        eta_x = resp @ self.means + b.reshape(-1, 1) * both[:, d:]
        return eta_z, eta_x

    def predict(self, x: Tensor, t: Tensor | float, schedule: Schedule | str, kind: str = "velocity") -> Tensor:
        """The exact ``kind`` prediction under ``schedule`` at (x, t); x of shape (B, ...) with prod(...) = D."""
        sched = get_schedule(schedule)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} values per sample, got {flat.shape[1]}")
        tt = as_time(t)
        a, b, da, db = coefficients(sched, tt)
        eta_z, eta_x = self.eta(flat, a, b)
        out = from_eta(check_kind(kind, "kind"), eta_z, eta_x, a, b, da, db)
        return out.reshape(x.shape).to(x.dtype)

    def model(self, schedule: Schedule | str = "linear", predicts: str = "velocity", **kwargs) -> Model:
        """An :class:`~lazyinterp.Model` whose network is this mixture's exact ``predicts`` under ``schedule``."""
        sched = get_schedule(schedule)
        kind = check_kind(predicts)

        def net(x: Tensor, t: Tensor) -> Tensor:
            return self.predict(x, t.to(torch.float64).cpu(), sched, kind).to(x.device)

        return Model(net, sched, kind, **kwargs)
