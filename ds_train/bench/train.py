"""`ds-train bench-train CONFIG [key=value ...]`: training-step throughput, MFU and memory, against HF Trainer.

Under the launcher (`./run.sh bench-train`, all local devices) every rank builds the configured model (pretrained or
model.init=random), runs `--warmup` untimed and `--steps` timed optimizer steps on prepared data (data.train_file)
or on synthetic TTS micro-batches (`--synthetic 512` or `--synthetic 256:1024` merged positions per sample,
train.micro_batch_size samples each), and reports tokens/s (global and per device), samples/s, step time, MFU and
peak memory per rank. Results go to stdout and OUTPUT_DIR/bench_train.json. A benchmark: it asserts nothing.

MFU = model FLOPs / (step time x devices x peak). Model FLOPs per step, summed over the step's sequences:
  4 x active frozen parameters + 6 x active trainable parameters, per position (2 forward, 2 backward to the input;
      trainable weights also 2 for their gradient; frozen weights get none). A text position runs each layer's
      attention projections and `mlp`, an audio position the attention projections and `audio_mlp` (none in a
      fast-forward layer); the text head counts at trained text positions, the audio head at audio positions;
  + attention 6 x T^2 x (heads x head_dim) per layer and sequence of T positions (causal half of QK^T and AV,
      forward + 2x backward). Recompute (activation checkpointing) is not counted. Peak: H100 SXM dense bf16,
      989 TFLOP/s (`--peak-tflops` to change).

`--baseline hf` then runs the same model, batches, LoRA and DeepSpeed JSON through transformers.Trainer
(`deepspeed=` the same dict, a compute_loss that calls ds_train.loss) and prints ours/theirs tokens/s.
"""

from __future__ import annotations

import gc
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from ds_train import dist
from ds_train.config import Config
from ds_train.ds_config import deepspeed_config, resolve_dtype
from ds_train.lean_imports import collect_garbage_as_usual, muon_only_when_configured
from ds_train.loss import IGNORE, compute_loss
from ds_train.model import build_model, count_parameters, torch_dtype
from ds_train.plan import resolve_max_tokens

H100_BF16_TFLOPS = 989.0


@dataclass
class BenchOptions:
    warmup: int = 2
    steps: int = 5
    synthetic: str | None = None  # "512" or "256:1024" positions per sample; None: data.train_file
    audio_fraction: float = 0.85
    baseline: str | None = None  # "hf"
    peak_tflops: float = H100_BF16_TFLOPS
    fp32_matmul: bool = False  # CPU without AVX512-BF16: bf16 linears multiply in fp32 (ds_train/bench/cpu_gemm.py)


