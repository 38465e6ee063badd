r"""E[X], σ and Cov X of the data, estimated from the model alone (no data set).

For X ~ N(μ, σ²I) the posterior mean is affine in the state, η_X(t, x) − μ = βσ²/(α² + β²σ²) (x − βμ), so a few
probes at a low SNR r = β/α give σ and μ exactly for Gaussians, and the mean covariance eigenvalue in the linear
regime otherwise. :func:`data_mean`, :func:`data_sigma` and :func:`data_covariance` are what :func:`lazyinterp.sample`
uses, cached on the model per sample shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .checks import check_int, check_positive, check_shape
from .covariance import DEFAULT_RANK, FULL_RANK_MAX_DIM, Covariance
from .devices import DeviceLike
from .predictors import Predictor, check_predictor, coefficients, model_cache

Tensor = torch.Tensor

# The σ estimators are exact for Gaussian data at any SNR, but for other data they read the linear (low-SNR)
# regime, which a fixed probe SNR r leaves when the data's scale σ is far from 1. A probe whose data SNR rσ is
# more than this factor from the requested one is repeated at r = snr/σ̂.
_RESCALE_BEYOND = 4.0
# A slope with kβ ≥ 1 (steeper than any Gaussian's) or k ≤ 0 (a posterior mean that moves against the input) means
# the probe sat where the data is not linear; it is repeated this much lower.
_STEEP_SNR_DROP = 100.0
# A Gaussian's kβ is s²/(1 + s²) at data SNR s = rσ, so |kβ| below this fraction of its value at the requested
# data SNR means s is some 30× lower (s < 0.003 for the default 0.1): a slope the rounding of η_X ≈ μ can swamp
# (data of scale 1e-4 sitting 30σ from 0, probed in float32 at r = 0.1, read kβ ≈ −2e-6 where the data's is
# 1e-10). Such a slope is no reading: the probe moves to where it puts the data's SNR at the requested one if it is
# positive, else _STEEP_SNR_DROP times higher, not lower.
_UNRESOLVED_FRACTION = 1e-3
# An accepted reading is checked at an SNR this much lower, where any data is closer to linear; it stands if the two
# agree within _CHECK_TOLERANCE (a Gaussian's agree exactly). Data whose modes are already told apart at the probe
# (σ ≫ 1 with narrow modes) reads far too small a σ there, and only the lower probe shows it.
_CHECK_SNR_DROP = 4.0
_CHECK_TOLERANCE = 1.25
_PROBE_ROUNDS = 8
# A probe asked for an SNR this much below the one it was evaluated at was clamped to the model's lowest SNR (its
# t_min, or a vp base's β_0/α_0 at t = 0); rounding in snr_inverse is orders of magnitude smaller.
_CLAMPED_BEYOND = 1.5
# A probe whose centre moved by more than this many of the data's marginal widths √(σ̂² + 1/r²) there (RMS per
# coordinate) sat far outside the data: its posterior sees only the nearest part of it (modes 900 apart, 1 wide,
# 1700 from 0: one mode's σ̂ and mean). It is read again around the new centre with noise 1/r = jump/snr, which
# reaches back over that distance.
_FAR_PROBE = 4.0
# E[X] from antithetic probes is refined until a probe moves it by at most this fraction of σ (RMS per coordinate),
# in at most this many more probes.
_MEAN_TOLERANCE = 1e-3
_MEAN_ROUNDS = 4
# The estimators' probe SNR r = β/α: a low one, where data other than Gaussian still reads as linear.
PROBE_SNR = 0.1


def reads_mean_directly(predictor: Predictor) -> bool:
    """Whether the predictor is evaluated at t = 0 of a base with β_0 = 0, where η_X(0, x) = E[X] for every x."""
    return float(predictor.schedule.beta(0.0)) == 0.0 and float(getattr(predictor, "t_min", 0.0)) == 0.0


def _probe_time(predictor: Predictor, snr: float) -> float:
    """The time where r = β/α = ``snr``, kept inside the times the predictor evaluates without clamping."""
    t = float(predictor.schedule.snr_inverse(snr))
    return min(max(t, float(getattr(predictor, "t_min", 0.0))), float(getattr(predictor, "t_max", 1.0)))


def _probe_coefficients(predictor: Predictor, snr: float) -> tuple[float, float, float]:
    t = _probe_time(predictor, snr)
    a, b = (float(c) for c in coefficients(predictor.schedule, t)[:2])
    return t, a, b


def _antithetic_probe(predictor: Predictor, snr: float, center: Tensor,
                      z: Tensor) -> tuple[float, Tensor, float, float]:
    r"""(k, μ, α, β) from η_X at x = βc ± αz, at the time where r = ``snr``.

    For X ~ N(μ, σ² I), η_X(t, x) = μ (1 − kβ) + k x with k = β σ² / (α² + β² σ²), so
    k = ⟨αz, η₊ − η₋⟩ / (2‖αz‖²) and μ = (η̄ − kβc)/(1 − kβ) with η̄ the mean of η± over probes and signs:
    exact for any c and any z, whatever the probe's SNR. Where k admits no Gaussian (0 < kβ < 1 fails), μ is η̄.
    """
    t, a, b = _probe_coefficients(predictor, snr)
    u = a * z
    base = b * center
    _, eta_x = predictor.eta(torch.cat([base + u, base - u]), t)
    plus, minus = eta_x.chunk(2)
    k = float((u * (plus - minus)).sum() / (2 * (u * u).sum()))
    level = ((plus + minus) / 2).mean(dim=0)
    mean = (level - (k * b) * center) / (1 - k * b) if 0 < k * b < 1 else level
    return k, mean, a, b


class _NoSigma(ValueError):
    """The model's posterior slope admits no σ: k ≤ 0, or steeper than any Gaussian's at every probe."""


def _rms(x: Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


class LowestSNRWarning(RuntimeWarning):
    """σ and E[X] were read at the model's lowest SNR, where the data is still outside its linear regime: the
    model does not cover the data's low-SNR end (data far larger than the noise at its t_min)."""


