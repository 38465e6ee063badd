import math

import numpy as np
import pytest
import scipy.linalg
import torch

import lazyinterp as li
from lazyinterp import metrics
from lazyinterp.bench import gmm_2d
from lazyinterp.data import load, to_model_units
from lazyinterp.metrics import FeatureStats, SlicedW2, frechet_distance

N_SANITY = 2000


def random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def trace_sqrt_product_by_eigh(c1: np.ndarray, c2: np.ndarray) -> float:
    """Tr((C1 C2)^{1/2}) as the sum of square roots of the eigenvalues of C1^{1/2} C2 C1^{1/2} (PSD)."""
    w, v = np.linalg.eigh(c1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ c2 @ root), 0.0, None)).sum())


# --- Fréchet distance against closed forms --------------------------------------------------------------


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=12), random_cov(rng, 12)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_frechet_mean_shift_with_equal_covariances():
    rng = np.random.default_rng(1)
    cov = random_cov(rng, 10)
    mu1, shift = rng.normal(size=10), rng.normal(size=10)
    assert frechet_distance(mu1, cov, mu1 + shift, cov) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_diagonal_covariances_and_rotation_invariance():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # The distance between Gaussians is invariant under a common rotation, making C1 C2 non-diagonal.
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_frechet_is_symmetric_and_matches_eigen_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    c1, c2 = random_cov(rng, 16), random_cov(rng, 16)
    forward, backward = frechet_distance(mu1, c1, mu2, c2), frechet_distance(mu2, c2, mu1, c1)
    assert forward == pytest.approx(backward, rel=1e-9)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt_product_by_eigh(c1, c2)
    assert forward == pytest.approx(expected, rel=1e-8)


def test_frechet_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    c1, c2 = random_cov(rng, 20, rank=5), random_cov(rng, 20, rank=7)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt_product_by_eigh(c1, c2)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_adds_eps_when_the_square_root_fails(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def flaky_sqrtm(matrix):
        seen.append(np.array(matrix))
        return np.full_like(matrix, np.nan) if len(seen) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    eps = 1e-3
    value = frechet_distance(np.zeros(6), np.diag(a), np.zeros(6), np.diag(b), eps=eps)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], np.diag((a + eps) * (b + eps)))
    expected = np.trace(np.diag(a)) + np.trace(np.diag(b)) - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert value == pytest.approx(expected, rel=1e-9)


def test_frechet_rejects_bad_arguments():
    mu, cov = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1, mu2"):
        frechet_distance(mu, cov, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(mu, cov, mu, np.eye(4))
    with pytest.raises(ValueError, match="cov1"):
        frechet_distance(mu, np.full((3, 3), np.nan), mu, cov)


# --- streaming statistics ----------------------------------------------------------------------------------


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(loc=3.0, scale=2.0, size=(1003, 9)) @ rng.normal(size=(9, 9))
    stats = FeatureStats(0, np.zeros(9), np.zeros((9, 9)))
    for chunk in np.array_split(x, [1, 100, 101, 640]):
        stats.update(chunk)
    assert stats.n == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_feature_stats_merge_of_halves_equals_whole():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(500, 256))
    whole = FeatureStats.from_features(x)
    first, second = FeatureStats.from_features(x[:123]), FeatureStats.from_features(x[123:])
    for merged in (first.merge(second), first + second):
        assert merged.n == whole.n
        np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
        np.testing.assert_allclose(merged.cov, whole.cov, atol=1e-12)
    assert first.n == 123, "merge must not modify its operands"


def test_feature_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(8)
    stats = FeatureStats.from_features(rng.normal(size=(300, 256)) + 5.0)
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.n == stats.n and loaded.extractor == stats.extractor
    np.testing.assert_allclose(loaded.mean, stats.mean, rtol=1e-14)
    np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-10, atol=1e-12)
    more = rng.normal(size=(50, 256))
    np.testing.assert_allclose((loaded + FeatureStats.from_features(more)).cov,
                               stats.copy().update(more).cov, rtol=1e-9, atol=1e-10)


