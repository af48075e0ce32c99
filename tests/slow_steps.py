"""Callbacks that a test adds to a run (`+callbacks.<name>._target_=slow_steps.<Class>`): slow steps, so that a
test can SIGKILL a run mid-way reliably, and a signal sent to the run's own process at a chosen step."""

import os
import signal
import time

from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        time.sleep(self.seconds)


class SignalAt(Callback):
    """Sends `name` (e.g. "SIGTERM") to this process as the first micro-batch after optimizer step `step` starts:
    mid-way through the next step when there is gradient accumulation. On `rank` only, where one is given."""

    def __init__(self, step: int, name: str, rank: int | None = None):
        self.step, self.name, self.rank, self.sent = step, name, rank, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.sent and self.rank in (None, trainer.global_rank):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.name))
