"""Resume a ZeRO-3 checkpoint on a different number of ranks (a requeued job that got other nodes).

ZeRO-3 shards each trainable parameter, its fp32 master copy and both Adam moments across the ranks that wrote the
checkpoint. Every rank rebuilds the full tensors with DeepSpeed's own zero_to_fp32 arithmetic (the moments are flat
groups laid out like the master weights), one parameter at a time from the memory-mapped files, and hands them to
the new engine through DeepSpeed's public setters, which keep only this rank's partition: memory is one parameter's
three tensors, not the whole trainable state (12 bytes per parameter: 69 GB for a full fine-tuning at real size). The global batch must stay
the same (ranks x grad_accum x micro-batch): then the data plan, the schedule and the losses continue unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

from ds_train import dist
from ds_train.errors import CheckpointError
from ds_train.fsutil import drop_mapped_pages

MOMENTS = ("exp_avg", "exp_avg_sq")
DROP_EVERY_BYTES = 1 << 30  # release the checkpoint pages read after about this much


def load_resharded(engine, path: Path, old_world: int, shard_files) -> dict:
    """Collective: restore a checkpoint written by `old_world` ranks into `engine`; return our client state."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import _zero3_merge_trainable_params, parse_model_states

    files = [shard_files(path, r) for r in range(old_world)]
    optim = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
             for _, f in files]
    if int(optim[0].get("zero_stage", -1)) != 3 or engine.zero_optimization_stage() != 3:
        raise CheckpointError(f"{path} was written by {old_world} ranks; resuming on {dist.world_size()} is "
                              "supported for ZeRO-3 only. Relaunch with the same number of ranks.")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress with print()
        model_states = parse_model_states([m for m, _ in files])
    full = {"fp32": _merge([o["fp32_flat_groups"] for o in optim], old_world, model_states,
                           _zero3_merge_trainable_params)}
    flat = [t for o in optim for t in o["fp32_flat_groups"]]
    for key in MOMENTS:
        groups = [[o["optimizer_state_dict"]["state"][g][key] for g in sorted(o["optimizer_state_dict"]["state"])]
                  for o in optim]
        full[key] = _merge(groups, old_world, model_states, _zero3_merge_trainable_params)
        flat += [t for g in groups for t in g]

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if params.keys() != full["fp32"].keys():
        raise CheckpointError(f"{path}: its trainable parameters differ from this run's "
                              f"({sorted(params.keys() ^ full['fp32'].keys())[:4]} ...); same train.mode, "
                              "model.trainable, lora settings?")
    # Adam creates its state at the first step; create it now (with the saved step count) so it can be filled.
    # torch's AdamW keeps `step` as a tensor, DeepSpeedCPUAdam (offload_optimizer) as a Python int.
    step = optim[0]["optimizer_state_dict"]["state"][0]["step"]
    for group in engine.optimizer.fp32_partitioned_groups_flat:
        engine.optimizer.optimizer.state[group] = {"step": step.clone() if torch.is_tensor(step) else int(step),
                                                   **{k: torch.zeros_like(group) for k in MOMENTS}}
    read = 0
    for name, p in params.items():  # the same order on every rank: each gather below is a collective
        master = full["fp32"][name].contiguous()
        # The working (possibly bf16) partition, then the exact fp32 master and the moments.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist.is_main():
                p.data.copy_(master.to(p.dtype))
        safe_set_full_fp32_param(p, master)
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, full[key][name].contiguous(), key)
        read += 3 * master.numel() * master.element_size()
        if read > DROP_EVERY_BYTES:
            drop_mapped_pages(flat)
            read = 0
    drop_mapped_pages(flat)

    saved = torch.load(files[0][0], map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        # That restores the schedule's position, not the optimizer's lr (DeepSpeed's own load restores the optimizer's
        # param_groups): without this the first step after the resume runs at the fresh schedule's lr (0 in warmup).
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]
    return saved["ds_train"]


def _merge(flat_groups: list, world: int, model_states, merge) -> dict:
    """{name: zero_to_fp32's lazy tensor} from each rank's list of flat partitions (zero_to_fp32's layout):
    .contiguous() rebuilds the full tensor."""
    out = {}
    with contextlib.redirect_stdout(sys.stderr), _no_progress_bars():
        merge(out, world, flat_groups, model_states)
    return out


@contextlib.contextmanager
def _no_progress_bars():
    """zero_to_fp32 without its tqdm bars: three per resume on every rank, redrawn into the run's log."""
    from deepspeed.utils import zero_to_fp32

    bar = zero_to_fp32.tqdm
    zero_to_fp32.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        zero_to_fp32.tqdm = bar
