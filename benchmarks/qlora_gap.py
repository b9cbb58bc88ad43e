"""The 4-bit training forward vs the merged bf16 model, on one synthetic batch (ds_train/bench/qlora.py).

    python benchmarks/qlora_gap.py MODEL_DIR [--positions 512] [--steps 5] [--lr 1e-3]

MODEL_DIR holds bf16 weights (e.g. `ds-train make-arch ... --weights`); prints the gaps as JSON."""

import argparse
import json
import tempfile
from pathlib import Path

from ds_train.bench.qlora import logits_gap
from ds_train.bench.synthetic import SyntheticBatches
from ds_train.config import load_config
from ds_train.preflight import load_model_config

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--positions", type=int, default=512)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--lr", type=float, default=1e-3)
a = p.parse_args()
cfg = load_config(None, [f"model.path={a.model_dir}", "model.audio_tokenizer_path=unused", "data.train_file=unused",
                         "train.output_dir=unused", "train.mode=qlora", "lora.dropout=0.0"])
batch = SyntheticBatches(load_model_config(a.model_dir), (a.positions, a.positions), 1, 0.85, 42).batch(0, 0)
with tempfile.TemporaryDirectory() as work:
    print(json.dumps(logits_gap(cfg, batch, Path(work), a.steps, a.lr), indent=1))
