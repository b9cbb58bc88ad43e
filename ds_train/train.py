"""The training run: setup -> one explicit loop (forward, loss, backward, step, log, eval, save) -> finish.

Under ZeRO-3 every rank runs every forward, evaluation included: parameters are gathered collectively, so a
forward on one rank alone hangs. Rank 0 alone writes files and logs (see ds_train.dist / ds_train.metrics).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_train import checkpoint, dist, faults
from ds_train.adapter import export_adapter
from ds_train.config import Config, to_yaml
from ds_train.data.collate import Batch
from ds_train.data.loader import Data, build_data
from ds_train.data.sampler import MicroBatchSampler
from ds_train.dpo import Dpo, DpoReport, reference_table
from ds_train.early_stop import FRESH as EARLY_STOP_FRESH, EarlyStop
from ds_train.ds_config import deepspeed_config, resolve_dtype
from ds_train.errors import ConfigError
from ds_train.evaluate import evaluate
from ds_train.export import consolidate
from ds_train.fsutil import staged_dir
from ds_train.lean_imports import collect_garbage_as_usual, muon_only_when_configured
from ds_train.merge import merge
from ds_train.loss import LossReport, Sft
from ds_train.metrics import make_logger, peak_memory_gb, truncate_metrics
from ds_train.model import build_model, torch_dtype
from ds_train.plan import check_at_start as check_memory_plan
from ds_train.plan import resolve_max_tokens
from ds_train.plot import plot_curves
from ds_train.preflight import Preflight, check_full_run_base, preflight
from ds_train.resilience import Diverged, Preempted, SkipCounter, preemption_flag
from ds_train.samples import TrainingSamples


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything the loop works with, made by setup()."""
    cfg: Config
    out: Path
    engine: object
    model: object
    scheduler: object
    data: Data
    steps: "StepBatches"
    total_steps: int
    state: dict  # step, epoch, step_in_epoch (+ early_stop's): what a checkpoint records
    logger: object
    cuda: bool
    objective: object  # ds_train.loss.Sft or ds_train.dpo.Dpo: what train_step optimises


def check_inputs(cfg: Config) -> tuple[Preflight, dict]:
    """Everything that can be wrong with the config or inputs, checked by every rank before the process group starts
    (what needs the ranks together, whether they share the output dir and which checkpoint is intact, is checked
    right after it). Returns the preflight's findings and the DeepSpeed config."""
    pre = preflight(cfg)
    check_full_run_base(cfg)
    # the world size from the launcher's environment
    return pre, deepspeed_config(cfg, dist.world_size(), torch.cuda.is_available())


def setup(cfg: Config) -> Run:
    import deepspeed
    from transformers import get_scheduler

    pre, ds_config = check_inputs(cfg)
    muon_only_when_configured(ds_config)
    out, cuda = pre.out_dir, torch.cuda.is_available()
    dist.init_distributed()  # binds this rank's GPU
    # data.max_tokens=auto becomes a number here, before the config is saved, logged or compared with a checkpoint's
    resolve_max_tokens(cfg, pre.model_config, ds_config)
    checkpoint.check_shared_dir(out)  # before anything reads `latest` or rank 0 writes there
    resume_from = checkpoint.find_resume(cfg, out)  # collective: each rank validates its own shards
    seed_everything(cfg.train.seed)
    if dist.is_main():
        (out / "config.yaml").write_text(to_yaml(cfg))

    data = build_data(cfg, pre.model_config, pre.text_tokenizer, out)
    total_steps = planned_steps(cfg, data.sampler)
    # one warning line if the memory plan predicts an out-of-memory
    check_memory_plan(cfg, pre.model_config, ds_config, max(data.train_set.lengths))
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
        # ZeRO-1/2 skip a step with a non-finite grad norm in every dtype, but scan each gradient for inf/NaN only in
        # fp16/bf16; scan in fp32 too. (ZeRO-3 has no such switch: it goes by the norm outside fp16.)
        engine.optimizer.check_grad_overflow = True
    goal = Sft(cfg)
    if cfg.train.objective == "dpo":  # its reference policy is the model as built: measured before a resume loads
        goal = Dpo(cfg, reference_table(engine, data, cfg, out, resolve_dtype(cfg, cuda)))
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, **EARLY_STOP_FRESH}
    if resume_from is not None:
        saved = checkpoint.load(engine, resume_from)
        state = {k: saved.get(k, state[k]) for k in state}  # a checkpoint before early stopping: its state fresh
        dist.print0(f"resumed from {resume_from} at step {state['step']}")
        truncate_metrics(out, state["step"])
    logger = make_logger(cfg, out, total_steps, state["step"])
    samples, per_epoch = len(data.train_set), data.sampler.epoch_size()  # differ with data.train_files weights
    dist.print0(f"training {total_steps} steps on {dist.world_size()} rank(s); {samples} samples"
                + (f" ({per_epoch} per epoch)" if per_epoch != samples else "")
                + f"; padding efficiency {data.sampler.padding_efficiency():.3f}")
    steps = StepBatches(data, cfg.train.grad_accum, state, logger)
    collect_garbage_as_usual()  # start-up is over: the loop runs with Python's thresholds
    return Run(cfg, out, engine, model, scheduler, data, steps, total_steps, state, logger, cuda, goal)


