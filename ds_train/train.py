"""The training run: setup -> one explicit loop (forward, loss, backward, step, log, eval, save) -> cleanup.

Under ZeRO-3 every rank runs every forward, evaluation included: parameters are gathered collectively, so a
forward on one rank alone hangs. Rank 0 alone writes files and logs (see ds_train.dist / ds_train.metrics).
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from ds_train import checkpoint, dist, faults
from ds_train.adapter import export_adapter
from ds_train.config import Config, to_yaml
from ds_train.data.loader import build_data
from ds_train.data.sampler import MicroBatchSampler
from ds_train.ds_config import deepspeed_config, resolve_dtype
from ds_train.errors import ConfigError
from ds_train.evaluate import evaluate
from ds_train.export import merge
from ds_train.loss import compute_loss
from ds_train.metrics import make_logger, peak_memory_gb, truncate_metrics
from ds_train.model import build_model, torch_dtype
from ds_train.preflight import preflight
from ds_train.resilience import Diverged, Preempted, PreemptionFlag, SkipCounter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config) -> dict:
    import deepspeed
    from transformers import get_scheduler

    # Setup. Everything that can be wrong with the config or inputs fails here, before the process group.
    pre = preflight(cfg)
    model_config, out = pre.model_config, pre.out_dir
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

    data = build_data(cfg, model_config, pre.text_tokenizer, out)
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
    export_adapter(model, out / "adapter")
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
