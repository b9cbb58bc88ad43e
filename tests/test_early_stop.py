"""train.early_stop_patience (ds_train/early_stop.py): the verdict logic, and a 2-rank run that stops where the
patience says, with a final checkpoint and the best step's adapter as the run's adapter."""

from __future__ import annotations

import filecmp

import pytest

from conftest import launch, plain_config, read_metrics
from ds_train.config import load_config
from ds_train.early_stop import FRESH, EarlyStop


def _early(patience: int, mode: str):
    cfg = load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/a", "data.train_file=t.jsonl",
                             "data.eval_file=e.jsonl", "train.output_dir=/o",
                             f"train.early_stop_patience={patience}", f"checkpoint.best_mode={mode}"])
    return EarlyStop(cfg, dict(FRESH))


def test_patience_counts_evaluations_without_improvement():
    early = _early(2, "min")
    assert early.update(2, {"eval_loss": 3.0}) and early.reason() is None
    assert not early.update(4, {"eval_loss": 3.0})  # equal is no improvement
    assert early.update(6, {"eval_loss": 2.5}) and early.state["evals_since_best"] == 0
    assert not early.update(7, {"samples_eos_fraction": 1.0})  # the metric was not computed: not counted
    assert not early.update(8, {"eval_loss": float("nan")}) and early.state["evals_since_best"] == 0
    assert not early.update(10, {"eval_loss": 2.6}) and early.reason() is None
    assert not early.update(12, {"eval_loss": 2.7})
    assert early.reason().startswith("eval_loss has not improved for 2 evaluations")
    assert (early.state["best_value"], early.state["best_step"]) == (2.5, 6)
    maximise = _early(1, "max")
    maximise.update(1, {"eval_loss": 3.0})
    assert maximise.update(2, {"eval_loss": 3.5}) and not maximise.update(3, {"eval_loss": 3.4})
    assert maximise.reason() is not None
    assert _early(0, "min").update(1, {"eval_loss": 1.0}) is False  # off: no collective, nothing recorded


def test_early_stop_needs_the_metric_it_watches():
    from ds_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"needs data.eval_file .*|train.early_stop_patience=2"):
        load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/a", "data.train_file=t.jsonl",
                           "train.output_dir=/o", "train.early_stop_patience=2"])


@pytest.mark.slow
def test_run_stops_at_the_patience_and_keeps_the_best_steps_adapter(tiny_model, demo_data, eval3, tmp_path):
    out = tmp_path / "out"
    # best_mode=max on the eval loss: a falling loss never improves, so the run stops `patience` evaluations after
    # its first one unless the loss rises; where it stops is computed from the logged eval losses either way.
    config = plain_config(tiny_model, demo_data, eval3, out,
                          train={"max_steps": 12, "eval_every": 1, "eval_on_start": False, "early_stop_patience": 2},
                          checkpoint={"every_steps": 0, "best_mode": "max", "keep_last": 1})
    proc = launch(["train", str(config)])
    records = read_metrics(out)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    best_step, best, since, expected_stop = None, None, 0, None
    for step, value in evals:
        if best is None or value > best:
            best_step, best, since = step, value, 0
        else:
            since += 1
        if since == 2:
            expected_stop = step
            break
    assert expected_stop is not None and expected_stop < 12, evals
    assert evals[-1][0] == expected_stop and max(r["step"] for r in records) == expected_stop
    assert any(r.get("early_stopped") for r in records if r["step"] == expected_stop)
    assert f"stopped early at step {expected_stop}: eval_loss has not improved for 2 evaluations" in proc.stdout
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step-{expected_stop:06d}"  # the final checkpoint
    best_adapter = ck / f"step-{best_step:06d}" / "adapter"  # kept by pruning although keep_last=1
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert filecmp.cmp(out / "adapter" / name, best_adapter / name, shallow=False), name
    if best_step != expected_stop:  # the run's adapter is the best step's, not the last step's
        assert not filecmp.cmp(out / "adapter" / "adapter_model.safetensors",
                               ck / f"step-{expected_stop:06d}" / "adapter" / "adapter_model.safetensors",
                               shallow=False)