def _warn_beyond_linear_regime(lowest_snr: float, sigma: float, snr: float) -> None:
    warnings.warn(
        f"sigma: the model is not evaluated below SNR {lowest_snr:.3g} (its t_min, or its schedule's start), where "
        f"data of the scale read there ({sigma:.3g}) has SNR {lowest_snr * sigma:.3g}, not the {snr:g} the "
        "estimate reads at: the model does not cover the data's low-SNR regime, so the sigma and E[X] read there "
        "(exact for Gaussian data) may be those of one mode, and no schedule samples what the model never saw; lower "
        "t_min if the network was trained below it, or pass sigma and center=E[X]", LowestSNRWarning, stacklevel=4)


def _warn_unconfirmed(sigma: float) -> None:
    warnings.warn(
        f"sigma: no reading was confirmed by a second one at a lower SNR within {_PROBE_ROUNDS} probes; the last, "
        f"{sigma:.3g}, is used. The model's posterior is not linear at any SNR it was probed at (modes far apart, "
        "or a model that does not reach the data's low-SNR regime); if the data's scale or mean is known, pass sigma "
        "and center=E[X]", LowestSNRWarning, stacklevel=4)


def sigma_from_slope(k: float, a: float, b: float) -> float:
    """σ of the Gaussian whose posterior slope at (α, β) = (a, b) is k: σ² = kα²/(β(1 − kβ)), for 0 < kβ < 1."""
    return math.sqrt(k * a * a / (b * (1 - k * b)))


