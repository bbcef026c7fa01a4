"""A wall-time budget for ``fit``: as many epochs as fit in it, with the learning-rate schedule stretched over them.

nnU-Net fixes the number of epochs; on a slower CPU the same recipe then takes longer. With a budget, the fit plans
its number of epochs from the time it has measured so far, at the end of every epoch:

    planned = min(max_epochs, done + floor((budget - elapsed - one validation) / seconds per epoch))

``elapsed`` counts from the callback's construction (LightningCLI builds the trainer before the data module
prepares the data, so the preprocessing counts; the imports before it, a few seconds, do not) plus the time of
earlier runs of a resumed fit; ``seconds per epoch`` is the mean over the epochs this run began, validations
included, or that of the last three epochs where it is larger (a machine that slows down). The plan becomes
``trainer.max_epochs``, which the poly schedule (``FlareModule.configure_optimizers``) reads at every epoch, so the
learning rate still decays to zero at the last planned epoch. The last epoch
validates (the full-volume validation, the postprocessing choice and the best checkpoint see the final weights)
whatever ``check_val_every_n_epoch`` says: an epoch planned as the last one is told to validate when it starts,
and a plan that would end at an epoch that did not validate runs one more epoch (at most one epoch over the
budget). On a CPU fast enough for ``max_epochs`` the number of epochs and the schedule do not change; only a
``max_epochs`` that is not a multiple of ``check_val_every_n_epoch`` gains that last validation.
A resumed fit keeps the plan of the run that wrote its checkpoint until its first epoch ends; a fit that already
ended cannot be extended by resuming it with a larger budget.
"""
from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

RECENT = 3  # epochs whose mean time counts when it exceeds the mean of all epochs


def planned_epochs(max_epochs: int, done: int, elapsed_s: float, budget_s: float, epoch_s: float,
                   validation_s: float, validated: bool = True) -> int:
    """Epochs of the whole fit (at least ``done``, at most ``max_epochs``) that end within ``budget_s``: the
    remaining budget, less one validation (the last epoch's), divided by the seconds of one epoch. When none fits
    and the epoch just done did not validate (``validated``), one more (which is told to validate)."""
    if done >= max_epochs:
        return max_epochs
    if epoch_s <= 0:
        return max_epochs
    more = math.floor((budget_s - elapsed_s - validation_s) / epoch_s)
    plan = max(done, min(max_epochs, done + max(more, 0)))
    return done + 1 if plan == done and not validated else plan


def refresh_epoch_schedules(trainer: L.Trainer) -> None:
    """Lightning steps epoch schedulers at the epoch's last batch, before ``on_train_epoch_end`` changes the plan:
    a ``LambdaLR`` (whose factor reads ``trainer.max_epochs``) sets the next epoch's learning rate again."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, LambdaLR):
            lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs


class TimeBudget(Callback):
    """Fits ``fit`` into ``minutes`` of wall time (module docstring). ``minutes``: the whole ``fit`` process
    from its start, preprocessing and validations included."""

    clock = staticmethod(time.monotonic)  # seconds; tests replace it

    def __init__(self, minutes: float) -> None:
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) \
                or minutes <= 0:
            raise ValueError(f"TimeBudget minutes must be a positive number, got {minutes!r}")
        self.budget_s = float(minutes) * 60
        self._start = self.clock()  # LightningCLI builds the trainer before the data module prepares the data
        self.earlier_s = 0.0  # wall time of the runs before a resume (from the checkpoint)
        self.max_epochs: int | None = None
        self.plan: int | None = None
        self._train_start = self._val_start = 0.0
        self._validations: list[float] = []
        self._validated_epoch: int | None = None
        self._begun_epoch: int | None = None
        self._epochs_this_run = 0
        self._epoch_ends: list[float] = []
        self._check_val: int | None = None

    def elapsed_s(self) -> float:
        return self.earlier_s + self.clock() - self._start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ValueError("TimeBudget needs trainer.max_epochs (the epochs of an unhurried fit), got "
                             f"{trainer.max_epochs!r}")
        self.max_epochs = trainer.max_epochs  # this run's configuration
        self._train_start, self._epochs_this_run, self._epoch_ends = self.clock(), 0, []
        self._check_val = trainer.check_val_every_n_epoch
        if self.plan is not None:  # resumed: keep the plan of the run that wrote the checkpoint
            trainer.fit_loop.max_epochs = min(self.plan, self.max_epochs)
            self._tell_last_epoch_to_validate(trainer)  # a resume inside an epoch skips its on_train_epoch_start

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self.clock()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validations.append(self.clock() - self._val_start)
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begun_epoch = trainer.current_epoch
        self._tell_last_epoch_to_validate(trainer)

    def _tell_last_epoch_to_validate(self, trainer: L.Trainer) -> None:
        if self._check_val is not None and trainer.max_epochs is not None:
            last = trainer.current_epoch + 1 >= trainer.max_epochs
            trainer.check_val_every_n_epoch = 1 if last else self._check_val

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._begun_epoch != trainer.current_epoch:  # resumed inside this epoch: its time is not an epoch's
            self._train_start, self._epoch_ends = self.clock(), []
            return
        self._epochs_this_run += 1
        done = trainer.current_epoch + 1
        now = self.clock()
        self._epoch_ends = (self._epoch_ends + [now])[-(RECENT + 1):]
        epoch_s = (now - self._train_start) / self._epochs_this_run
        if len(self._epoch_ends) > RECENT:  # a machine that slows down: the recent epochs, if slower than the mean
            epoch_s = max(epoch_s, (now - self._epoch_ends[0]) / RECENT)
        validated = self._validated_epoch == trainer.current_epoch or not trainer.enable_validation
        plan = planned_epochs(self.max_epochs, done, self.elapsed_s(), self.budget_s, epoch_s,
                              max(self._validations, default=0.0), validated)
        plan = trainer.strategy.broadcast(plan)  # every rank stops at the same epoch
        if plan != trainer.fit_loop.max_epochs:
            rank_zero_info(f"TimeBudget: {plan} epochs fit in {self.budget_s / 60:g} min at {epoch_s:.1f} s per "
                           f"epoch ({self.elapsed_s() / 60:.1f} min so far; unhurried: {self.max_epochs})")
            trainer.fit_loop.max_epochs = plan
            refresh_epoch_schedules(trainer)
        self.plan = plan

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed_s(), "max_epochs": self.max_epochs, "plan": self.plan}

    def load_state_dict(self, state_dict: dict) -> None:
        self.earlier_s = float(state_dict.get("elapsed_s", 0.0))
        self.max_epochs = state_dict.get("max_epochs")
        self.plan = state_dict.get("plan")
