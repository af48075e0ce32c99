"""A callback that slows each optimizer step, so that a test can SIGKILL a run mid-way reliably."""

import time

from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        time.sleep(self.seconds)
