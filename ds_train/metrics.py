"""Where numbers go: OUTPUT_DIR/metrics.jsonl, W&B (wandb.mode) and TensorBoard (logging.tensorboard ->
OUTPUT_DIR/tensorboard/) on rank 0; every other rank gets a no-op logger, so the training loop logs without asking
which rank it is. One interface (log, audio, summary, finish); neither backend is required."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from ds_train import dist
from ds_train.config import AUTO_OR_FRESH, Config, redact, to_dict, to_yaml


TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"  # in OUTPUT_DIR: a resumed job continues the same W&B run


class MetricsLogger:
    def __init__(self, cfg: Config, out_dir: Path, total_steps: int = 0, start_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.clock = StepClock(total_steps, start_step)
        # find_resume has failed by now if a requested resume found nothing; auto_or_fresh resumed iff past step 0
        fresh = cfg.train.resume == "none" or (cfg.train.resume == AUTO_OR_FRESH and start_step == 0)
        if fresh and self.path.is_file():
            # Never mix two runs' records in one file (an old run's steps would repeat): keep it under a new name.
            n = 1
            while (out_dir / f"metrics.{n}.jsonl").exists():
                n += 1
            os.replace(self.path, out_dir / f"metrics.{n}.jsonl")
            print(f"{self.path} held the records of an earlier run: moved to metrics.{n}.jsonl", flush=True)
        self.wandb = self.tensorboard = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
            config = "\n".join("    " + line for line in to_yaml(cfg).splitlines())  # a markdown code block
            self.tensorboard.add_text("config", config, 0)
        if cfg.wandb.mode != "disabled":
            import wandb

            resolved = to_dict(cfg)  # redacted: run name and tags go to W&B too
            w = resolved["wandb"]
            id_file = out_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() and not fresh else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                mode=w["mode"], project=w["project"], entity=w["entity"], name=w["run_name"], tags=w["tags"],
                config=resolved, id=run_id, resume="allow",
                dir=None if os.environ.get("WANDB_DIR") else str(out_dir),  # wandb reads WANDB_DIR itself
            )

    def log(self, record: dict) -> None:
        record = redact(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = console_line(record, self.clock.total, self.clock.eta_s(record["step"]))
        if line:
            print(line, flush=True)
        if self.wandb is not None:
            self.wandb.log(scalars(record), step=record["step"])
        if self.tensorboard is not None:
            for key, value in scalars(record).items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def audio(self, step: int, clips: list) -> None:
        """clips: (name, waveform, sample rate, caption) - generated samples, next to the scalars."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"samples/{name}": wandb.Audio(wav, sample_rate=rate, caption=caption)
                            for name, wav, rate, caption in clips}, step=step)
        if self.tensorboard is not None:
            for name, wav, rate, _ in clips:
                self.tensorboard.add_audio(f"samples/{name}", torch.as_tensor(wav).reshape(1, -1), step, rate)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(redact(values))

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def scalars(record: dict) -> dict:
    """The numbers of a record for a dashboard: lists become key/0, key/1, ... (codebook_losses -> codebook_loss/0);
    booleans become 0/1; step, epoch, text and missing values are left out."""
    out = {}
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        if isinstance(value, (list, tuple)):
            name = key[:-2] if key.endswith("losses") else key
            out.update({f"{name}/{i}": v for i, v in enumerate(value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def audio(self, step: int, clips: list) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def make_logger(cfg: Config, out_dir: Path, total_steps: int = 0, start_step: int = 0):
    return MetricsLogger(cfg, out_dir, total_steps, start_step) if dist.is_main() else NullLogger()


class StepClock:
    """Time left, from the mean wall time per step since this process started training."""

    def __init__(self, total: int, start_step: int):
        self.total, self.start_step, self.t0 = total, start_step, time.monotonic()

    def eta_s(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0 or not self.total:
            return None
        return (time.monotonic() - self.t0) / done * max(self.total - step, 0)


STEP_FIELDS = (("lr", "lr {:.2e}"), ("grad_norm", "grad norm {:.3f}"), ("tokens_per_s", "{:,.0f} tokens/s"))


def console_line(r: dict, total: int, eta_s: Optional[float]) -> Optional[str]:
    """The plain progress line of a step or eval record (what a log file shows; tqdm only runs on a terminal)."""
    of = f"/{total}" if total else ""
    if "loss" in r:
        parts = [f"step {r['step']}{of}", f"loss {r['loss']:.4f}"]
        if "text_loss" in r and "audio_loss" in r:
            parts[-1] += f" (text {r['text_loss']:.4f}, audio {r['audio_loss']:.4f})"
        if "dpo_margin" in r:  # train.objective=dpo
            parts[-1] += f" (dpo {r['dpo_loss']:.4f})"
            parts.append(f"margin {r['dpo_margin']:.3f} | accuracy {r['dpo_accuracy']:.2f}")
        parts += [fmt.format(r[key]) for key, fmt in STEP_FIELDS if key in r]
        parts += [f"ETA {_duration(eta_s)}"] if eta_s is not None else []
        parts += ["update skipped (non-finite)"] if r.get("skipped") else []
        return " | ".join(parts)
    if "eval_loss" in r:
        line = f"eval  {r['step']}{of} | loss {r['eval_loss']:.4f}"
        if "eval_text_loss" in r and "eval_audio_loss" in r:
            line += f" (text {r['eval_text_loss']:.4f}, audio {r['eval_audio_loss']:.4f})"
        codebooks = [c for c in r.get("eval_codebook_losses") or [] if c is not None]
        if codebooks:
            line += " | codebooks " + " ".join(f"{c:.2f}" for c in codebooks)
        return line
    return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def peak_memory_gb() -> float:
    """Peak device memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_metrics(out_dir: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step so the file reads as one uninterrupted run."""
    path = out_dir / "metrics.jsonl"
    if not dist.is_main() or not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def final_summary(summary: dict) -> str:
    """What a person reads at the end of a run (the JSON line after it is for scripts)."""
    loss = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
            if summary.get("first_loss") is not None else "no finite loss")
    lines = [f"done: {summary['steps']} steps, {loss}"]
    if summary.get("adapter"):
        lines.append(f"adapter: {summary['adapter']}")
    if summary.get("merged"):  # train.mode=full: the trained model
        lines.append(f"merged:  {summary['merged']}")
    if summary.get("best_checkpoint"):
        lines.append(f"best:    {summary['best_checkpoint']} ({summary['best_metric']} {summary['best_value']:.4f})")
    if summary.get("curves"):
        lines.append(f"curves:  {summary['curves']}")
    return "\n".join(lines)
