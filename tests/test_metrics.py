"""ds_train/metrics.py: the logger's TensorBoard backend and ds_train/plot.py (curves.png); one run per
metrics.jsonl and a W&B run that a resumed job continues (W&B runs offline: no network here; its files are real)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_train.config import load_config, to_yaml
from ds_train.metrics import WANDB_ID_FILE, MetricsLogger


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

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"audio": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "codebook_loss/0", "codebook_loss/1", "lr", "skipped", "eval_loss", "eval_audio_acc",
            "samples_eos_fraction"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 1.5)]
    assert [e.value for e in events.Scalars("codebook_loss/1")] == [2.0, 4.0]
    assert tags["audio"] == ["samples/000-a"] and events.Audio("samples/000-a")[0].step == 2
    assert events.Audio("samples/000-a")[0].sample_rate == 16000
    # add_text is stored as a tensor summary: the whole resolved config as YAML, indented into a markdown code block
    assert tags["tensors"] == ["config/text_summary"]
    (stored,) = events.Tensors("config/text_summary")
    text = stored.tensor_proto.string_val[0].decode()
    assert stored.step == 0 and text == "\n".join("    " + line for line in to_yaml(cfg).splitlines())
    assert text.startswith("    model:\n      path: m\n")
    for line in ("      audio_tokenizer_path: t", "      train_file: x.jsonl", f"      output_dir: {tmp_path}",
                 "      tensorboard: true"):
        assert line in text.splitlines(), line

    path = plot_curves(tmp_path)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # metrics.jsonl keeps every record as before


def test_plot_needs_a_metrics_file(tmp_path):
    from ds_train.plot import plot_curves

    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_curves(tmp_path)


def cfg(out, resume="none", wandb="disabled"):
    return load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                              f"train.output_dir={out}", f"train.resume={resume}", f"wandb.mode={wandb}"])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fresh_run_never_appends_to_an_old_runs_metrics(tmp_path, capsys):
    old = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    logger = MetricsLogger(cfg(tmp_path), tmp_path)
    logger.log({"step": 1, "loss": 5.0})
    assert records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 5.0}]
    assert records(tmp_path / "metrics.1.jsonl") == old
    assert "held the records of an earlier run: moved to metrics.1.jsonl" in capsys.readouterr().out
    MetricsLogger(cfg(tmp_path), tmp_path)  # a third run: the second's file goes to .2
    assert records(tmp_path / "metrics.2.jsonl") == [{"step": 1, "loss": 5.0}]
    # A resumed run continues its own file.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    MetricsLogger(cfg(tmp_path, resume="auto"), tmp_path).log({"step": 2, "loss": 3.0})
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_wandb_run_id_is_kept_for_resume_and_wandb_dir_is_honoured(tmp_path, monkeypatch):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb_here"
    out.mkdir()
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = MetricsLogger(cfg(out, wandb="offline"), out)
    run_id = first.wandb.id
    first.log({"step": 1, "loss": 2.0})
    first.finish()
    assert (out / WANDB_ID_FILE).read_text() == run_id
    assert not (out / "wandb").exists()
    assert [p.name for p in (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")]

    resumed = MetricsLogger(cfg(out, resume="auto", wandb="offline"), out)
    assert resumed.wandb.id == run_id
    resumed.finish()
    fresh = MetricsLogger(cfg(out, wandb="offline"), out)  # a new run into the same dir: a new W&B run
    assert fresh.wandb.id != run_id and (out / WANDB_ID_FILE).read_text() == fresh.wandb.id
    fresh.finish()


def test_console_line_has_every_number_a_reader_needs():
    from ds_train.metrics import console_line

    record = {"step": 12, "epoch": 0, "loss": 8.123456, "text_loss": 2.5, "audio_loss": 5.623456, "lr": 1e-4,
              "grad_norm": 0.5312, "tokens_per_s": 12345.6, "skipped": False}
    assert console_line(record, 200, 192.4) == ("step 12/200 | loss 8.1235 (text 2.5000, audio 5.6235) | lr 1.00e-04 "
                                                "| grad norm 0.531 | 12,346 tokens/s | ETA 3m12s")
    assert console_line({**record, "skipped": True}, 200, 7300).endswith("ETA 2h01m | update skipped (non-finite)")
    assert console_line({"step": 0, "epoch": 0, "eval_loss": 9.87654}, 200, None) == "eval  0/200 | loss 9.8765"
    evaluated = {"step": 40, "eval_loss": 9.5, "eval_text_loss": 2.25, "eval_audio_loss": 7.25,
                 "eval_codebook_losses": [7.0, 7.5, None]}  # None: a codebook with no trained position
    assert console_line(evaluated, 200, None) == ("eval  40/200 | loss 9.5000 (text 2.2500, audio 7.2500) "
                                                  "| codebooks 7.00 7.50")
    assert console_line({"step": 3, "padding_efficiency": 0.9}, 200, None) is None


def test_logger_prints_a_line_per_step_record_with_eta(tmp_path, capsys, monkeypatch):
    import ds_train.metrics as metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])  # a clock the test controls
    logger = MetricsLogger(cfg(tmp_path), tmp_path, total_steps=10, start_step=2)
    now[0] += 8.0  # 2 steps in 8 s: 4 s per step, 6 steps left
    logger.log({"step": 4, "loss": 1.0, "text_loss": 0.5, "audio_loss": 0.5, "lr": 0.1, "grad_norm": 1.0,
                "tokens_per_s": 10.0, "skipped": False})
    assert capsys.readouterr().out.strip().endswith("step 4/10 | loss 1.0000 (text 0.5000, audio 0.5000) | lr 1.00e-01 "
                                                    "| grad norm 1.000 | 10 tokens/s | ETA 24s")


def test_final_summary_reads_as_text():
    from ds_train.metrics import final_summary

    assert final_summary({"first_loss": 12.5, "last_loss": 11.25, "steps": 24, "adapter": "/o/adapter"}) == (
        "done: 24 steps, loss 12.5000 -> 11.2500\nadapter: /o/adapter")
    assert final_summary({"first_loss": 12.5, "last_loss": 11.25, "steps": 24, "adapter": "/o/adapter",
                          "best_metric": "samples_wer", "best_checkpoint": "/o/checkpoints/step-000020",
                          "best_value": 0.125, "curves": "/o/curves.png"}).splitlines()[2:] == [
        "best:    /o/checkpoints/step-000020 (samples_wer 0.1250)", "curves:  /o/curves.png"]
