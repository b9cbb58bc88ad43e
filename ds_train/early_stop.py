"""train.early_stop_patience: stop a run whose checkpoint.best_metric has not improved for N evaluations.

An evaluation is a step at which the metric was computed (eval set or sample round). Rank 0 judges (it alone has the
judges' scores) and every rank receives the verdict, so all stop at the same step. The best value, its step and the
evaluations since live in the run's state, which every checkpoint records: a resumed run counts on exactly.
A step that improves the metric is checkpointed (train.py), so the best step's adapter exists when the run stops.
"""

from __future__ import annotations

import math
from typing import Optional

from ds_train import dist
from ds_train.config import Config

FRESH = {"best_value": None, "best_step": None, "evals_since_best": 0}  # the state keys this module owns


class EarlyStop:
    def __init__(self, cfg: Config, state: dict):
        self.patience = cfg.train.early_stop_patience
        self.metric, self.mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_direction()
        self.state = state

    def update(self, step: int, measured: dict) -> bool:
        """Collective when on and something was measured (every rank measures at the same steps): record this
        evaluation; True when it improved the metric."""
        if not self.patience or not measured:
            return False
        verdict = dist.broadcast_object(self._judge(step, measured.get(self.metric)) if dist.is_main() else None)
        self.state.update(verdict["state"])
        return verdict["improved"]

    def _judge(self, step: int, value) -> dict:
        s = {k: self.state[k] for k in FRESH}
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return {"improved": False, "state": s}  # this evaluation did not compute the metric: not counted
        best = s["best_value"]
        improved = best is None or (value < best if self.mode == "min" else value > best)
        if improved:
            s.update(best_value=float(value), best_step=step, evals_since_best=0)
        else:
            s["evals_since_best"] += 1
        return {"improved": improved, "state": s}

    def reason(self) -> Optional[str]:
        """Why the run stops now, or None."""
        if not self.patience or self.state["evals_since_best"] < self.patience:
            return None
        return (f"{self.metric} has not improved for {self.state['evals_since_best']} evaluations "
                f"(train.early_stop_patience={self.patience}); best {self.state['best_value']:.6g} at step "
                f"{self.state['best_step']}")