def bench_train(cfg: Config, opts: BenchOptions) -> dict:
    from ds_train.preflight import load_model_config

    model_config = load_model_config(cfg.model.path)
    cuda = torch.cuda.is_available()
    ds_config = deepspeed_config(cfg, dist.world_size(), cuda)
    muon_only_when_configured(ds_config)
    dist.init_distributed()  # binds this rank's GPU
    resolve_max_tokens(cfg, model_config, ds_config)  # data.max_tokens=auto: as train resolves it
    batches = _batch_source(cfg, opts, model_config)
    dtype = torch_dtype(resolve_dtype(cfg, cuda))
    total = opts.warmup + opts.steps

    result = {"model": cfg.model.path, "init": cfg.model.init, "dtype": str(dtype).replace("torch.", ""),
              "world_size": dist.world_size(), "device": _device_name(), "zero_stage":
              ds_config["zero_optimization"].get("stage"), "deepspeed_config": cfg.train.deepspeed_config,
              "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
              "activation_checkpointing": cfg.model.activation_checkpointing,
              "full_text_logits": cfg.model.full_text_logits, "attn_implementation": cfg.model.attn_implementation,
              "fp32_matmul": opts.fp32_matmul,
              "data": f"synthetic {opts.synthetic} positions, audio fraction {opts.audio_fraction}"
              if opts.synthetic else cfg.data.train_file, "warmup_steps": opts.warmup, "timed_steps": opts.steps,
              "peak_tflops": opts.peak_tflops, "mfu_formula": MFU_FORMULA}
    result["ours"] = _run_ours(cfg, ds_config, dtype, model_config, batches, opts, total)
    if opts.baseline == "hf":
        gc.collect()
        result["hf"] = _run_hf(cfg, ds_config, dtype, model_config, batches, opts, total)
        result["ours_over_hf_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    if dist.is_main():
        _print(result)
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


MFU_FORMULA = ("MFU = model FLOPs / (step time x devices x peak); model FLOPs per sequence = sum over positions of "
               "(4 x active frozen params + 6 x active trainable params; text positions: attention + mlp, audio "
               "positions: attention + audio_mlp; text head at trained text positions, audio head at audio "
               "positions) + 6 x T^2 x heads x head_dim per layer; recompute not counted")


# ----------------------------------------------------------------------------------------------------------------
# Data: micro-batch i of this rank, the same for ours and the baseline.

def _batch_source(cfg: Config, opts: BenchOptions, model_config):
    if opts.synthetic:
        from ds_train.bench.synthetic import SyntheticBatches, parse_lengths

        synth = SyntheticBatches(model_config, parse_lengths(opts.synthetic), cfg.train.micro_batch_size,
                                 opts.audio_fraction, cfg.train.seed)
        return synth.batch
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.loader import build_data, train_sampler
    from ds_train.preflight import preflight

    pre = preflight(cfg)
    data = build_data(cfg, model_config, pre.text_tokenizer, pre.out_dir)  # prepares when missing
    dataset = data.train_set
    collate = Collate(make_collator(model_config, cfg.model.whisper_processor_path))
    plans = []
    for rank in range(dist.world_size()):  # every rank's micro-batches: the HF baseline reads them interleaved
        sampler = train_sampler(dataset, cfg, rank, dist.world_size(), data.sampler.mix)
        sampler.set_epoch(0)
        plans.append(list(sampler))

    def batch(index: int, rank: int):
        plan = plans[rank]
        return collate([dataset[i] for i in plan[index % len(plan)]])

    return batch


# ----------------------------------------------------------------------------------------------------------------
# Ours: the loop of ds_train.train (forward, loss, backward, step), timed per optimizer step.

def _run_ours(cfg, ds_config, dtype, model_config, batches, opts, total) -> dict:
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model = build_model(cfg, ds_config, dtype)
    build_s = time.perf_counter() - t0
    _maybe_fp32_matmul(opts)
    rss_build = _rss_gib()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    flops = ModelFlops(model_config, model)
    collect_garbage_as_usual()  # the timed steps run with Python's thresholds, as training does
    device, accum = dist.device(), cfg.train.grad_accum
    times, tokens, samples, step_flops, losses = [], [], [], [], []
    for step in range(total):
        _sync()
        t0 = time.perf_counter()
        n_tok = n_samp = 0
        f = 0.0
        for m in range(accum):
            batch = batches(step * accum + m, dist.rank()).to(device)
            outputs = engine(**batch.inputs)
            loss = compute_loss(outputs, batch.label_audio_ids, cfg.loss.text_weight, cfg.loss.audio_weight)
            engine.backward(loss.total)
            engine.step()
            f += flops.of(outputs)
            n_tok += batch.num_tokens
            n_samp += batch.num_samples
        _sync()
        times.append(time.perf_counter() - t0)
        tokens.append(n_tok)
        samples.append(n_samp)
        step_flops.append(f)
        losses.append(loss.total.item())
    summary = _summarise(times, tokens, samples, step_flops, opts)
    summary.update(build_s=_max(build_s), rss_after_build_gib=_per_rank(rss_build), loss_last=losses[-1],
                   params_total=count_parameters(model)[1], params_trainable=count_parameters(model)[0])
    del engine, model
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The peer baseline: transformers.Trainer with deepspeed= the same dict.

def _run_hf(cfg, ds_config, dtype, model_config, batches, opts, total) -> dict:
    from torch.utils.data import DataLoader, Dataset
    from transformers import Trainer, TrainingArguments

    world, accum = dist.world_size(), cfg.train.grad_accum

    class Interleaved(Dataset):
        """Item j is rank j % world's micro-batch j // world: accelerate hands rank r items r, r + world, ..."""

        def __len__(self):
            return total * accum * world

        def __getitem__(self, j):
            b = batches(j // world, j % world)
            return {**b.inputs, "label_audio_ids": b.label_audio_ids, "_tokens": b.num_tokens,
                    "_samples": b.num_samples}

    timer = _StepTimer()

    class BenchTrainer(Trainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(Interleaved(), batch_size=1, collate_fn=_only))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("label_audio_ids")
            timer.tokens += inputs.pop("_tokens")
            timer.samples += inputs.pop("_samples")
            outputs = model(**inputs)
            timer.flops += flops.of(outputs)
            loss = compute_loss(outputs, labels, cfg.loss.text_weight, cfg.loss.audio_weight).total
            return (loss, outputs) if return_outputs else loss

    o = cfg.optim
    args = TrainingArguments(
        output_dir=str(Path(cfg.train.output_dir) / "hf_baseline"), deepspeed=ds_config, max_steps=total,
        per_device_train_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=accum,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, max_grad_norm=o.max_grad_norm, lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps,
        bf16=dtype == torch.bfloat16, save_strategy="no", report_to=[], logging_steps=10**9, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.train.seed,
    )
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model = build_model(cfg, ds_config, dtype)  # TrainingArguments(deepspeed=) made ZeRO-3 build under zero.Init
    build_s = time.perf_counter() - t0
    _maybe_fp32_matmul(opts)
    flops = ModelFlops(model_config, model)
    trainer = BenchTrainer(model=model, args=args, callbacks=[timer])
    trainer.train()
    summary = _summarise(timer.times, timer.step_tokens, timer.step_samples, timer.step_flops, opts)
    summary.update(build_s=_max(build_s), transformers_trainer=True)
    return summary


def _maybe_fp32_matmul(opts) -> None:
    if opts.fp32_matmul:  # after the build: zero.Init installs its own linear while it runs
        from ds_train.bench.cpu_gemm import multiply_linears_in_fp32

        multiply_linears_in_fp32()


def _only(items):
    return items[0]


class _StepTimer(TrainerCallback):
    """Wall time and work of each optimizer step of the Trainer (device synchronised)."""

    def __init__(self):
        self.times, self.step_tokens, self.step_samples, self.step_flops = [], [], [], []
        self.tokens = self.samples = 0
        self.flops = 0.0
        self.t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self.t0 = time.perf_counter()
        self.tokens = self.samples = 0
        self.flops = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self.t0)
        self.step_tokens.append(self.tokens)
        self.step_samples.append(self.samples)
        self.step_flops.append(self.flops)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, summaries.

class ModelFlops:
    """Model FLOPs of one forward+backward from its outputs (merged lengths, audio and trained text positions)."""

    def __init__(self, model_config, model):
        t = model_config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        per_kind = {"attn": 0.0, "mlp": 0.0, "audio_mlp": 0.0}
        for name, p in model.named_parameters():
            kind = "audio_mlp" if ".audio_mlp." in name else "mlp" if ".mlp." in name else \
                "attn" if ".self_attn." in name else None
            if kind and ".layers." in name:
                per_kind[kind] += (6 if p.requires_grad else 4) * getattr(p, "ds_numel", p.numel())
        self.text_position = per_kind["attn"] + per_kind["mlp"]
        self.audio_position = per_kind["attn"] + per_kind["audio_mlp"]
        self.text_head = 4 * t.hidden_size * t.vocab_size
        self.audio_head = 4 * t.hidden_size * model_config.audio_num_codebooks * (model_config.audio_codebook_size + 2)
        self.attention = 6 * t.num_hidden_layers * t.num_attention_heads * head_dim

    @torch.no_grad()
    def of(self, outputs) -> float:
        lengths = outputs.attention_mask.sum(dim=1).double()
        audio = outputs.audio_out_mask.sum().double()
        trained_text = (outputs.expanded_labels[:, 1:] != IGNORE).sum().double()
        text = lengths.sum() - audio
        f = (text * self.text_position + audio * (self.audio_position + self.audio_head)
             + trained_text * self.text_head + self.attention * (lengths ** 2).sum())
        return float(f)


def _summarise(times, tokens, samples, flops, opts) -> dict:
    w = opts.warmup
    t, tok, smp, fl = times[w:], tokens[w:], samples[w:], flops[w:]
    world = dist.world_size()
    # Every rank's work, over the mean step time of the ranks (steps end together: the optimizer step syncs).
    tot = dist.all_reduce([sum(t), sum(tok), sum(smp), sum(fl)], op="sum")
    seconds = tot[0] / world
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "step_time_s": seconds / len(t), "step_times_s": [round(x, 4) for x in t], "tokens": int(tot[1]),
        "samples": int(tot[2]), "model_flops": tot[3],
        "tokens_per_s": tot[1] / seconds, "tokens_per_s_per_device": tot[1] / seconds / world,
        "samples_per_s": tot[2] / seconds, "tflops_per_s_per_device": tot[3] / seconds / world / 1e12,
        "mfu": tot[3] / seconds / world / (opts.peak_tflops * 1e12),
        "peak_device_mem_gib": _per_rank(peak) if peak is not None else None, "peak_rss_gib": _per_rank(_rss_gib()),
    }


