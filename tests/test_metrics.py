"""ds_train/metrics.py (the logger's TensorBoard backend) and ds_train/plot.py (curves.png)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_train.config import load_config


def test_tensorboard_gets_scalars_audio_and_config_and_plot_draws_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ds_train.metrics import MetricsLogger
    from ds_train.plot import plot_curves

    cfg = load_config(None, ["model.path=m", "model.audio_tokenizer_path=t", "data.train_file=x.jsonl",
                             f"train.output_dir={tmp_path}", "logging.tensorboard=true"])
    logger = MetricsLogger(cfg, tmp_path)
    for step in (1, 2):
        logger.log({"step": step, "epoch": 0, "loss": 3.0 / step, "codebook_losses": [1.0, 2.0 * step],
                    "lr": 1e-3, "skipped": False})
    logger.log({"step": 2, "eval_loss": 1.25, "eval_audio_acc": 0.5, "samples_eos_fraction": 1.0})
    logger.audio(2, [("000-a", np.sin(np.arange(1600) / 5.0).astype(np.float32), 16000, "a caption")])
    logger.finish()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"audio": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "codebook_loss/0", "codebook_loss/1", "lr", "skipped", "eval_loss", "eval_audio_acc",
            "samples_eos_fraction"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 1.5)]
    assert [e.value for e in events.Scalars("codebook_loss/1")] == [2.0, 4.0]
    assert tags["audio"] == ["samples/000-a"] and events.Audio("samples/000-a")[0].step == 2
    assert events.Audio("samples/000-a")[0].sample_rate == 16000
    assert "config" in " ".join(tags["tensors"])  # add_text is stored as a tensor summary

    path = plot_curves(tmp_path)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # metrics.jsonl keeps every record as before


def test_plot_needs_a_metrics_file(tmp_path):
    from ds_train.plot import plot_curves

    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_curves(tmp_path)