def train(cfg: Config) -> dict:
    """setup -> the loop (forward, loss, backward, step, log, eval, save) -> the final adapter."""
    run = setup(cfg)
    engine, state, logger = run.engine, run.state, run.logger
    preemption, skips = preemption_flag(), SkipCounter(cfg.train.max_consecutive_skips)
    progress = _progress(run.total_steps, state["step"])
    audio_samples = TrainingSamples(cfg, run.out, run.data.held_out)
    early = EarlyStop(cfg, state)
    losses, stopped = [], None
    if run.data.eval is not None and cfg.train.eval_on_start and state["step"] == 0:
        logger.log({"step": 0, "epoch": 0, **evaluate(engine, run.data.eval, cfg).as_record("eval_")})
    while state["step"] < run.total_steps:
        t0 = time.perf_counter()
        result = train_step(run, run.steps.next())
        state["step"] += 1
        state["step_in_epoch"] += 1
        step, last_step = state["step"], state["step"] == run.total_steps
        skipped = skips.update(result.loss.loss, engine.was_step_applied())
        if skipped:
            dist.print0(f"step {step}: non-finite loss or gradient norm; update skipped on every rank "
                        f"({skips.in_a_row} in a row, {skips.total} in total)")
            run.scheduler.step()  # DeepSpeed does not advance the schedule on a skipped update; lr follows `step`
        else:
            losses.append(result.loss.loss)
        if step % cfg.train.log_every == 0 or step == 1 or last_step or skipped:
            step_time = time.perf_counter() - t0
            logger.log({"step": step, "epoch": state["epoch"], **result.loss.as_record(),
                        "lr": run.scheduler.get_last_lr()[0], "grad_norm": _grad_norm(engine),
                        "tokens": result.tokens, "tokens_per_s": result.tokens / step_time,
                        "samples_per_s": result.samples / step_time, "step_time_s": step_time,
                        "peak_mem_gb": peak_memory_gb(), "skipped": skipped, "skipped_steps": skips.total})
        progress.update(1, result.loss.loss)
        if skips.exhausted():
            path = checkpoint.save(engine, run.model, cfg, run.out, state)  # skips left the last good weights
            logger.finish()
            raise Diverged(f"{skips.in_a_row} consecutive steps (up to step {step}) had a non-finite loss "
                           f"or gradient norm (train.max_consecutive_skips={cfg.train.max_consecutive_skips}). The "
                           f"last good state is saved in {path}; lower optim.lr or inspect the data, then resume "
                           "with train.resume=auto.")

        measured = {}  # this step's eval and sample metrics: what checkpoint.best_metric ranks checkpoints by
        if run.data.eval is not None and (last_step or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
            measured.update(evaluate(engine, run.data.eval, cfg).as_record("eval_"))
            logger.log({"step": step, "epoch": state["epoch"], **measured})
        measured.update(audio_samples.run(engine, step, last_step, logger) or {})
        improved = early.update(step, measured)
        stopped = early.reason()
        every = cfg.checkpoint.every_steps
        saved = last_step or (every and step % every == 0) or improved or stopped
        if saved:
            checkpoint.save(engine, run.model, cfg, run.out, state, measured)
        if stopped:
            logger.log({"step": step, "epoch": state["epoch"], "early_stopped": True})
            dist.print0(f"stopped early at step {step}: {stopped}")
            break
        faults.hold(step, preemption)
        if not last_step and preemption.agreed():
            path = checkpoint.save(engine, run.model, cfg, run.out, state) if not saved else \
                checkpoint.read_latest(run.out)
            logger.log({"step": step, "epoch": state["epoch"], "preempted": preemption.received or "peer"})
            logger.finish()
            dist.print0(f"preempted ({preemption.received or 'signal on another rank'}): saved {path} at step "
                        f"{step}; relaunch with train.resume=auto to continue")
            raise Preempted(path)
    progress.close()
    return finish(run, losses, stopped)


@dataclass
class StepResult:
    loss: LossReport | DpoReport
    tokens: int  # text + audio positions processed on all ranks
    samples: int


def train_step(run: Run, batches: list[Batch]) -> StepResult:
    """One optimizer step over this rank's micro-batches, of any objective (run.objective: ds_train.loss.Sft,
    ds_train.dpo.Dpo). What the objective divides by is all-reduced first (the trained-position counts of the whole
    global batch, from the labels, and the objective's own `known`, e.g. DPO's pair count), so each micro-batch's loss
    is its exact share of the step's loss (ds_train/loss.py); the positions each forward actually trained are checked
    against the counts at the step's one sync (check_counts). DeepSpeed averages gradients over ranks and, by default,
    divides by the accumulation steps; the `world` factor and scale_wrt_gas=False undo both."""
    engine, goal, device, world = run.engine, run.objective, dist.device(), dist.world_size()
    step = run.state["step"] + 1
    counts = sum(b.counts for b in batches)
    known = dist.all_reduce_tensor(torch.cat([counts, goal.known(batches)]).to(device))
    k = len(counts)
    counts, extra = known[:k], known[k:]
    sums = torch.zeros(k, dtype=torch.float64, device=device)
    miscounted = torch.zeros(k, dtype=torch.float64, device=device)
    stats = torch.zeros(goal.STATS, dtype=torch.float64, device=device)
    poisoned = False
    engine.train()
    faults.raise_if("error", step)
    for batch in batches:
        batch = batch.to(device)
        micro = goal.micro(engine, batch, counts, extra)
        loss = micro.loss
        if faults.active("nan_loss", step):
            loss, poisoned = loss * float("nan"), True
        engine.backward(loss * world, scale_wrt_gas=False)
        engine.step()  # DeepSpeed updates only at the accumulation boundary, and skips a non-finite one
        sums += micro.parts.detached()
        stats += micro.stats
        # Per micro-batch, on the device (no sync): positions the loss trained that the collator did not count, or
        # the other way round. Offsetting errors of two micro-batches would cancel in a sum of signed differences.
        miscounted += (micro.parts.counts - batch.counts.to(device)).abs()
    if poisoned:
        sums *= float("nan")
        stats *= float("nan")
    host = torch.tensor([sum(b.num_tokens for b in batches), sum(b.num_samples for b in batches)],
                        dtype=torch.float64, device=device)
    # The loop's one wait for the device per step (counts.tolist() below then finds it idle; DeepSpeed's step and
    # a log step's grad norm have their own).
    totals = dist.all_reduce_tensor(torch.cat([sums, miscounted, stats, host])).tolist()
    check_counts(totals[k:2 * k], counts.tolist(), step)
    loss = goal.report(totals[:k], counts.tolist(), totals[2 * k:-2], extra.tolist())
    return StepResult(loss, int(totals[-2]), int(totals[-1]))


def check_counts(miscounted: list[float], collated: list[float], step: int) -> None:
    """Raise if the forward trained other positions than the collator counted (`miscounted`: per text/codebook, the
    summed |loss count - collated count| over every micro-batch of every rank). The step's objective divides by the
    collated counts (all-reduced before the forward), so a difference is a silently mis-weighted loss: a bug in
    ds_train.loss.trained_positions, or a boson-multimodal whose forward expands the labels differently."""
    if not any(miscounted):
        return
    names = ["text"] + [f"codebook {k}" for k in range(len(collated) - 1)]
    diffs = ", ".join(f"{name}: off by {int(d)} of {int(n)}" for name, d, n in zip(names, miscounted, collated) if d)
    raise RuntimeError(f"step {step}: the forward trained other positions than the collator counted ({diffs}), so "
                       "the loss would be mis-weighted. ds_train.loss.trained_positions no longer matches the model's "
                       "label expansion (a different boson-multimodal version?); tests/test_loss.py shows which.")


def finish(run: Run, losses: list[float], stopped: str | None = None) -> dict:
    """The trained result: the last step's, or the best step's when the run `stopped` early. Rank 0 names the best
    checkpoint (checkpoint.best_metric) and draws OUTPUT_DIR/curves.png. LoRA: the adapter, and with checkpoint.merge
    the merge into the base. Full fine-tuning: the result's checkpoint (the last step and an improving step always
    save one) consolidated into OUTPUT_DIR/merged. Merge and consolidation run on rank 0 alone, after the other ranks
    have left."""
    cfg, out = run.cfg, run.out
    summary = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "steps": run.state["step"]}
    result = None  # the checkpoint whose weights are the result, when not the live model's
    if stopped:
        result = checkpoint.checkpoint_root(out) / checkpoint.tag_of(run.state["best_step"])
        summary.update(stopped_early=stopped, result_step=run.state["best_step"])
    dtype = "bf16" if run.cuda else "fp32"
    if cfg.uses_lora():
        if not stopped:
            export_adapter(run.model, out / "adapter")
        elif dist.is_main():
            with staged_dir(out / "adapter", replace=lambda _: True) as tmp:
                shutil.copytree(result / "adapter", tmp, dirs_exist_ok=True)
        dist.barrier()
        summary["adapter"] = str(out / "adapter")
    if cfg.checkpoint.merge or not cfg.uses_lora():
        # Minutes at real size, on CPU: no rank waits for it in a collective. The peers exit here.
        dist.leave_peers()
        summary["merged"] = str(merge(cfg.model.path, out / "adapter", out / "merged", dtype) if cfg.uses_lora()
                                else consolidate(result or checkpoint.read_latest(out), out / "merged", dtype=dtype))
    if dist.is_main():
        metric = cfg.checkpoint.best_metric
        best = checkpoint.best(out, metric, cfg.checkpoint.best_direction())
        summary.update(best_metric=metric, best_checkpoint=str(best[0]) if best else None,
                       best_value=best[1] if best else None, curves=str(plot_curves(out)))
    run.logger.summary(summary)
    run.logger.finish()
    return summary


