"""The training run: setup -> one explicit loop (forward, loss, backward, step, log, eval, save) -> cleanup.

Under ZeRO-3 every rank runs every forward, evaluation included: parameters are gathered collectively, so a
forward on one rank alone hangs. Rank 0 alone writes files and logs (see ds_train.dist / ds_train.metrics).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ds_train import checkpoint, dist, faults
from ds_train.config import Config, ConfigError, deepspeed_config, resolve_dtype, to_yaml
from ds_train.data import CachedDataset, build_loader, make_collator
from ds_train.loss import compute_loss
from ds_train.merge import merge
from ds_train.metrics import make_logger, peak_memory_gb, truncate_metrics
from ds_train.model import build_model, check_audio_tokenizer, load_model_config, load_text_tokenizer, torch_dtype
from ds_train.prepare import prepare, write_report
from ds_train.resilience import Diverged, Preempted, PreemptionFlag, SkipCounter
from ds_train.sampler import MicroBatchSampler


def check_output_dir(cfg: Config, for_prepare: bool = False) -> Path:
    """Fail before any process group exists: unwritable dir, or another run's checkpoints without resume."""
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} is not writable: {e}") from None
    if not for_prepare and cfg.train.resume == "none" and checkpoint.read_latest(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints of a run; set train.resume=auto to continue it, "
                          "or choose a new train.output_dir")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config) -> dict:
    import deepspeed
    from transformers import get_scheduler

    # Setup. Everything that can be wrong with the config or inputs fails here, before the process group.
    model_config = load_model_config(cfg.model.path)
    text_tokenizer = load_text_tokenizer(cfg, model_config)
    check_audio_tokenizer(cfg, model_config)
    out = check_output_dir(cfg)
    cuda = torch.cuda.is_available()
    ds_config = deepspeed_config(cfg, dist.world_size(), cuda)  # world size from the launcher's environment
    resume_from = checkpoint.find_resume(cfg, out)
    dist.init_distributed()
    if cuda:
        torch.cuda.set_device(dist.local_rank())
    world = dist.world_size()
    seed_everything(cfg.train.seed)
    if dist.is_main():
        (out / "config.yaml").write_text(to_yaml(cfg))

    data = build_data(cfg, model_config, text_tokenizer, out)
    train_set, loader, sampler, eval_loader = data.train_set, data.loader, data.sampler, data.eval_loader
    total_steps = planned_steps(cfg, sampler)

    # Seed right before the adapters are initialised: whether `prepare` just ran the audio tokenizer (which draws
    # random numbers while it is built) must not change the LoRA init.
    seed_everything(cfg.train.seed)
    model = build_model(cfg, ds_config, torch_dtype(resolve_dtype(cfg, cuda)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(cfg.optim.scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps,
                                               num_training_steps=total_steps))
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # ZeRO-1/2 check the grad norm for inf/NaN only in fp16/bf16; ask for it in fp32 too. (ZeRO-3 always does.)
        engine.optimizer.check_grad_overflow = True
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    if resume_from is not None:
        saved = checkpoint.load(engine, resume_from)
        state = {k: saved[k] for k in state}
        dist.print0(f"resumed from {resume_from} at step {state['step']}")
        truncate_metrics(out, state["step"])
    logger = make_logger(cfg, out)
    dist.print0(f"training {total_steps} steps on {world} rank(s); {len(train_set)} samples; "
                f"padding efficiency {sampler.padding_efficiency():.3f}")

    # The loop.
    preemption, skips = PreemptionFlag(), SkipCounter(cfg.train.max_consecutive_skips)
    accum, device = cfg.train.grad_accum, dist.device()
    first_loss = last_loss = None
    it, steps_this_epoch = None, 0
    progress = _progress(total_steps, state["step"])
    if eval_loader is not None and cfg.train.eval_on_start and state["step"] == 0:
        logger.log({"step": 0, "epoch": 0, "eval_loss": evaluate(engine, eval_loader, cfg)})
    while state["step"] < total_steps:
        if it is None:  # first step of this process, fresh or resumed
            sampler.set_epoch(state["epoch"])
            steps_this_epoch = sampler.steps_per_epoch()
        if state["step_in_epoch"] == steps_this_epoch:  # epoch done (or resumed from its last step)
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            it = None
        if it is None:
            sampler.set_epoch(state["epoch"], start=state["step_in_epoch"] * accum)
            steps_this_epoch = sampler.steps_per_epoch()
            it = iter(loader)
            logger.log({"step": state["step"], "epoch": state["epoch"], "padding_efficiency":
                        sampler.padding_efficiency(), "dropped_samples": sampler.dropped(),
                        "bad_samples_skipped": data.bad_samples_skipped})

        engine.train()
        t0 = time.perf_counter()
        sums = np.zeros(4 + model_config.audio_num_codebooks)  # loss, text, audio, tokens, codebooks...
        samples = 0
        for _ in range(accum):
            batch = next(it).to(device)
            outputs = engine(**batch.inputs)
            loss = compute_loss(outputs, batch.label_audio_ids, cfg.loss.text_weight, cfg.loss.audio_weight)
            if faults.active("nan_loss", state["step"] + 1):
                loss.total = loss.total * float("nan")
            engine.backward(loss.total)
            engine.step()  # DeepSpeed updates only at the accumulation boundary, and skips a non-finite one
            sums[:4] += [loss.total.item(), loss.text.item(), loss.audio.item(), batch.num_tokens]
            sums[4:] += loss.codebooks.cpu().numpy()
            samples += batch.num_samples
        state["step"] += 1
        state["step_in_epoch"] += 1
        step_time = time.perf_counter() - t0

        reduced = dist.all_reduce([*sums.tolist(), samples, step_time], op="sum")
        n = accum * world
        loss_mean = reduced[0] / n
        step_time = reduced[-1] / world
        last_step = state["step"] == total_steps
        skipped = skips.update(loss_mean, engine.was_step_applied())
        if skipped:
            dist.print0(f"step {state['step']}: non-finite loss or gradient norm; update skipped on every rank "
                        f"({skips.in_a_row} in a row, {skips.total} in total)")
        else:
            first_loss = loss_mean if first_loss is None else first_loss
            last_loss = loss_mean
        if state["step"] % cfg.train.log_every == 0 or state["step"] == 1 or last_step or skipped:
            logger.log({
                "step": state["step"], "epoch": state["epoch"], "loss": loss_mean, "text_loss": reduced[1] / n,
                "audio_loss": reduced[2] / n, "codebook_losses": [c / n for c in reduced[4:4 + len(sums) - 4]],
                "lr": scheduler.get_last_lr()[0], "grad_norm": _grad_norm(engine),
                "tokens_per_s": reduced[3] / step_time, "samples_per_s": reduced[-2] / step_time,
                "step_time_s": step_time, "peak_mem_gb": peak_memory_gb(),
                "skipped": skipped, "skipped_steps": skips.total,
            })
        progress.update(1, loss_mean)
        if skips.exhausted():
            path = checkpoint.save(engine, model, cfg, out, state)  # skipped updates left the last good weights
            logger.finish()
            raise Diverged(f"{skips.in_a_row} consecutive steps (up to step {state['step']}) had a non-finite loss "
                           f"or gradient norm (train.max_consecutive_skips={cfg.train.max_consecutive_skips}). The "
                           f"last good state is saved in {path}; lower optim.lr or inspect the data, then resume "
                           "with train.resume=auto.")

        eval_loss = None
        if eval_loader is not None and (last_step or (cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0)):
            eval_loss = evaluate(engine, eval_loader, cfg)
            logger.log({"step": state["step"], "epoch": state["epoch"], "eval_loss": eval_loss})
        every = cfg.checkpoint.every_steps
        saved = last_step or (every and state["step"] % every == 0)
        if saved:
            checkpoint.save(engine, model, cfg, out, state, eval_loss)
        if not last_step and preemption.agreed():
            path = checkpoint.save(engine, model, cfg, out, state) if not saved else checkpoint.read_latest(out)
            logger.log({"step": state["step"], "epoch": state["epoch"], "preempted": preemption.received or "peer"})
            logger.finish()
            dist.print0(f"preempted ({preemption.received or 'signal on another rank'}): saved {path} at step "
                        f"{state['step']}; relaunch with train.resume=auto to continue")
            raise Preempted(path)

    # Cleanup: the final adapter, and a merged model when asked.
    progress.close()
    checkpoint.export_adapter(model, out / "adapter")
    dist.barrier()
    summary = {"first_loss": first_loss, "last_loss": last_loss, "steps": state["step"],
               "adapter": str(out / "adapter")}
    if cfg.checkpoint.merge and dist.is_main():
        merge(cfg.model.path, out / "adapter", out / "merged", "bf16" if cuda else "fp32")
    dist.barrier()
    if cfg.checkpoint.merge:
        summary["merged"] = str(out / "merged")
    logger.summary(summary)
    logger.finish()
    return summary


@dataclass
class Data:
    train_set: CachedDataset
    loader: DataLoader
    sampler: MicroBatchSampler
    eval_loader: Optional[DataLoader]
    bad_samples_skipped: int


def build_data(cfg: Config, model_config, text_tokenizer, out: Path) -> Data:
    """Prepare (or reuse) the caches on all ranks, then loaders over this rank's shard of the micro-batches."""
    prepared = [prepare(cfg, cfg.data.train_file, text_tokenizer, cfg.data.cache_dir)]
    if cfg.data.eval_file:
        prepared.append(prepare(cfg, cfg.data.eval_file, text_tokenizer))
    if dist.is_main():
        write_report(out, prepared)
    rank, world, whisper = dist.rank(), dist.world_size(), bool(model_config.encode_whisper_embed)
    train_set = CachedDataset(prepared[0].cache_dir, model_config, whisper)
    collator = make_collator(model_config, text_tokenizer)
    loader, sampler = build_loader(train_set, collator, cfg, rank, world)
    eval_loader = None
    if cfg.data.eval_file:
        eval_set = CachedDataset(prepared[1].cache_dir, model_config, whisper)
        # Evaluation keeps every sample (no dropping); `evaluate` evens out the ranks' forward counts.
        eval_sampler = MicroBatchSampler(eval_set.lengths, rank, world, 1, cfg.train.seed,
                                         micro_batch_size=cfg.train.micro_batch_size, shuffle=False,
                                         drop_remainder=False)
        eval_loader, _ = build_loader(eval_set, collator, cfg, rank, world, sampler=eval_sampler)
    return Data(train_set, loader, sampler, eval_loader, sum(len(p.bad) for p in prepared))


def planned_steps(cfg: Config, sampler: MicroBatchSampler) -> int:
    """Optimizer steps of the whole run (token-budget plans differ per epoch, so each epoch is counted)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    total = 0
    for epoch in range(cfg.train.epochs):
        sampler.set_epoch(epoch)
        total += sampler.steps_per_epoch()
    if total == 0:
        raise ConfigError(f"the training set gives no full step: {len(sampler.lengths)} samples for "
                          f"{dist.world_size()} ranks x train.grad_accum={cfg.train.grad_accum} micro-batches per step")
    return total


@torch.no_grad()
def evaluate(engine, loader, cfg: Config) -> float:
    """Mean loss over the held-out set. Every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively); a rank with one batch fewer repeats its first batch with weight 0."""
    engine.eval()
    batches = list(loader)
    rounds = int(dist.all_reduce([len(batches)], op="max")[0])
    total = count = 0.0
    for i in range(rounds):
        batch = batches[i] if i < len(batches) else batches[0] if batches else None
        if batch is None:
            raise RuntimeError("evaluation set gives this rank no batch; it has fewer samples than ranks")
        batch = batch.to(dist.device())
        outputs = engine(**batch.inputs)
        loss = compute_loss(outputs, batch.label_audio_ids, cfg.loss.text_weight, cfg.loss.audio_weight)
        weight = 1.0 if i < len(batches) else 0.0
        total += weight * loss.total.item()
        count += weight
    total, count = dist.all_reduce([total, count])
    engine.train()
    return total / max(count, 1.0)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


class _progress:
    """tqdm on rank 0, nothing elsewhere."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if dist.is_main():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
