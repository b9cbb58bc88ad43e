"""Surviving the cluster: preemption signals and non-finite steps, both decided by all ranks together."""

from __future__ import annotations

import math
import signal

from ds_train import dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; resume with train.resume=auto
DIVERGED_EXIT = 4


class Preempted(SystemExit):
    def __init__(self, checkpoint):
        super().__init__(PREEMPTED_EXIT)
        self.checkpoint = checkpoint


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


class PreemptionFlag:
    """SIGTERM / SIGUSR1 only set a flag (a handler must not save or communicate); the loop asks all ranks at the
    next step boundary, so every rank saves the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        return dist.all_reduce([1.0 if self.received else 0.0], op="max")[0] > 0


class SkipCounter:
    """Steps whose loss or gradient norm was not finite. DeepSpeed skips such an update itself (ZeRO-3 checks the
    global grad norm, which all ranks share); the loss is checked after its all-reduce, so ranks agree on it too."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, loss_mean: float, step_applied: bool) -> bool:
        """Record this step; True when it was skipped."""
        skipped = not step_applied or not math.isfinite(loss_mean)
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return skipped

    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
