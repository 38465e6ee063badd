r"""Lazy coordinates matched to a covariance: one lazy VP schedule per principal direction (theory §5, "Limits").

A scalar lazy schedule is lazy only for isotropic data. With Cov X = Σ = Σ_k λ_k u_k u_kᵀ, give every principal
direction its own lazy VP schedule, all at the common SNR r_t of a scalar lazy VP schedule:

    α_k = √λ_k / √(1 + r² λ_k),   β_k = r √λ_k / √(1 + r² λ_k),   so α_k² + λ_k β_k² = λ_k.

The state is Y_t = A_t Z + B_t X with A = α(Σ) and B = β(Σ) (commuting functions of Σ). Because every direction has
the same SNR, Y_t = C_t I_τ(t) with the symmetric matrix C = B/β_τ: the model is still evaluated at one time,
η(t, y) = η(τ, C⁻¹ y), and the probability-flow drift is Ȧ η_Z + Ḃ η_X. For X ~ N(μ, Σ) (centred with μ) the
drift is identically zero, so Euler is exact in any number of steps; Σ = σ²I is the scalar lazy VP schedule.
Sampling starts at Σ^{1/2} Z and ends at X (A_1 = 0, B_1 = I).

Σ is held as a spectrum: r eigenpairs and one eigenvalue for the orthogonal complement (low rank plus isotropic),
so a matrix function is applied in O(D r) per sample.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import check_int, check_shape
from .predictors import Predictor, eta_terms, linear_combination
from .schedules import Schedule

Tensor = torch.Tensor

# Eigenvalues are floored at this fraction of the mean eigenvalue: a direction with (almost) no variance would make
# C⁻¹ blow up at t = 0, and the floor changes FID-MNIST by under 1% between 1e-3 and 1e-1 (docs/levers.md).
EIGENVALUE_FLOOR = 1e-2
# Up to this dimension an estimate from samples is full rank; above, isotropic plus spikes (spiked_from_samples).
FULL_RANK_MAX_DIM = 4096
# Relative asymmetry above which a matrix is refused as a covariance (sample covariances are symmetric to rounding).
SYMMETRY_TOLERANCE = 1e-6
DEFAULT_RANK = 256
# Spectra of recently decomposed matrices, by content (Covariance is immutable, so sharing one is safe).
_DECOMPOSED: OrderedDict[tuple, Covariance] = OrderedDict()
_DECOMPOSED_KEPT = 4


def _check_floor(floor: Any) -> float:
    expected = "a finite number >= 0 (a fraction of the mean eigenvalue)"
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise TypeError(f"floor: expected {expected}, got {type(floor).__name__}")
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor: expected {expected}, got {floor}")
    return float(floor)


@dataclass(frozen=True)
class Covariance:
    r"""Σ = U diag(λ) Uᵀ + λ_⊥ (I − U Uᵀ) over samples of shape ``shape`` (flattened to D entries).

    Attributes:
        basis: U, orthonormal columns, (D, r), float64.
        eigenvalues: λ, (r,), float64, positive.
        rest: λ_⊥ on the orthogonal complement (unused when r = D).
        shape: the shape of one sample.
    """

    basis: Tensor
    eigenvalues: Tensor
    rest: float
    shape: tuple[int, ...]
    # U on each (device, dtype) it has been used on: a sampling step must not copy it from the host again.
    _placed: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.shape, tuple) or check_shape(self.shape, "shape") != self.shape:
            raise TypeError(f"shape: expected the shape of one sample, a tuple of positive ints, got {self.shape!r}")
        if not isinstance(self.basis, Tensor) or self.basis.ndim != 2:
            raise TypeError("basis: expected a (D, r) tensor")
        dim, rank = self.basis.shape
        if dim != math.prod(self.shape) or rank > dim or rank < 1:
            raise ValueError(f"basis: expected shape (D, r) with D = {math.prod(self.shape)} and 1 <= r <= D, "
                             f"got {tuple(self.basis.shape)}")
        if self.eigenvalues.shape != (rank,):
            raise ValueError(f"eigenvalues: expected shape ({rank},), got {tuple(self.eigenvalues.shape)}")
        if not (bool(torch.isfinite(self.eigenvalues).all()) and bool((self.eigenvalues > 0).all())):
            raise ValueError("eigenvalues: expected finite positive values (floor them first)")
        if not (math.isfinite(self.rest) and (self.rest > 0 or rank == dim)):
            raise ValueError(f"rest: expected a finite positive eigenvalue, got {self.rest}")

    @property
    def dim(self) -> int:
        """D, the number of entries of one sample."""
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        """The number of eigenpairs kept; the other D − rank directions share ``rest``."""
        return self.basis.shape[1]

    @property
    def mean_eigenvalue(self) -> float:
        """tr Σ / D."""
        return (float(self.eigenvalues.sum()) + self.rest * (self.dim - self.rank)) / self.dim

    @classmethod
    def from_matrix(cls, matrix: Tensor, shape: tuple[int, ...] | None = None, *,
                    floor: float = EIGENVALUE_FLOOR) -> Covariance:
        """A full-rank spectrum of a symmetric (D, D) matrix, eigenvalues floored at ``floor`` × their mean."""
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise TypeError("covariance: expected a square (D, D) tensor")
        m = matrix.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(m).all()):
            raise ValueError("covariance: expected finite entries")
        # A covariance is symmetric; a clearly asymmetric matrix is a different object passed by mistake.
        if float((m - m.T).abs().max()) > SYMMETRY_TOLERANCE * max(float(m.abs().max()), 1e-300):
            raise ValueError("covariance: expected a symmetric matrix")
        shape = (m.shape[0],) if shape is None else check_shape(shape, "shape")
        floor = _check_floor(floor)
        # The same matrix passed to every batch of a job is decomposed once: eigh is O(D³), the digest O(D²).
        key = (cls, hashlib.blake2b(m.contiguous().numpy().tobytes(), digest_size=16).digest(), m.shape[0], shape,
               float(floor))
        hit = _DECOMPOSED.get(key)
        if hit is None:
            eigenvalues, basis = torch.linalg.eigh(0.5 * (m + m.T))
            hit = cls._floored(basis, eigenvalues, 0.0, shape, floor)
            _DECOMPOSED[key] = hit
            if len(_DECOMPOSED) > _DECOMPOSED_KEPT:
                _DECOMPOSED.popitem(last=False)
        _DECOMPOSED.move_to_end(key)
        return hit

    @classmethod
    def from_samples(cls, samples: Tensor, rank: int | None = None, *, floor: float = EIGENVALUE_FLOOR
                     ) -> Covariance:
        """The sample covariance of ``samples`` (N, *shape); with ``rank`` (at most N − 1) its top eigenpairs, from
        an SVD of the centred samples without forming the (D, D) matrix, and the mean of the other eigenvalues
        (from the total variance) as λ_⊥."""
        flat = _flat_samples(samples)
        shape = tuple(samples.shape[1:])
        if rank is None:
            return cls.from_matrix(torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1]), shape, floor=floor)
        rank = check_int(rank, "rank", 1, min(flat.shape[1], flat.shape[0] - 1))
        sample_values, rows = _sample_spectrum(flat)
        top = sample_values[:rank]
        dim = flat.shape[1]
        rest = (float(sample_values.sum()) - float(top.sum())) / (dim - rank) if rank < dim else 0.0
        return cls._floored(rows[:rank].T, top, rest, shape, floor)

    @classmethod
    def spiked_from_samples(cls, samples: Tensor, max_rank: int = DEFAULT_RANK, *,
                            floor: float = EIGENVALUE_FLOOR) -> Covariance:
        r"""Σ = σ² I + (spikes) estimated from N samples in D dimensions, for when N is not much larger than D.

        There the top sample eigenvalues are mostly noise: for isotropic data of variance σ² they spread up to the
        Marchenko–Pastur edge σ²(1 + √γ)², γ = D/(N − 1), so the top eigenpairs of a sample covariance invent
        large variances in random directions. Here only sample eigenvalues ℓ above that edge are kept (at most
        ``max_rank``). Each is de-biased to the spike λ with ℓ = λ + γσ²λ/(λ − σ²) and then shrunk for its
        eigenvector's misalignment, to σ²(1 + (x − 1)c²) with x = λ/σ² and
        c² = (1 − γ/(x − 1)²)/(1 + γ/(x − 1)) (the Frobenius-optimal shrinker of the spiked model). σ² itself is
        the variance the spikes leave, (tr S − Σλ)/(D − k), solved for together with the spikes.
        """
        flat = _flat_samples(samples)
        shape = tuple(samples.shape[1:])
        count, dim = flat.shape
        max_rank = check_int(max_rank, "max_rank", 1, min(dim, count - 1))
        sample_values, rows = _sample_spectrum(flat)
        total = float(sample_values.sum())
        if not total > 0:
            raise ValueError("covariance: expected a positive trace")
        gamma = dim / (count - 1)
        noise = total / dim
        spikes = sample_values[:0]
        for _ in range(100):
            above = sample_values[:max_rank] > noise * (1 + math.sqrt(gamma)) ** 2
            y = sample_values[:max_rank][above] / noise
            b = 1 + y - gamma
            spikes = noise * 0.5 * (b + torch.sqrt((b * b - 4 * y).clamp_min(0)))
            kept = int(above.sum())
            updated = (total - float(spikes.sum())) / (dim - kept) if kept < dim else noise
            if abs(updated - noise) <= 1e-12 * noise:
                break
            noise = max(updated, 1e-300)
        x = spikes / noise
        cos2 = ((1 - gamma / (x - 1) ** 2) / (1 + gamma / (x - 1))).clamp(0.0, 1.0)
        shrunk = noise * (1 + (x - 1) * cos2)
        kept = shrunk.numel()
        if kept == 0:  # isotropic: one direction carrying σ² keeps the spectrum's form
            return cls._floored(rows[:1].T, torch.tensor([noise], dtype=torch.float64), noise, shape, floor)
        return cls._floored(rows[:kept].T, shrunk, noise if kept < dim else 0.0, shape, floor)

    def truncated(self, rank: int, *, floor: float = EIGENVALUE_FLOOR) -> Covariance:
        """The top ``rank`` eigenpairs, the others replaced by their mean (the trace is kept)."""
        rank = check_int(rank, "rank", 1, self.dim)
        order = torch.argsort(self.eigenvalues, descending=True)
        top = order[:rank]
        others = self.eigenvalues[order[rank:]]
        rest = (float(others.sum()) + self.rest * (self.dim - self.rank)) / (self.dim - rank) if rank < self.dim \
            else 0.0
        return Covariance._floored(self.basis[:, top], self.eigenvalues[top], rest, self.shape, floor)

    @staticmethod
    def _floored(basis: Tensor, eigenvalues: Tensor, rest: float, shape: tuple[int, ...], floor: float
                 ) -> Covariance:
        floor = _check_floor(floor)
        dim, rank = basis.shape
        mean = (float(eigenvalues.clamp_min(0).sum()) + max(rest, 0.0) * (dim - rank)) / dim
        if not mean > 0:
            raise ValueError("covariance: expected a positive trace")
        least = floor * mean if floor > 0 else torch.finfo(torch.float64).tiny
        return Covariance(basis.contiguous(), eigenvalues.clamp_min(least), max(rest, least) if rank < dim else 0.0,
                          shape)

    def apply(self, pairs: list[tuple[tuple[Tensor, float], Tensor]]) -> Tensor:
        r"""Σ_i f_i(Σ) x_i for batches x_i of shape (B, *shape), each f_i given by its values (f_i(λ), f_i(λ_⊥)):

        f(Σ) x = f(λ_⊥) x + U ((f(λ) − f(λ_⊥)) ⊙ Uᵀ x), with one product by U for the whole sum.
        """
        first = pairs[0][1]
        basis = self.basis_on(first.device, first.dtype)
        full = self.rank == self.dim  # no complement: its values are ignored
        rotated = None
        plain = []
        for (values, rest), x in pairs:
            rest = 0.0 if full else rest
            flat = x.reshape(x.shape[0], -1)
            weights = (values - rest).to(device=x.device, dtype=x.dtype)
            part = _rows_times(flat, basis) * weights
            rotated = part if rotated is None else rotated + part
            plain.append((rest, flat))
        return (linear_combination(plain) + _rows_times(rotated, basis.T)).reshape(first.shape)

    def basis_on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """U on ``device`` in ``dtype`` (kept after the first call)."""
        key = (torch.device(device), dtype)
        if key not in self._placed:
            self._placed[key] = self.basis.to(device=device, dtype=dtype)
        return self._placed[key]


# Matrix products run on blocks of exactly this many rows (zero-padded): a kernel's summation order can depend on
# the number of rows, and a sample must not depend on the batch it is drawn in.
ROW_BLOCK = 64


def _rows_times(rows: Tensor, matrix: Tensor) -> Tensor:
    """rows @ matrix, computed on fixed-size blocks of rows so that each row's result is batch-independent."""
    if rows.shape[0] == ROW_BLOCK:
        return rows @ matrix
    out = []
    for lo in range(0, rows.shape[0], ROW_BLOCK):
        block = rows[lo: lo + ROW_BLOCK]
        short = ROW_BLOCK - block.shape[0]
        if short:
            block = torch.cat([block, block.new_zeros((short, block.shape[1]))])
        out.append((block @ matrix)[: ROW_BLOCK - short])
    return torch.cat(out)


