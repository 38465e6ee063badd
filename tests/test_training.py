import pytest
import torch

from lazyinterp import data
from lazyinterp.models import load_network
from lazyinterp.training import TrainConfig, train


def tiny_config(**overrides) -> TrainConfig:
    base = dict(steps=4, batch_size=8, channels=(8, 16), checkpoint_every=2, lr=1e-3, warmup=2, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def test_training_runs_exports_and_resumes_identically(tmp_path):
    images, _ = data.load("mnist", "test")
    images = images[:64]
    straight = train(tiny_config(), tmp_path / "a", images=images, progress=False)
    # Interrupted after 2 steps (a checkpoint), then resumed to 4.
    train(tiny_config(steps=2), tmp_path / "b", images=images, progress=False)
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train(tiny_config(), tmp_path / "b", images=images, progress=False)
    net_a, info_a = load_network(straight)
    net_b, _ = load_network(resumed)
    for (name, p), q in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert info_a.schedule == "linear" and info_a.predicts == "velocity"
    assert info_a.training["steps"] == 4 and info_a.training["final_loss"] > 0
    log = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    assert log, "the loss is logged"


def test_loss_decreases_on_a_small_batch(tmp_path):
    images, _ = data.load("mnist", "test")
    cfg = tiny_config(steps=60, lr=3e-3, warmup=5, checkpoint_every=1000, batch_size=16)
    train(cfg, tmp_path, images=images[:256], progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    losses = state["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


@pytest.mark.parametrize("overrides,message", [
    (dict(batch_size=65), "batch_size: 65 is more than the 64 training images"),
    (dict(device="meta"), "device: the meta device holds no values"),
    (dict(device="nosuchdevice"), "device: expected a torch device"),
    (dict(steps=0), "steps: expected an integer >= 1, got 0"),
    (dict(lr=1e39), "lr: expected a positive number a float32 parameter can take"),
    (dict(lr=-1e-3), "lr: expected a positive number"),
    (dict(ema_decay=1.0), r"ema_decay: expected a number in \[0, 1\)"),
    (dict(channels=(12,)), "channels: each width must be a positive multiple of 8"),
    (dict(threads=10**6), "threads: expected an integer from 0 to"),
    (dict(warmup=2.5), "warmup: expected an integer"),
])
def test_settings_that_cannot_train_are_refused_before_any_file_is_written(tmp_path, overrides, message):
    images, _ = data.load("mnist", "test")
    with pytest.raises((ValueError, TypeError), match=message):
        train(tiny_config(**overrides), tmp_path / "run", images=images[:64], progress=False)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path):
    """A learning rate far too large makes the loss NaN after the first update: training stops there, naming lr,
    before the NaN weights reach a saved state or an exported model."""
    images, _ = data.load("mnist", "test")
    with pytest.raises(ValueError, match=r"lr: the loss became (nan|inf) at step 2 with learning rate \S+; lower it"):
        train(tiny_config(lr=1e30, warmup=0, steps=5, checkpoint_every=1), tmp_path, images=images[:64],
              progress=False)
    exported = load_network(tmp_path / "model.safetensors")[0]  # from step 1, before the loss diverged
    assert all(bool(torch.isfinite(p).all()) for p in exported.parameters())
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 1
    # Diverging before the first checkpoint leaves nothing behind.
    with pytest.raises(ValueError, match="lr: the loss became"):
        train(tiny_config(lr=1e30, warmup=0, steps=5, checkpoint_every=100), tmp_path / "fresh", images=images[:64],
              progress=False)
    assert not (tmp_path / "fresh").exists()


def test_a_model_that_is_neither_a_name_nor_a_path_is_refused():
    from lazyinterp.models import CheckpointError, load_model

    for model in (None, 3, ["mnist"]):
        with pytest.raises(TypeError, match=r"model: expected a bundled name \(mnist\) or a checkpoint path"):
            load_model(model)
    with pytest.raises(CheckpointError, match="unknown model 'nosuchmodel'"):
        load_model("nosuchmodel")