def _per_rank(value: float) -> list[float]:
    values = [0.0] * dist.world_size()
    values[dist.rank()] = value
    return [round(v, 3) for v in dist.all_reduce(values, op="sum")]


def _max(value: float) -> float:
    return dist.all_reduce([value], op="max")[0]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(dist.local_rank())
    import platform

    return f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s) per rank"


def _print(r: dict) -> None:
    print(f"bench-train {r['model']} ({r['init']}, {r['dtype']}, ZeRO-{r['zero_stage']}, {r['world_size']} rank(s), "
          f"{r['device']}); data: {r['data']}")
    for name in ("ours", "hf"):
        if name not in r:
            continue
        s = r[name]
        print(f"  {name:4s} step {s['step_time_s']:.3f}s  {s['tokens_per_s']:.1f} tokens/s "
              f"({s['tokens_per_s_per_device']:.1f}/device)  {s['samples_per_s']:.2f} samples/s  "
              f"{s['tflops_per_s_per_device']:.4f} TFLOP/s/device  MFU {100 * s['mfu']:.3f}% of "
              f"{r['peak_tflops']:.0f} TFLOP/s  peak RSS/rank {s['peak_rss_gib']} GiB"
              + (f"  peak device mem {s['peak_device_mem_gib']} GiB" if s["peak_device_mem_gib"] else "")
              + (f"  build {s['build_s']:.1f}s" if "build_s" in s else ""))
    if "ours_over_hf_tokens_per_s" in r:
        print(f"  ours / HF Trainer tokens/s: {r['ours_over_hf_tokens_per_s']:.3f}")
    print(f"  {r['mfu_formula']}")
