"""`ds-train plot OUTPUT_DIR`: OUTPUT_DIR/curves.png from OUTPUT_DIR/metrics.jsonl, for a person without a browser.

Panels: train/eval loss; text vs audio loss; per-codebook audio loss; quality (eval top-1 accuracy, the generated
samples' EOS fraction, length ratio, code match, WER/CER and speaker similarity); learning rate; tokens/s; and for a
DPO run (train.objective=dpo) its rewards, margin and preference accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

CURVES = "curves.png"


def read_records(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {out_dir}: is it a training OUTPUT_DIR?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str, index: int = None) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `key` (element `index` of a list value)."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, list):
            value = value[index] if index is not None and index < len(value) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            values.append(value)
    return steps, values


def plot_curves(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    records = read_records(out_dir)
    dpo = any("dpo_margin" in r for r in records)
    fig, axes = plt.subplots(2, 4 if dpo else 3, figsize=(20 if dpo else 15, 8))
    panels = [
        ("loss", [("loss", None, "train"), ("eval_loss", None, "eval"), ("dpo_loss", None, "train DPO")]),
        ("text vs audio loss", [("text_loss", None, "text"), ("audio_loss", None, "audio"),
                                ("eval_text_loss", None, "eval text"), ("eval_audio_loss", None, "eval audio")]),
        ("audio loss per codebook", [("codebook_losses", k, f"codebook {k}") for k in range(_codebooks(records))]),
        ("quality", [("eval_audio_acc", None, "eval top-1 audio acc"), ("eval_text_acc", None, "eval top-1 text acc"),
                     ("samples_eos_fraction", None, "samples stopped by EOS"),
                     ("samples_length_ratio", None, "samples length ratio"),
                     ("samples_code_match", None, "samples code match (codebook 0)"),
                     ("samples_wer", None, "samples WER"), ("samples_cer", None, "samples CER"),
                     ("samples_speaker_sim", None, "samples speaker similarity")]),
        ("learning rate", [("lr", None, "lr")]),
        ("throughput", [("tokens_per_s", None, "tokens/s")]),
    ]
    if dpo:
        panels.insert(3, ("preference (DPO)", [("dpo_chosen_reward", None, "chosen reward"),
                                               ("dpo_rejected_reward", None, "rejected reward"),
                                               ("dpo_margin", None, "margin"),
                                               ("dpo_accuracy", None, "accuracy")]))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, (title, lines) in zip(axes.flat, panels):
        drawn = 0
        for key, index, label in lines:
            x, y = series(records, key, index)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3, label=label)
                drawn += 1
        if title.startswith(("loss", "text vs", "audio loss")) and ax.get_lines() and \
                min(min(line.get_ydata()) for line in ax.get_lines()) > 0:
            ax.set_yscale("log")  # memorisation and slow late progress stay visible
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(str(out_dir))
    # Fixed margins for this fixed grid: tight_layout would measure every label first (0.5 s of each run's end).
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.91, wspace=0.25, hspace=0.35)
    path = Path(out_dir) / CURVES
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _codebooks(records: list[dict]) -> int:
    return max((len(r["codebook_losses"]) for r in records if isinstance(r.get("codebook_losses"), list)), default=0)