def _in_linear_regime(probe: Callable[[float], tuple], snr: float) -> tuple[float, Any]:
    r"""σ from ``probe(r) -> (k, a, b, extra, jump)``, the posterior slope at r = β/α, with
    σ² = kα²/(β(1 − kβ)); ``jump`` is how far the probe moved its centre (RMS per coordinate; 0 for a fixed one).

    Starts at r = ``snr`` and moves r until the data SNR rσ̂ is within a factor 4 of ``snr``; the reading found
    there stands if one at a 4× lower SNR agrees within 25%, else the search goes on from the lower reading. A slope
    no Gaussian has (kβ ≥ 1, or k < 0) moves r 100× lower; one too small to be resolved (|kβ| under 1e-3 of a
    Gaussian's at data SNR ``snr``: s < 0.003 for 0.1) is not taken as a reading, and moves r to where it puts the
    data SNR at ``snr``, or 100× higher if it is ≤ 0. Exact for Gaussian data wherever it stops, and the low-SNR
    (mean eigenvalue) reading of other data at any scale the model's SNR range reaches. A reading that the model's
    lowest SNR leaves more than 4× above ``snr`` (the probe clamped to its t_min) is returned at once, with a
    :class:`LowestSNRWarning`: no lower probe exists to check it against. A probe that moved its centre by more
    than 4 of the data's marginal widths √(σ̂² + 1/r²) sat outside the data, where the posterior sees only its
    nearest part, and is read again around the new centre at r = ``snr``/jump. A search that ends without two
    agreeing readings returns its last one with a :class:`LowestSNRWarning`.
    """
    r, found, candidate = snr, None, None
    unresolved = _UNRESOLVED_FRACTION * snr * snr / (1 + snr * snr)
    for _ in range(_PROBE_ROUNDS):
        k, a, b, extra, jump = probe(r)
        if not math.isfinite(k):
            break
        if abs(k * b) < unresolved:  # at the probes' rounding: too low an SNR for the data's scale
            if candidate is not None:
                return candidate
            # Not a reading: a positive slope still says roughly where the data's scale lies, one ≤ 0 only "higher".
            r = snr / sigma_from_slope(k, a, b) if k > 0 else r * _STEEP_SNR_DROP
            continue
        if not 0 < k * b < 1:  # no Gaussian has this slope: the data is not linear at this SNR
            r, candidate = r / _STEEP_SNR_DROP, None
            continue
        sigma = sigma_from_slope(k, a, b)
        found = sigma, extra
        if b / a > _CLAMPED_BEYOND * r and (b / a) * sigma > _RESCALE_BEYOND * snr:
            _warn_beyond_linear_regime(b / a, sigma, snr)
            return found
        if jump > _FAR_PROBE * math.hypot(sigma, a / b):
            # The jump measures where the data lies, not its scale: a Gaussian of scale 4 sitting 250 from 0 jumps
            # as far as two modes 250 apart, so a re-read clamped to the model's lowest SNR is not warned about.
            r, candidate = snr / jump, None
            continue
        if candidate is not None:
            if 1 / _CHECK_TOLERANCE <= sigma / candidate[0] <= _CHECK_TOLERANCE:
                # σ from the reading it checks; ``extra`` from the check, the later (and lower-SNR) of the two
                return candidate[0], extra
            candidate = None
        elif 1 / _RESCALE_BEYOND <= r * sigma / snr <= _RESCALE_BEYOND:
            candidate, r = found, r / _CHECK_SNR_DROP
            continue
        r = snr / sigma
    if found is None:
        raise _NoSigma(f"could not estimate sigma from the model (slope {k:.3g} at snr {r:.3g}); pass sigma")
    _warn_unconfirmed(found[0])
    return found


def _check_probe_arguments(shape: Any, probes: Any, snr: float = PROBE_SNR) -> tuple[int, ...]:
    """The sample ``shape`` as a tuple of positive ints; ``probes`` an int >= 1 and ``snr`` positive, or errors."""
    sizes = check_shape(shape, "shape")
    check_int(probes, "probes")
    check_positive(snr, "snr")
    return sizes


@torch.no_grad()
def estimate_moments(predictor: Predictor, shape: tuple[int, ...], *, snr: float = PROBE_SNR, probes: int = 8,
                     generator: torch.Generator | None = None, device: DeviceLike | None = None,
                     dtype: torch.dtype = torch.float32,
                     require_sigma: bool = True) -> tuple[Tensor, float | None]:
    r"""(E[X], σ) with σ² = tr Cov(X)/D, from the model's posterior mean at a low SNR r = β/α.

    Antithetic probes x = βc ± αz give the slope k and the level μ(1 − kβ) + kβc of η_X, so μ and
    σ² = kα²/(β(1 − kβ)) are exact for Gaussian data at any SNR, from any prediction type: no evaluation at
    t = 0, where a noise or score prediction does not determine η_X, or on a base with β_0 > 0 (vp), where
    η_X(0, x) still depends on x. The probe moves to data SNR rσ̂ ≈ ``snr`` (each time around the latest βμ̂),
    so that non-Gaussian data is read in its linear regime whatever its scale. Where the model's slope admits no
    σ (k ≤ 0, as from an untrained network) this raises, or with ``require_sigma=False`` returns σ = None and
    the latest probe's mean level as μ. Where even the model's lowest SNR (its t_min) puts the data above that
    regime, the reading there comes with a :class:`LowestSNRWarning`.
    """
    check_predictor(predictor, "predictor")
    shape = _check_probe_arguments(shape, probes, snr)
    z = torch.randn((probes, *shape), generator=generator, dtype=dtype).to(device)
    center = torch.zeros(shape, dtype=dtype, device=z.device)

    moves = []

    def probe(r: float):
        nonlocal center
        k, new_center, a, b = _antithetic_probe(predictor, r, center, z)
        moves.append(_rms(new_center - center))
        center = new_center
        return k, a, b, center, moves[-1]

    try:
        sigma, mean = _in_linear_regime(probe, snr)
    except _NoSigma:  # only the missing σ; an error of the network itself still surfaces
        if require_sigma:
            raise
        return center, None
    # Each probe moves the centre c to μ̂; the level's error β(K − kI)(c − μ)/(1 − kβ), zero for isotropic data,
    # shrinks per probe by about the data SNR² times the anisotropy of K = βΣ(α² + β²Σ)⁻¹. Data far from 0 for its
    # spread (an anisotropic Gaussian 130σ out) was still 0.2σ off after the probes above, whose last one moved the
    # centre by 17σ: while the last move exceeds _MEAN_TOLERANCE σ, probe again at data SNR ``snr``.
    center = mean
    for _ in range(_MEAN_ROUNDS):
        if moves[-1] <= _MEAN_TOLERANCE * sigma:
            break
        probe(snr / sigma)
    return center, sigma


