"""CUDA-graph replay of sampling runs. The argument checks run everywhere; capture and replay need a GPU."""

import pytest
import torch
from conftest import make_mixture

import lazyinterp as li
from lazyinterp import graphs

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def test_cuda_graph_arguments_are_checked():
    model = make_mixture().model("linear")
    z = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
        li.sample(model, z, steps=2, schedule="lazy-vp", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: .*callback"):
        li.sample(model, z, steps=2, schedule="lazy-vp", cuda_graph=True, callback=lambda k, t, x: None)
    with pytest.raises(TypeError, match="cuda_graph"):
        li.sample(model, z, steps=2, schedule="lazy-vp", cuda_graph="yes")
    with pytest.raises(ValueError, match="inputs: expected CUDA tensors"):
        graphs.capture(lambda x: x * 2, (z,))


def test_nothing_is_capturing_outside_a_capture():
    assert graphs.capturing() is False


class _ConvNet(torch.nn.Module):
    """A small, randomly initialised convolutional velocity network (kernels like the bundled UNet's)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.conv2 = torch.nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t):
        h = torch.cat([x, t.view(-1, 1, 1, 1).expand_as(x)], dim=1)
        return self.conv2(torch.nn.functional.silu(self.norm(self.conv1(h))))


def _model():
    torch.manual_seed(0)
    return li.Model(_ConvNet().cuda(), "linear", "velocity")


@needs_cuda
@pytest.mark.parametrize("kwargs", [
    {"schedule": "lazy-vp", "steps": 6},
    {"schedule": "lazy-vp", "steps": 14},                   # ab2-pc by default
    {"schedule": "lazy-vp", "steps": 3, "solver": "heun"},
    {"schedule": "linear", "steps": 5},
    {"schedule": "point-mass", "diffusion": "optimal", "steps": 5},
    {"schedule": "lazy-vp", "diffusion": 0.5, "steps": 4, "solver": "heun"},
    # Keyed draws are computed inside the graph from the per-sample keys, its second input.
    {"schedule": "point-mass", "diffusion": "optimal", "steps": 5, "sde_noise": "keyed"},
    {"schedule": "lazy-vp", "diffusion": 0.5, "steps": 40, "sde_noise": "keyed"},  # two blocks of draws
    {"schedule": "point-mass", "diffusion": "optimal", "steps": 5, "sde_noise": "brownian"},
])
def test_replay_matches_the_eager_run_and_counts_evaluations(kwargs):
    model = _model()
    shape = (8, 1, 12, 12)
    for seed in (0, 1):  # the second call replays the first call's capture on new noise
        noise = None if kwargs["schedule"] == "point-mass" else \
            torch.randn(shape, generator=torch.Generator().manual_seed(seed)).cuda()
        model.nfe = 0
        eager, info = li.sample(model, noise, shape=shape, device="cuda", generator=seed, return_info=True, **kwargs)
        assert model.nfe == info.nfe + info.estimation_nfe
        model.nfe = 0  # σ and E[X] are remembered now: the replayed run's evaluations alone
        replayed = li.sample(model, noise, shape=shape, device="cuda", generator=seed, cuda_graph=True, **kwargs)
        assert model.nfe == info.nfe
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        assert not torch.equal(replayed, torch.zeros_like(replayed))
    captures = [k for k in model._cache if k[0] == "cuda-graph"]
    assert len(captures) == 1


@needs_cuda
def test_replays_follow_in_place_weight_updates_and_recapture_a_swapped_network():
    model = _model()
    noise = torch.randn(4, 1, 12, 12, device="cuda")
    first = li.sample(model, noise, steps=3, schedule="lazy-vp", cuda_graph=True)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(0.5)
    eager = li.sample(model, noise, steps=3, schedule="lazy-vp")
    torch.testing.assert_close(li.sample(model, noise, steps=3, schedule="lazy-vp", cuda_graph=True), eager)
    assert not torch.allclose(eager, first)
    torch.manual_seed(1)
    model.net = _ConvNet().cuda()
    eager = li.sample(model, noise, steps=3, schedule="lazy-vp")
    torch.testing.assert_close(li.sample(model, noise, steps=3, schedule="lazy-vp", cuda_graph=True), eager)


@needs_cuda
def test_replay_reports_a_non_finite_state_at_its_step():
    class Blows(torch.nn.Module):  # finite while |x| < 10, inf beyond
        def forward(self, x, t):
            return x / (10 - x.abs().amax()).clamp_min(0)

    model = li.Model(Blows(), "linear", "velocity")
    small = torch.full((4, 1, 3, 3), 0.5, device="cuda")
    assert torch.isfinite(li.sample(model, small, steps=4, schedule="linear", cuda_graph=True)).all()
    with pytest.raises(li.NonFiniteError, match="step 1 "):  # the replay fails; the eager repeat names the step
        li.sample(model, small * 100, steps=4, schedule="linear", cuda_graph=True)


@needs_cuda
def test_capture_and_replay_of_a_function():
    x = torch.randn(5, device="cuda")
    captured = graphs.capture(lambda v: v * 3 + 1, (x,))
    y = torch.randn(5, device="cuda")
    torch.testing.assert_close(graphs.replay(captured, (y,)), y * 3 + 1)
    assert bool(captured.finite)
    y[2] = float("inf")
    graphs.replay(captured, (y,))
    assert not bool(captured.finite)  # the flag is recomputed by every replay
    with pytest.raises(ValueError, match="shape"):
        graphs.replay(captured, (torch.randn(6, device="cuda"),))


@needs_cuda
def test_a_network_that_synchronises_is_refused_clearly():
    class Syncs(torch.nn.Module):
        def forward(self, x, t):
            return x * float(t[0].item())

    model = li.Model(Syncs(), "linear", "velocity")
    with pytest.raises(ValueError, match="cuda_graph: the run could not be captured"):
        li.sample(model, torch.randn(4, 3).cuda(), steps=2, schedule="linear", cuda_graph=True)
    # The failed capture leaves nothing behind: random draws on the device and later captures still work.
    assert torch.randn(3, device="cuda").isfinite().all()
    good = _model()
    noise = torch.randn(2, 1, 12, 12, device="cuda")
    torch.testing.assert_close(li.sample(good, noise, steps=2, schedule="lazy-vp", cuda_graph=True),
                               li.sample(good, noise, steps=2, schedule="lazy-vp"), rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_non_finite_noise_on_the_gpu_is_reported_as_the_noise(cuda_graph):
    """On a GPU the noise is not read back before sampling; its NaN shows in the state and is reported as the
    noise's error."""
    model = _model()
    noise = torch.randn(4, 1, 12, 12, device="cuda")
    noise[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="noise: expected finite values"):
        li.sample(model, noise, steps=3, schedule="lazy-vp", cuda_graph=cuda_graph)