def test_feature_stats_errors(tmp_path):
    stats = FeatureStats()
    with pytest.raises(ValueError, match="features"):
        stats.update(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="features"):
        stats.update(np.full((4, 256), np.inf))
    with pytest.raises(ValueError, match="covariance"):
        FeatureStats.from_features(np.zeros((1, 256))).cov  # noqa: B018
    with pytest.raises(ValueError, match="other"):
        stats.merge(FeatureStats.from_features(np.zeros((2, 3))))
    with pytest.raises(TypeError, match="other"):
        stats.merge(np.zeros(256))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="path"):
        FeatureStats.load(junk)


# --- class report -------------------------------------------------------------------------------------------


def test_class_report_closed_forms():
    uniform = np.eye(10)[np.arange(50) % 10]
    report = metrics.class_report(uniform)
    assert report["mean_confidence"] == pytest.approx(1.0)
    assert report["class_entropy"] == pytest.approx(math.log(10))
    assert report["class_histogram"] == [5] * 10

    probs = np.full((4, 10), 0.05)
    probs[[0, 1, 2], 3] = 0.55
    probs[3, 7] = 0.55
    report = metrics.class_report(torch.from_numpy(probs))
    assert report["class_histogram"] == [0, 0, 0, 3, 0, 0, 0, 1, 0, 0]
    assert report["mean_confidence"] == pytest.approx(0.55)
    assert report["class_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_class_report_rejects_bad_probs():
    with pytest.raises(ValueError, match="probs"):
        metrics.class_report(np.ones((5, 9)) / 9)
    with pytest.raises(TypeError, match="probs"):
        metrics.class_report(np.ones((5, 10), dtype=np.int64))
    with pytest.raises(ValueError, match="probs"):
        metrics.class_report(np.full((5, 10), np.nan))


# --- the classifier on MNIST --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_test():
    return load("mnist", "test")


@pytest.fixture(scope="module")
def held_out_subset(mnist_test):
    images, labels = mnist_test
    idx = np.random.default_rng(0).choice(len(images), N_SANITY, replace=False)
    feats, probs = metrics.features_and_probs(to_model_units(images[idx]))
    return images[idx], labels[idx], feats, probs


@pytest.fixture(scope="module")
def train_fid():
    images, _ = load("mnist", "train")
    idx = np.random.default_rng(0).choice(len(images), N_SANITY, replace=False)
    return metrics.fid_mnist(to_model_units(images[idx]))


@pytest.fixture(scope="module")
def noise_fid():
    noise = torch.rand(N_SANITY, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return metrics.fid_mnist(noise)


def test_classifier_is_cached_and_in_eval_mode():
    model = metrics.classifier()
    assert model is metrics.classifier()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_classifier_accuracy(held_out_subset):
    _, labels, feats, probs = held_out_subset
    assert feats.shape == (N_SANITY, 256) and probs.shape == (N_SANITY, 10)
    assert feats.dtype == np.float64 and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.98


def test_model_units_are_mapped_to_the_classifier_normalisation(held_out_subset):
    images, _, feats, probs = held_out_subset
    x = torch.from_numpy(images[:64]).float()[:, None] / 255.0
    with torch.no_grad():
        logits = metrics.classifier()((x - 0.1307) / 0.3081)
    np.testing.assert_allclose(probs[:64], torch.softmax(logits.double(), 1).numpy(), atol=1e-5)
    small_batches, _ = metrics.features_and_probs(to_model_units(images[:64]), batch_size=7)
    np.testing.assert_allclose(small_batches, feats[:64], rtol=1e-4, atol=1e-4)


def test_class_report_on_real_images(held_out_subset):
    report = metrics.class_report(held_out_subset[3])
    assert report["mean_confidence"] > 0.95
    assert report["class_entropy"] == pytest.approx(math.log(10), abs=0.02)
    assert sum(report["class_histogram"]) == N_SANITY


def test_fid_of_real_images_is_small(train_fid, noise_fid):
    assert 0.0 < train_fid < 25.0
    assert noise_fid > 500.0
    assert 10.0 * train_fid < noise_fid


def test_evaluate_matches_its_parts(mnist_test):
    images = to_model_units(mnist_test[0][:300])
    result = metrics.evaluate(images)
    feats, probs = metrics.features_and_probs(images)
    reference = metrics.reference_stats()
    stats = FeatureStats.from_features(feats)
    expected_fid = frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)
    assert result["n"] == 300
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-9)
    assert result["fid"] == pytest.approx(metrics.fid_mnist(images, reference), rel=1e-9)
    report = metrics.class_report(probs)
    assert result["mean_confidence"] == pytest.approx(report["mean_confidence"])
    assert result["class_entropy"] == pytest.approx(report["class_entropy"])