@torch.no_grad()
def estimate_mean(predictor: Predictor, shape: tuple[int, ...], *, probes: int = 8,
                  generator: torch.Generator | None = None, device: DeviceLike | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    r"""E[X] from the model alone.

    On a Gaussian base evaluated at t = 0 (:func:`reads_mean_directly`), η_X(0, x) = E[X] for every x (I_0 is
    independent of X): the mean of η_X(0, α_0 z) over ``probes`` draws, which averages out the network's error,
    exact for any data. Otherwise from :func:`estimate_moments`, exact for Gaussian data.
    """
    check_predictor(predictor, "predictor")
    shape = _check_probe_arguments(shape, probes)
    if not reads_mean_directly(predictor):
        return estimate_moments(predictor, shape, probes=probes, generator=generator, device=device, dtype=dtype,
                                require_sigma=False)[0]
    sched = predictor.schedule
    z = torch.randn((probes, *shape), generator=generator, dtype=dtype).to(device)
    _, eta_x = predictor.eta(float(sched.alpha(0.0)) * z, 0.0)
    return eta_x.mean(dim=0)


@torch.no_grad()
def estimate_sigma(predictor: Predictor, shape: tuple[int, ...], *, mean: Tensor | None = None,
                   snr: float = PROBE_SNR, probes: int = 8, generator: torch.Generator | None = None,
                   device: DeviceLike | None = None, dtype: torch.dtype = torch.float32) -> float:
    r"""σ with σ² = tr Cov(X)/D, from the model's posterior mean at a low SNR r = β/α.

    For X ~ N(μ, σ² I), η_X(t, x) − μ = k (x − β μ) with k = β σ² / (α² + β² σ²). Probing with x = βμ + αz
    gives k = ⟨αz, η_X − μ⟩/‖αz‖², and σ² = k α² / (β (1 − k β)): exact for Gaussian data at any SNR, and the
    covariance's mean eigenvalue in the linear (low-SNR) regime for other data, where the probe moves to data
    SNR rσ̂ ≈ ``snr``. Without ``mean``, on a predictor that does not read E[X] at t = 0
    (:func:`reads_mean_directly`), μ and σ come together from :func:`estimate_moments`.
    """
    check_predictor(predictor, "predictor")
    shape = _check_probe_arguments(shape, probes, snr)
    if mean is None and not reads_mean_directly(predictor):
        return estimate_moments(predictor, shape, snr=snr, probes=probes, generator=generator, device=device,
                                dtype=dtype)[1]
    if mean is None:
        mean = estimate_mean(predictor, shape, probes=probes, generator=generator, device=device, dtype=dtype)
    z = torch.randn((probes, *shape), generator=generator, dtype=dtype).to(device)

    def probe(r: float):
        t, a, b = _probe_coefficients(predictor, r)
        u = a * z
        _, eta_x = predictor.eta(b * mean + u, t)
        return float((u * (eta_x - mean)).sum() / (u * u).sum()), a, b, None, 0.0

    return _in_linear_regime(probe, snr)[0]


def data_mean(model: Predictor, sample_shape: tuple[int, ...], device: DeviceLike, dtype: torch.dtype) -> Tensor:
    """E[X] estimated from the model (cached on it per shape); where it is not read at t = 0, σ comes with it."""
    cache = model_cache(model)
    key = ("mean", sample_shape)
    if key not in cache:
        gen = torch.Generator().manual_seed(12345)
        kw = dict(probes=8, generator=gen, device=device, dtype=torch.float64 if dtype == torch.float64 else
                  torch.float32)
        if reads_mean_directly(model):
            cache[key] = estimate_mean(model, sample_shape, **kw)
        else:
            # σ comes from the same probes; where the model admits none, only an explicit σ can be used.
            cache[key], cache[("sigma-with-mean", sample_shape)] = estimate_moments(model, sample_shape,
                                                                                    require_sigma=False, **kw)
    return cache[key].to(device=device, dtype=dtype)


def data_sigma(model: Predictor, sample_shape: tuple[int, ...], mean: Tensor | None, device: DeviceLike,
               dtype: torch.dtype,
               known_mean: Tensor | None = None) -> float:
    """σ for a lazy schedule, from the model (cached): √(tr Cov X / D) when centring, else the RMS √(E‖X‖²/D);
    about ``known_mean`` (the caller's E[X]) where one is given."""
    cache = model_cache(model)
    key = ("sigma", sample_shape, mean is not None)
    if known_mean is not None:
        known_mean = known_mean.to(device).expand(sample_shape)
        key += (hashlib.sha256(known_mean.double().cpu().numpy().tobytes()).hexdigest(),)
    if key not in cache:
        gen = torch.Generator().manual_seed(54321)
        mu = data_mean(model, sample_shape, device, dtype) if known_mean is None else known_mean
        sig = cache.get(("sigma-with-mean", sample_shape)) if known_mean is None else None
        if sig is None:
            sig = estimate_sigma(model, sample_shape, mean=mu, probes=8, generator=gen, device=device,
                                 dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if mean is None:
            sig = math.sqrt(sig * sig + float((mu.double() ** 2).mean()))
        cache[key] = sig
    return cache[key]


# The model's own samples that estimate its covariance: max(2D, COVARIANCE_MIN_SAMPLES) of them (2 × DEFAULT_RANK above
# FULL_RANK_MAX_DIM), each from this many steps of the scalar lazy VP default.
COVARIANCE_SAMPLE_STEPS = 8
COVARIANCE_MIN_SAMPLES = 2048


_ESTIMATE_NOTE_START = "lazyinterp: raised while estimating E[X], sigma or the covariance"
_ESTIMATE_NOTE = (
    _ESTIMATE_NOTE_START + " from the model, which evaluates it on "
    "batches of probes or samples of its own, not on this call's batch of {batch}. A network with conditioning "
    "bound to that batch (class labels, prompts) must get one conditioning that broadcasts; or skip the estimate: "
    "center=E[X] as a tensor (or center=False) and schedule=li.lazy_vp(sigma), and an li.Covariance rather than "
    "covariance='model'.")


@contextlib.contextmanager
def noted_as_estimate(batch: int) -> Iterator[None]:
    """Adds :data:`_ESTIMATE_NOTE` to an error raised inside (once, on Python >= 3.11): the network fails on the
    estimate's own batch sizes, most often because per-sample conditioning was bound to the samples' batch."""
    try:
        yield
    except Exception as exc:
        if hasattr(exc, "add_note") and not any(n.startswith(_ESTIMATE_NOTE_START)
                                                for n in getattr(exc, "__notes__", ())):
            exc.add_note(_ESTIMATE_NOTE.format(batch=batch))
        raise


def data_covariance(model: Predictor, sample_shape: tuple[int, ...], device: DeviceLike, dtype: torch.dtype,
                    sampler: Callable[..., Tensor], batch_size: int = 256) -> Covariance:
    """Cov X of the model's own samples (cached on it per shape): full rank up to D = FULL_RANK_MAX_DIM, from
    max(2D, 2048) samples; above, from 2 × DEFAULT_RANK samples, isotropic noise plus at most DEFAULT_RANK spikes
    (:meth:`Covariance.spiked_from_samples`: with N ≪ D the plain top eigenpairs are mostly sampling noise).

    Measured on MNIST (docs/levers.md): a covariance from the model's posterior mean at a low SNR, like σ's
    estimate, was further from the data's and lost FID; the samples' covariance matches the data's trace to 0.1%.
    """
    cache = model_cache(model)
    key = ("covariance", sample_shape, torch.device(device).type)
    if key not in cache:
        dim = math.prod(sample_shape)
        full = dim <= FULL_RANK_MAX_DIM
        count = max(2 * dim, COVARIANCE_MIN_SAMPLES) if full else 2 * DEFAULT_RANK
        parts = []
        for lo in range(0, count, batch_size):
            hi = min(count, lo + batch_size)
            parts.append(sampler(model, shape=(hi - lo, *sample_shape), generator=13579, indices=range(lo, hi),
                                schedule="lazy-vp", steps=COVARIANCE_SAMPLE_STEPS, device=device, dtype=dtype))
        samples = torch.cat(parts)
        cache[key] = Covariance.from_samples(samples) if full else \
            Covariance.spiked_from_samples(samples, DEFAULT_RANK)
    return cache[key]
