"""What the demo prints when it is done (run.sh: `python -m ds_train.demo.summary OUTPUT_DIR SECONDS`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def demo_summary(out_dir: str, seconds: str) -> None:
    out = Path(out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    print("\n=== ds_train demo finished ===")
    print(f"first loss (step {losses[0]['step']}): {losses[0]['loss']:.4f}")
    print(f"last loss  (step {losses[-1]['step']}): {losses[-1]['loss']:.4f}")
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        first_best_last = (f"{r['eval_loss']:.4f} (step {r['step']})" for r in (evals[0], best, evals[-1]))
        print("eval loss: first {} -> best {} -> last {}".format(*first_best_last))
    print(f"adapter:   {out / 'adapter'}")
    if (out / "merged").is_dir():
        print(f"merged:    {out / 'merged'}")
    print(f"metrics:   {out / 'metrics.jsonl'}")
    print(f"wall time: {seconds}s")


if __name__ == "__main__":
    demo_summary(*sys.argv[1:])
