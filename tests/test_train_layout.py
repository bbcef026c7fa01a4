"""Channels-last training on the CPU (lightning_flare.train_layout): when it is on, what it changes, and that it
trains the same function as the contiguous layout."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from conftest import tiny_cli_args

import cli
from lightning_flare.train_layout import ChannelsLastTraining, use_channels_last_training


@pytest.mark.parametrize("setting, device, precision, expected", [
    ("auto", "cpu", "32-true", True),
    ("auto", "cpu", "bf16-mixed", False),  # bf16 with AMX: channels-last measured ~1.6x slower
    ("auto", "cuda", "32-true", False),  # GPUs keep their measured paths
    ("auto", "cuda", "16-mixed", False),
    (True, "cuda", "16-mixed", True),
    (False, "cpu", "32-true", False),
])
def test_when_channels_last_training_is_used(setting, device, precision, expected):
    assert use_channels_last_training(setting, device, precision) is expected


@pytest.mark.parametrize("bad", ["yes", None, 1])
def test_a_bad_setting_is_refused_when_the_callback_is_built(bad):
    with pytest.raises(ValueError, match=r"ChannelsLastTraining enabled must be true, false or 'auto', got"):
        ChannelsLastTraining(bad)


class _LayoutSpy(L.Callback):
    """Records the weights at the start and, at every training batch, whether the convolution weights are
    channels-last."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = [m.weight for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv3d)]
        # (1-channel and 1x1x1 kernels are both layouts at once; the others are one or the other)
        self.seen.append(all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
                         and any(not w.is_contiguous() for w in weights))


def _fit(tiny_dataset, tmp_path, enabled):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / f"run_{enabled}")
    plugins = [{"class_path": "lightning_flare.checkpoint_io.AtomicCheckpointIO"}]  # fp32 whatever the CPU
    built = cli.main([*args, "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0",
                      "--trainer.plugins", json.dumps(plugins), "--trainer.precision", "32-true"], run=False)
    spy = _LayoutSpy()
    built.trainer.callbacks.extend([ChannelsLastTraining(enabled), spy])
    built.trainer.fit(built.model, datamodule=built.datamodule)
    return built, spy


def test_channels_last_training_trains_the_same_function_and_ends_contiguous(tiny_dataset, tmp_path):
    plain, plain_spy = _fit(tiny_dataset, tmp_path, False)
    fast, fast_spy = _fit(tiny_dataset, tmp_path, "auto")  # the CPU in fp32: on
    assert plain_spy.seen == [False] * 4
    assert fast_spy.seen == [True] * 4
    optimizer_params = {id(p) for g in fast.trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in fast.model.parameters()}  # the optimizer stepped the module's own
    assert all(p.is_contiguous() for p in fast.model.parameters())  # back to the usual layout after fit
    plain_state, fast_state = plain.model.net.state_dict(), fast.model.net.state_dict()
    assert plain_state.keys() == fast_state.keys()
    for key, value in plain_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-3, atol=1e-5, msg=key)
    moved = [k for k, v in fast_state.items() if v.is_floating_point() and not torch.equal(v, fast_spy.initial[k])]
    assert len(moved) > len(fast_state) // 2  # 4 SGD steps changed the weights (same start in both runs)
    assert all(torch.equal(plain_spy.initial[k], v) for k, v in fast_spy.initial.items())
