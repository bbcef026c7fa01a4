"""TimeBudget: the number of epochs planned from the measured time, the schedule stretched over them, and the
last planned epoch validated. A fake clock (10 s per training iteration) makes the plan independent of this CPU."""
import json

import lightning as L
import pytest

from conftest import tiny_cli_args

import cli
from lightning_flare.module import poly_lr_factor
from lightning_flare.time_budget import TimeBudget, planned_epochs


@pytest.mark.parametrize("args, expected", [
    # max_epochs, done, elapsed, budget, epoch_s, validation_s
    ((40, 1, 60.0, 1800.0, 50.0, 0.0), 35),  # 1 + floor(1740 / 50) = 35
    ((40, 10, 560.0, 1800.0, 50.0, 20.0), 34),  # 10 + floor(1220 / 50) = 34
    ((40, 1, 60.0, 9000.0, 50.0, 0.0), 40),  # a fast CPU: the unhurried fit
    ((40, 5, 1900.0, 1800.0, 50.0, 0.0), 5),  # over budget: stop at the epoch just done
    ((40, 40, 10.0, 1800.0, 50.0, 0.0), 40),
    ((3, 1, 0.0, 10.0, 0.0, 0.0), 3),  # no time measured yet
    ((40, 5, 1900.0, 1800.0, 50.0, 0.0, False), 6),  # over budget after an epoch that did not validate: one more
    ((40, 40, 1900.0, 1800.0, 50.0, 0.0, False), 40),
])
def test_planned_epochs_by_hand(args, expected):
    assert planned_epochs(*args) == expected


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), "30", True])
def test_bad_budget_is_refused(minutes):
    with pytest.raises(ValueError, match="minutes"):
        TimeBudget(minutes)


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _Ticks(L.Callback):
    """Advances the fake clock by 10 s per training iteration (plus ``extra[epoch]`` once in that epoch) and records
    where validations ran."""

    def __init__(self, clock: _Clock, extra: dict[int, float] | None = None) -> None:
        self.clock, self.validated_epochs, self.extra = clock, [], dict(extra or {})

    def on_train_batch_end(self, trainer, *args) -> None:
        self.clock.now += 10.0 + self.extra.pop(trainer.current_epoch, 0.0)

    def on_validation_epoch_end(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self.validated_epochs.append(trainer.current_epoch)


@pytest.mark.parametrize("extra", [{}, {2: 30.0}])
def test_fit_plans_its_epochs_and_decays_the_lr_to_the_last_one(tiny_dataset, tmp_path, monkeypatch, extra):
    """2 iterations of 10 s per epoch, 90 s: after each epoch e, e + floor((90 - 20 e) / 20) = 4 epochs. With 30 s
    more in epoch 2 (index), the plan after it is 2 + 1 = 3 epochs, ending at an epoch that did not validate: one more
    epoch runs, told to validate, so the fit is again 4 epochs and validates its last."""
    clock = _Clock()
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(clock))
    ticks = _Ticks(clock, extra)
    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "run")
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "lightning_flare.time_budget.TimeBudget", "init_args": {"minutes": 1.5}})
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    lrs = []

    class _Lr(L.Callback):
        def on_train_epoch_start(self, trainer, *a):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    built = cli.main([*args, "--trainer.max_epochs", "10", "--trainer.check_val_every_n_epoch", "5",
                      "--trainer.num_sanity_val_steps", "0"], run=False)
    built.trainer.callbacks.extend([ticks, _Lr()])
    built.trainer.fit(built.model, datamodule=built.datamodule)
    result = built
    trainer = result.trainer
    assert trainer.max_epochs == 4 and trainer.global_step == 8 and trainer.current_epoch == 4
    lr0 = result.model.hparams.lr
    assert lrs == pytest.approx([lr0 * poly_lr_factor(e, 4) for e in range(4)])
    assert ticks.validated_epochs == [3]  # check_val_every_n_epoch 5 would never validate; the last epoch does
    budget = next(c for c in trainer.callbacks if isinstance(c, TimeBudget))
    assert budget.state_dict() == {"elapsed_s": 80.0 + sum(extra.values()), "max_epochs": 10, "plan": 4}


def test_a_resumed_fit_counts_the_time_before_it(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(clock))
    first = TimeBudget(30)
    clock.now = 600.0
    state = first.state_dict()
    clock.now = 1000.0  # a new process
    second = TimeBudget(30)
    second.load_state_dict(state)
    clock.now = 1100.0
    assert second.elapsed_s() == 700.0 and second.max_epochs is None and second.plan is None


class _FitLoop:
    max_epochs = 40


class _Strategy:
    @staticmethod
    def broadcast(value):
        return value


class _Trainer:
    """What TimeBudget reads of a trainer (here: resumed from a checkpoint written inside epoch 29)."""
    check_val_every_n_epoch, current_epoch, enable_validation, lr_scheduler_configs = 10, 29, True, []
    strategy = _Strategy()

    def __init__(self) -> None:
        self.fit_loop = _FitLoop()

    @property
    def max_epochs(self) -> int:
        return self.fit_loop.max_epochs


def test_a_fit_resumed_inside_an_epoch_keeps_its_plan_and_validates_its_last_epoch(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(clock))
    budget = TimeBudget(30)
    budget.load_state_dict({"elapsed_s": 1700.0, "max_epochs": 40, "plan": 30})
    trainer = _Trainer()
    budget.on_train_start(trainer, None)
    assert trainer.max_epochs == 30 and trainer.check_val_every_n_epoch == 1  # epoch 29 is the last: it validates
    clock.now = 5.0  # the rest of epoch 29 (Lightning skips on_train_epoch_start when it resumes inside an epoch)
    budget.on_train_epoch_end(trainer, None)
    assert budget.plan == 30 and trainer.max_epochs == 30  # 5 s are not an epoch's time: no new plan from them


def test_epochs_that_slow_down_count_more_than_the_mean(monkeypatch):
    """Six epochs of 10 s, then three of 40 s, 600 s budget: the mean (20 s) would plan 9 + floor(420 / 20) = 30
    epochs; the last three epochs' mean (40 s) plans 9 + floor(420 / 40) = 19."""
    clock = _Clock()
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(clock))
    budget, trainer = TimeBudget(10), _Trainer()
    budget.on_train_start(trainer, None)
    for epoch, seconds in enumerate([10.0] * 6 + [40.0] * 3):
        trainer.current_epoch = epoch
        budget.on_train_epoch_start(trainer, None)
        clock.now += seconds
        budget.on_train_epoch_end(trainer, None)
    assert budget.plan == 19 and trainer.max_epochs == 19