class StepBatches:
    """Each step's micro-batches, epoch after epoch, from the position in `state` (fresh or resumed). Logs a record
    when an epoch starts."""

    def __init__(self, data: Data, accum: int, state: dict, logger):
        self.data, self.accum, self.state, self.logger = data, accum, state, logger
        self.it = None
        data.sampler.set_epoch(state["epoch"])
        self.steps_this_epoch = data.sampler.steps_per_epoch()

    def next(self) -> list[Batch]:
        state, sampler = self.state, self.data.sampler
        if state["step_in_epoch"] == self.steps_this_epoch:  # epoch done (or resumed from its last step)
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            self.it = None
        if self.it is None:
            sampler.set_epoch(state["epoch"], start=state["step_in_epoch"] * self.accum)
            self.steps_this_epoch = sampler.steps_per_epoch()
            self.it = iter(self.data.loader)
            self.logger.log({"step": state["step"], "epoch": state["epoch"], "padding_efficiency":
                             sampler.padding_efficiency(), "dropped_samples": sampler.dropped(),
                             "bad_samples_skipped": self.data.bad_samples_skipped})
        return [next(self.it) for _ in range(self.accum)]


def planned_steps(cfg: Config, sampler: MicroBatchSampler) -> int:
    """Optimizer steps of the whole run (token-budget plans differ per epoch, so each epoch is counted)."""
    per_epoch = []
    for epoch in range(max(cfg.train.epochs, 1)):
        sampler.set_epoch(epoch)
        per_epoch.append(sampler.steps_per_epoch())
    if 0 in per_epoch:  # with train.max_steps too: the loop would find no batch to train on
        raise ConfigError(f"the training set gives no full step: {len(sampler.lengths)} samples for "
                          f"{dist.world_size()} ranks x train.grad_accum={cfg.train.grad_accum} micro-batches per step"
                          " (fewer ranks, a smaller train.grad_accum or train.micro_batch_size, or more data)")
    return cfg.train.max_steps if cfg.train.max_steps > 0 else sum(per_epoch)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


class _progress:
    """tqdm on rank 0 on a terminal, nothing elsewhere."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if dist.is_main():
            from tqdm import tqdm

            # On a terminal only: in a log file its redraws become one endless line; the logger's lines remain.
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
