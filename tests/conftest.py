import pytest
import torch

import lazyinterp as li

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def make_mixture() -> li.GaussianMixture:
    """A 2-D, three-component mixture with anisotropic, rotated covariances and a non-zero mean."""
    rot = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=torch.float64)
    covs = torch.stack([
        torch.diag(torch.tensor([0.30, 0.05], dtype=torch.float64)),
        rot @ torch.diag(torch.tensor([0.10, 0.40], dtype=torch.float64)) @ rot.T,
        torch.diag(torch.tensor([0.2, 0.2], dtype=torch.float64)),
    ])
    means = torch.tensor([[1.5, -0.5], [-1.0, 1.0], [0.3, 2.0]], dtype=torch.float64)
    return li.GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def gaussian(sigma: float, dim: int = 3, mean: float = 0.0) -> li.GaussianMixture:
    """N(mean·1, σ² I) in ``dim`` dimensions, in float64."""
    return li.GaussianMixture.gaussian(torch.full((dim,), mean, dtype=torch.float64),
                                       torch.tensor(sigma**2, dtype=torch.float64))


@pytest.fixture
def mixture() -> li.GaussianMixture:
    return make_mixture()


def all_schedules():
    return [li.linear(), li.cosine(), li.vp(), li.lazy_vp(0.7), li.lazy_vp(1.0), li.point_mass(1.0),
            li.point_mass(0.5),
            li.Schedule(lambda t: 1 - t**2, lambda t: t**2, name="quadratic")]


def gaussian_schedules():
    return [s for s in all_schedules() if s.base == "gaussian"]


# Tiny random SD3 and FLUX transformers and their conditioning, for the tests of lazyinterp.diffusers. The imports wait
# for the first test that asks, so the rest of the suite neither needs nor loads diffusers.
@pytest.fixture(scope="session")
def sd3():
    return pytest.importorskip("diffusers_support").tiny_sd3()


@pytest.fixture(scope="session")
def flux():
    return pytest.importorskip("diffusers_support").tiny_flux()


@pytest.fixture(scope="session")
def embeds():
    return pytest.importorskip("diffusers_support").tiny_embeds()
