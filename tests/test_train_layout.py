"""Channels-last training on the CPU (lightning_flare.train_layout): when it is on, what it changes, and that it
trains the same function as the contiguous layout."""
from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import tiny_cli_args

import cli
from lightning_flare import train_layout
from lightning_flare.inference import contiguous_forward
from lightning_flare.network import PlainConvUNet
from lightning_flare.train_layout import ChannelsLastTraining, time_training_layouts, use_channels_last_training

CONVS = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)


@pytest.mark.parametrize("setting, device, precision, faster, expected", [
    ("auto", "cpu", "32-true", True, True),
    ("auto", "cpu", "32-true", False, False),  # measured slower (or not clearly faster) on this CPU
    ("auto", "cpu", "bf16-mixed", None, False),  # bf16 with AMX: channels-last measured ~1.7x slower; not timed
    ("auto", "cpu", "64-true", None, False),
    ("auto", "cuda", "32-true", None, False),  # GPUs keep their measured paths
    (True, "cuda", "16-mixed", None, True),
    (False, "cpu", "32-true", None, False),
])
def test_when_channels_last_training_is_used(setting, device, precision, faster, expected):
    def measure():
        assert faster is not None, "timed where the setting or the precision decides"
        return faster

    assert use_channels_last_training(setting, device, precision, measure) is expected


@pytest.mark.parametrize("bad", ["yes", None, 1])
def test_a_bad_setting_is_refused_when_the_callback_is_built(bad):
    with pytest.raises(ValueError, match=r"ChannelsLastTraining enabled must be true, false or 'auto', got"):
        ChannelsLastTraining(bad)


def _tiny_net() -> PlainConvUNet:
    return PlainConvUNet(features_per_stage=(4, 8), strides=(1, 2), deep_supervision=True)


def test_layout_timing_leaves_the_network_alone():
    net = _tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    timings = time_training_layouts(net, (1, 1, 8, 8, 8), repeats=1)
    assert set(timings) == {"contiguous", "channels_last"} and all(t > 0 for t in timings.values())
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def _convs_channels_last(net: torch.nn.Module) -> bool:
    weights = [m.weight for m in net.modules() if isinstance(m, CONVS)]
    # (1-channel and 1x1x1 kernels are both layouts at once; the others are one or the other)
    return all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights) \
        and any(not w.is_contiguous() for w in weights)


def test_setup_for_other_stages_changes_nothing():
    net = _tiny_net()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"), broadcast=lambda v, src: v),
                              precision="32-true")
    ChannelsLastTraining(True).setup(trainer, SimpleNamespace(net=net), "test")
    assert not _convs_channels_last(net)
    ChannelsLastTraining(True).setup(trainer, SimpleNamespace(net=net), "fit")
    assert _convs_channels_last(net)


def test_restored_momentum_takes_its_parameters_layout():
    weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    momentum = torch.randn(4, 3, 3, 3, 3)  # contiguous, as an older checkpoint saved it
    optimizer.state[weight]["momentum_buffer"] = momentum
    ChannelsLastTraining(True).on_train_start(SimpleNamespace(optimizers=[optimizer]), None)
    restored = optimizer.state[weight]["momentum_buffer"]
    assert restored.stride() == weight.stride() and torch.equal(restored, momentum)


def test_contiguous_forward_runs_a_contiguous_copy_of_channels_last_weights():
    net = _tiny_net()
    assert contiguous_forward(net) is net
    net.to(memory_format=torch.channels_last_3d)
    copy = contiguous_forward(net)
    assert copy is not net and all(p.is_contiguous() for p in copy.parameters()) and _convs_channels_last(net)


class _LayoutSpy(L.Callback):
    """Records the weights at the start and, at every training batch, whether the convolution weights are
    channels-last; raises at batch ``fail_at`` (a fit that fails)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seen: list[bool] = []
        self.fail_at = fail_at

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(_convs_channels_last(pl_module.net))
        if len(self.seen) == self.fail_at:
            raise RuntimeError("stop here")


def _fit(tiny_dataset, tmp_path, enabled, fail_at=None):
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / f"run_{enabled}_{fail_at}")
    plugins = [{"class_path": "lightning_flare.checkpoint_io.AtomicCheckpointIO"}]  # fp32 whatever the CPU
    built = cli.main([*args, "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0",
                      "--trainer.plugins", json.dumps(plugins), "--trainer.precision", "32-true"], run=False)
    spy = _LayoutSpy(fail_at)
    built.trainer.callbacks.extend([ChannelsLastTraining(enabled), spy])
    if fail_at is None:
        built.trainer.fit(built.model, datamodule=built.datamodule)
    else:
        with pytest.raises(RuntimeError, match="stop here"):
            built.trainer.fit(built.model, datamodule=built.datamodule)
    return built, spy


@pytest.mark.parametrize("measured", [{"contiguous": 1.0, "channels_last": 0.9}, {"contiguous": 1.0, "channels_last": 0.97}])
def test_auto_follows_the_timed_step(tiny_dataset, tmp_path, monkeypatch, measured):
    monkeypatch.setattr(train_layout, "time_training_layouts", lambda net, shape: measured)
    _, spy = _fit(tiny_dataset, tmp_path, "auto")
    assert spy.seen == [measured["channels_last"] < train_layout.MARGIN * measured["contiguous"]] * 4


def test_channels_last_training_trains_the_same_function_and_ends_contiguous(tiny_dataset, tmp_path):
    plain, plain_spy = _fit(tiny_dataset, tmp_path, False)
    fast, fast_spy = _fit(tiny_dataset, tmp_path, True)
    assert plain_spy.seen == [False] * 4
    assert fast_spy.seen == [True] * 4
    assert all(p.is_contiguous() for p in fast.model.parameters())  # back to the usual layout after fit
    plain_state, fast_state = plain.model.net.state_dict(), fast.model.net.state_dict()
    assert plain_state.keys() == fast_state.keys()
    for key, value in plain_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-3, atol=1e-5, msg=key)
    moved = [k for k, v in fast_state.items() if v.is_floating_point() and not torch.equal(v, fast_spy.initial[k])]
    assert len(moved) > len(fast_state) // 2  # 4 SGD steps changed the weights (same start in both runs)
    assert all(torch.equal(plain_spy.initial[k], v) for k, v in fast_spy.initial.items())


def test_a_failed_fit_leaves_the_network_contiguous(tiny_dataset, tmp_path):
    built, spy = _fit(tiny_dataset, tmp_path, True, fail_at=2)
    assert spy.seen == [True, True]
    assert all(p.is_contiguous() for p in built.model.parameters())
