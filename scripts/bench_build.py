"""Build time and peak RSS per rank of a random-init model under zero.Init: ds_train's partition fill vs torch's
per-module init of full tensors. Run under the launcher, e.g.
  deepspeed --num_gpus 2 --no_local_rank scripts/bench_build.py MODEL_DIR_OR_ARCH.json [torch|fill] [bf16|fp32]
"""

import json
import resource
import sys
import time

import torch

from ds_train import dist
from ds_train.arch import build_random_model
from ds_train.model import count_parameters
from ds_train.preflight import load_model_config

path, mode, dtype = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "bf16"
dist.init_distributed()
ds = json.load(open("ds_configs/zero3_partition_all.json"))
ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=dist.world_size())
ds["bf16"] = {"enabled": dtype == "bf16"}
t0 = time.perf_counter()
model = build_random_model(load_model_config(path), ds, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                           "sdpa", 42, torch_init=mode == "torch")
seconds = time.perf_counter() - t0
local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"rank": dist.rank(), "mode": mode, "params": count_parameters(model)[1], "local_params": local,
                  "build_s": round(seconds, 1), "peak_rss_gib": round(rss, 2)}), flush=True)
dist.leave(0)