def test_shipped_reference_matches_recomputed():
    shipped = metrics.reference_stats()
    recomputed = metrics.compute_reference_stats()
    assert shipped.n == recomputed.n == 10_000
    scale = float(np.abs(recomputed.cov).max())
    np.testing.assert_allclose(shipped.mean, recomputed.mean, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(shipped.cov, recomputed.cov, rtol=1e-4, atol=1e-5 * scale)
    gap = frechet_distance(shipped.mean, shipped.cov, recomputed.mean, recomputed.cov)
    assert gap < 1e-2


def test_reference_stats_returns_independent_copies():
    first = metrics.reference_stats()
    first.update(np.ones((5, 256)))
    assert metrics.reference_stats().n == 10_000


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "error"),
    [
        (np.zeros((4, 1, 28, 28), dtype=np.float32), TypeError),
        (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), TypeError),
        (torch.zeros(4, 28, 28), ValueError),
        (torch.zeros(4, 3, 28, 28), ValueError),
        (torch.zeros(4, 1, 32, 32), ValueError),
        (torch.full((4, 1, 28, 28), float("nan")), ValueError),
        (torch.full((4, 1, 28, 28), float("inf")), ValueError),
    ],
)
def test_bad_images_are_rejected(images, error):
    with pytest.raises(error, match="images"):
        metrics.features_and_probs(images)
    with pytest.raises(error, match="samples"):
        metrics.fid_mnist(images)
    with pytest.raises(error, match="samples"):
        metrics.evaluate(images)


def test_fid_needs_two_samples_and_valid_arguments():
    with pytest.raises(ValueError, match="samples"):
        metrics.fid_mnist(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="samples"):
        metrics.evaluate(torch.zeros(1, 1, 28, 28))
    with pytest.raises(TypeError, match="reference"):
        metrics.fid_mnist(torch.zeros(2, 1, 28, 28), reference={"mean": 0})
    with pytest.raises(ValueError, match="batch_size"):
        metrics.features_and_probs(torch.zeros(2, 1, 28, 28), batch_size=0)


def test_sliced_w2_is_near_zero_for_the_target_and_large_otherwise():
    target = gmm_2d()
    n = 2000
    sw = SlicedW2(target, n)
    fresh = sw(target.sample(n, torch.Generator().manual_seed(11)))
    gaussian = sw(torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64))
    assert fresh < 0.15 and gaussian > 1.0, (fresh, gaussian)


def test_sliced_w2_matches_closed_form_between_gaussians():
    """Between N(0, I) and N(m, s² I) in R^D every projection is a pair of 1-D Gaussians, so
    SW₂² = E_θ (θ·m)² + (1 − s)² = ‖m‖²/D + (1 − s)²."""
    mean, s = torch.tensor([3.0, 0.0], dtype=torch.float64), 0.5
    target = li.GaussianMixture.gaussian(mean, torch.tensor(s * s, dtype=torch.float64))
    n = 4000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = math.sqrt(9.0 / 2 + (1 - s) ** 2)
    assert SlicedW2(target, n)(x) == pytest.approx(exact, rel=0.1)


def test_sliced_w2_from_points_is_the_same_metric_for_targets_known_by_samples():
    target = gmm_2d()
    n = 500
    built = SlicedW2(target, n)
    # The constructor's own target sample and directions, handed over in float32 and unnormalised.
    gen = torch.Generator().manual_seed(2024)
    dirs = torch.randn(128, 2, generator=gen, dtype=torch.float64)
    reference = target.sample(built.k * n, gen)
    direct = SlicedW2.from_points(reference.float(), n, 3.0 * dirs.float())
    x = target.sample(n, torch.Generator().manual_seed(5))
    assert direct.k == built.k and direct(x) == pytest.approx(built(x), rel=1e-6)
    with pytest.raises(ValueError, match="reference: expected a multiple of n = 500 points, got 501"):
        SlicedW2.from_points(reference[:501], n, dirs)