def _flat_samples(samples: Any) -> Tensor:
    """``samples`` (N, ...) as a float64 (N, D) host tensor, checked: N >= 2 and finite."""
    if not isinstance(samples, Tensor) or samples.ndim < 2 or samples.shape[0] < 2:
        raise TypeError("samples: expected a tensor (N, ...) with N >= 2")
    flat = samples.detach().to(device="cpu", dtype=torch.float64).reshape(samples.shape[0], -1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("samples: expected finite values")
    return flat


def _sample_spectrum(flat: Tensor) -> tuple[Tensor, Tensor]:
    """The nonzero-rank eigenvalues of the sample covariance of ``flat`` (N, D), decreasing, and their eigenvectors
    as rows, from an SVD of the centred samples (the (D, D) matrix is never formed)."""
    centred = (flat - flat.mean(dim=0)) / math.sqrt(flat.shape[0] - 1)
    _, singular, rows = torch.linalg.svd(centred, full_matrices=False)
    return singular ** 2, rows


class CovarianceLazyDynamics:
    r"""The probability-flow drift in lazy coordinates matched to ``covariance`` (see the module docstring).

    ``predictor`` is the (centred) model converted to the scalar lazy VP schedule whose SNR r_t all directions
    share: its state is Ỹ = α_t Z + β_t X, and Ỹ = (α/A) Y direction by direction.
    """

    def __init__(self, predictor: Predictor, covariance: Covariance, known_start: bool = False):
        self.predictor = predictor
        self.covariance = covariance
        self.known_start = known_start
        # A full-rank spectrum has no complement; any positive stand-in keeps its (ignored) values finite.
        rest = covariance.rest if covariance.rank < covariance.dim else covariance.mean_eigenvalue
        self._lam = torch.cat([covariance.eigenvalues, torch.tensor([rest], dtype=torch.float64)])
        self._values: dict[float, tuple] = {}  # by time, float64 on the host
        self._placed: dict[tuple, tuple] = {}  # by (time, device, dtype)

    @property
    def schedule(self) -> Schedule:
        """The scalar lazy VP schedule whose time variable and SNR the coordinates share."""
        return self.predictor.schedule

    def _split(self, values: Tensor) -> tuple[Tensor, float]:
        return values[:-1], float(values[-1])

    def _coefficients(self, t: float, like: Tensor | None = None) -> tuple:
        """(A, Ȧ, Ḃ, α/A) at t, each as (per-eigenvalue values, complement value); the values on ``like``'s
        device and in its dtype when given (kept, so that a step copies nothing from the host)."""
        if like is not None:
            key = (t, like.device, like.dtype)
            if key not in self._placed:
                self._placed[key] = tuple((v.to(device=like.device, dtype=like.dtype), r)
                                          for v, r in self._coefficients(t))
            return self._placed[key]
        if t not in self._values:
            alpha, beta, dalpha, dbeta = self.schedule.scalar_coefficients(t)
            # With q = α² + β²λ: A = α√λ/√q, Ȧ = λ^{3/2} β (α̇β − αβ̇)/q^{3/2}, Ḃ = √λ α (αβ̇ − α̇β)/q^{3/2};
            # written without r = β/α, so they hold at both ends (α = 0 at t = 1, β = 0 at t = 0).
            lam = self._lam
            root = torch.sqrt(lam)
            q = alpha * alpha + beta * beta * lam
            wronskian = alpha * dbeta - dalpha * beta
            a_k = alpha * root / torch.sqrt(q)
            da_k = -lam * root * beta * wronskian / q ** 1.5
            db_k = root * alpha * wronskian / q ** 1.5
            self._values[t] = tuple(self._split(v) for v in (a_k, da_k, db_k, torch.sqrt(q) / root))
        return self._values[t]

    def start(self, noise: Tensor) -> Tensor:
        """Y_0 = A_0 Z = Σ^{1/2} Z."""
        return self.covariance.apply([(self._split(torch.sqrt(self._lam)), noise)])

    def to_scalar_state(self, y: Tensor, t: float) -> Tensor:
        """Ỹ = (α/A) Y: the state of the scalar lazy VP schedule (the predictor's) at the same t."""
        _, _, _, to_scalar = self._coefficients(float(t), y)
        return self.covariance.apply([(to_scalar, y)])

    def from_scalar_state(self, scalar_state: Tensor, t: float) -> Tensor:
        """Y = (A/α) Ỹ, the inverse of :meth:`to_scalar_state` (α/A = √(α² + β²λ)/√λ > 0 at every t)."""
        _, _, _, (values, rest) = self._coefficients(float(t), scalar_state)
        return self.covariance.apply([((values.reciprocal(), 1.0 / rest), scalar_state)])

    def _eta(self, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
        eta_z, eta_x = eta_terms(self.predictor, self.to_scalar_state(y, t), t)
        return linear_combination(eta_z), linear_combination(eta_x)

    def drift(self, y: Tensor, t: float) -> Tensor:
        """Ȧ η_Z + Ḃ η_X at (y, t); at a known start (t = 0, centred) η_X = 0 and η_Z = A⁻¹ y."""
        t = float(t)
        a_k, da_k, db_k, _ = self._coefficients(t, y)
        if self.known_start and t == 0.0:
            ratio = (da_k[0] / a_k[0], da_k[1] / a_k[1])
            return self.covariance.apply([(ratio, y)])
        eta_z, eta_x = self._eta(y, t)
        return self.covariance.apply([(da_k, eta_z), (db_k, eta_x)])

    def denoise(self, y: Tensor, t: float) -> Tensor:
        """η_X(t, y): the posterior mean of the (centred) data, which is also the state at t = 1."""
        if self.known_start and float(t) == 0.0:
            return torch.zeros_like(y)
        return self._eta(y, float(t))[1]
