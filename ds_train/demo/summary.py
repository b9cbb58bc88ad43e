"""What the demo prints when it is done (run.sh: `python -m ds_train.demo.summary OUTPUT_DIR SECONDS`): whether the
voice was learned - audio loss against the uniform guess over the audio head's classes - and where to listen and look.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ds_train import checkpoint
from ds_train.config import load_config
from ds_train.plot import CURVES, read_records
from ds_train.samples import SAMPLES_DIR


def uniform_audio_loss(model_dir: str) -> tuple[int, float]:
    """(classes, ln classes) of the audio head: the codebook plus the stream BOS and EOS."""
    classes = json.loads((Path(model_dir) / "config.json").read_text())["audio_codebook_size"] + 2
    return classes, math.log(classes)


def demo_summary(out_dir: str, seconds: str) -> None:
    out = Path(out_dir)
    cfg = load_config(str(out / "config.yaml"))
    records = read_records(out)
    train = [r for r in records if "audio_loss" in r]
    evals = [r for r in records if "eval_audio_loss" in r]
    samples = [r for r in records if "samples_eos_fraction" in r]
    classes, uniform = uniform_audio_loss(cfg.model.path)

    def first_last(rows, key, fmt="{:.3f}"):
        return " -> ".join(f"{fmt.format(r[key])} (step {r['step']})" for r in (rows[0], rows[-1]))

    print(f"\n=== ds_train demo finished in {seconds} s ===")
    print(f"audio loss, against {uniform:.3f} = ln({classes}) for a uniform guess over the audio head's classes:")
    print(f"  train: {first_last(train, 'audio_loss')}")
    if evals:
        print(f"  eval:  {first_last(evals, 'eval_audio_loss')}; top-1 code accuracy "
              f"{first_last(evals, 'eval_audio_acc', '{:.1%}')}")
    print(f"text loss (the few chat-template tokens around the audio): {first_last(train, 'text_loss', '{:.4f}')}")
    ck = cfg.checkpoint
    best = checkpoint.best(out, ck.best_metric, ck.best_direction())
    if best:
        print(f"best checkpoint by {ck.best_metric}: {best[0]} ({best[1]:.3f})")
    if samples:
        last = samples[-1]
        folder = out / SAMPLES_DIR / f"step-{last['step']:06d}"
        print(f"samples:   {folder} (greedy; stopped by the stream EOS {last['samples_eos_fraction']:.0%}, "
              f"length {last.get('samples_length_ratio', float('nan')):.2f} x the target, first codebook "
              f"{last.get('samples_code_match', float('nan')):.0%} equal to the target's)")
    if (out / CURVES).is_file():
        print(f"curves:    {out / CURVES}")
    print(f"adapter:   {out / 'adapter'}")
    if (out / "merged").is_dir():
        print(f"merged:    {out / 'merged'}")
    print(f"metrics:   {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    demo_summary(*sys.argv[1:])
