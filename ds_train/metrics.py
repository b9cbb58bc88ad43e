"""Where numbers go: W&B and OUTPUT_DIR/metrics.jsonl on rank 0; every other rank gets a no-op logger, so the
training loop logs without asking which rank it is."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from ds_train import dist
from ds_train.config import Config, redact, to_dict


class MetricsLogger:
    def __init__(self, cfg: Config, out_dir: Path):
        self.path = out_dir / "metrics.jsonl"
        self.wandb = None
        if cfg.wandb.mode != "disabled":
            import wandb

            resolved = to_dict(cfg)  # redacted: run name and tags go to W&B too
            w = resolved["wandb"]
            self.wandb = wandb.init(
                mode=w["mode"], project=w["project"], entity=w["entity"], name=w["run_name"], tags=w["tags"],
                config=resolved, dir=str(out_dir), resume="allow",
            )

    def log(self, record: dict) -> None:
        record = redact(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if k != "codebook_losses"}
            for i, v in enumerate(record.get("codebook_losses") or []):
                flat[f"codebook_loss/{i}"] = v
            self.wandb.log(flat, step=record["step"])

    def audio(self, step: int, clips: list) -> None:
        """clips: (name, waveform, sample rate, caption) - generated samples, next to the scalars."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"samples/{name}": wandb.Audio(wav, sample_rate=rate, caption=caption)
                            for name, wav, rate, caption in clips}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(redact(values))

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def audio(self, step: int, clips: list) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def make_logger(cfg: Config, out_dir: Path):
    return MetricsLogger(cfg, out_dir) if dist.is_main() else NullLogger()


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
