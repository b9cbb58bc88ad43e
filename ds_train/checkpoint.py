"""Checkpoints: save, find, validate and resume; prune old ones. (The adapter each save exports: adapter.py.)

OUTPUT_DIR/checkpoints/
  step-000123/          DeepSpeed ZeRO shards (trainable parameters only) + our client state
    rng-rank00000.pt    each rank's RNG states
    adapter/            PEFT adapter of this step (adapter_config.json + adapter_model.safetensors); train.mode=lora
                        only: a full fine-tuning step is the shards alone (`ds-train consolidate` makes a model dir)
    ds_train_meta.json  written by rank 0 once every rank's files are on disk: the dir is complete
  latest                names the newest complete checkpoint; written last, atomically
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ds_train import dist, faults
from ds_train.adapter import export_adapter
from ds_train.config import AUTO_OR_FRESH, Config, flatten, to_dict
from ds_train.errors import CheckpointError, ConfigError
from ds_train.fsutil import atomic_write, dir_size, fsync, is_no_space_text, is_write_failure
from ds_train.reshard import load_resharded

META = "ds_train_meta.json"
STEP_DIR = re.compile(r"step-(\d+)")


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def read_latest(out_dir: Path) -> Optional[Path]:
    latest = checkpoint_root(out_dir) / "latest"
    if not latest.is_file():
        return None
    return checkpoint_root(out_dir) / latest.read_text().strip()


def save(engine, model, cfg: Config, out_dir: Path, state: dict, metrics: Optional[dict] = None) -> Path:
    """Collective: every rank writes its shards and RNG; then rank 0 writes the adapter, `latest`, and prunes.
    `metrics`: the eval and sample numbers of this step (rank 0's are recorded: it alone has the judges' scores).

    A rank whose write fails (a full disk, an I/O error) stops writing but still takes part in every collective of
    the save; then the ranks agree (one all-gather) and, only once every rank has stopped writing, rank 0 removes the
    step dir, which has no META and so is incomplete. Every rank raises one CheckpointError naming the ranks that
    failed; `latest` still names the previous complete checkpoint."""
    metrics = {k: v for k, v in (metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    eval_loss = metrics.get("eval_loss")
    root = checkpoint_root(out_dir)
    tag = tag_of(state["step"])
    if dist.is_main():
        if (root / tag).exists():
            # Left by a crashed save or an abandoned branch of the run: files of another world size must not mix in.
            _remove_checkpoint(root / tag)
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _check_space(root)
    client = {"ds_train": {**state, "eval_loss": eval_loss, "world_size": dist.world_size(), "config": to_dict(cfg)}}
    failed: list[str] = []  # this rank's failed write, once one failed it writes nothing more
    with _guarded_writes(engine, Path(out_dir), state["step"], failed):
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=True)
    rng = root / tag / f"rng-rank{dist.rank():05d}.pt"
    _write_or_record(failed, lambda: (faults.before_write(state["step"], rng), torch.save(_rng_state(), rng),
                                      faults.after_write(state["step"], Path(out_dir), rng)))
    if cfg.uses_lora():  # a full fine-tuning export would gather the whole model on rank 0 at every save
        _write_or_record(failed, lambda: export_adapter(model, root / tag / "adapter"), always=True)  # collective
    _write_or_record(failed, lambda: _fsync_rank_files(root / tag, dist.rank()))
    faults.crash_if("after_shards", state["step"])
    # Every rank has stopped writing: its files are on disk (fsynced) before `latest` may name them, or it failed.
    failures = [f for f in dist.all_gather_object(failed[0] if failed else None) if f]
    if not failures and dist.is_main():
        _write_or_record(failed, lambda: atomic_write(root / tag / META, json.dumps(
            {"step": state["step"], "eval_loss": eval_loss, "metrics": metrics, "world_size": dist.world_size(),
             "config": to_dict(cfg)})))
        _write_or_record(failed, lambda: atomic_write(root / "latest", tag))
    if not failures:
        failures = [f for f in [dist.broadcast_object(failed[0] if failed else None)] if f]
    if failures:
        free = _free_bytes(root)
        incomplete = (root / tag).is_dir() and not (root / tag / META).is_file()
        if dist.is_main() and incomplete:
            _remove_checkpoint(root / tag)  # no rank writes into it any more
        dist.barrier()
        raise CheckpointError(_failed_save_message(root, tag, failures, free, incomplete))
    if dist.is_main():
        ck = cfg.checkpoint
        # early stopping exports the best step's adapter: that checkpoint is always kept
        keep_best = max(ck.keep_best, 1 if cfg.train.early_stop_patience else 0)
        _prune(root, tag, ck.keep_last, keep_best, ck.best_metric, ck.best_direction())
    dist.barrier()
    return root / tag


@contextlib.contextmanager
def _guarded_writes(engine, out_dir: Path, step: int, failed: list):
    """Around engine.save_checkpoint: a failed write of DeepSpeed's (shard files, rank 0's copy of zero_to_fp32.py)
    is recorded in `failed` instead of raised, and this rank writes nothing more. Raising would leave the rank out
    of save_checkpoint's closing barrier, where its peers would wait for it; this way every rank leaves the save
    together. (DeepSpeed 0.19.8 writes through engine.checkpoint_engine.save and engine._copy_recovery_script.)"""
    ckpt_engine = engine.checkpoint_engine
    write_state, copy_script = ckpt_engine.save, getattr(engine, "_copy_recovery_script", None)

    def save(state_dict, path):
        if not failed:
            _write_or_record(failed, lambda: (faults.before_write(step, path), write_state(state_dict, path),
                                              faults.after_write(step, out_dir, path)))

    def copy(save_path):
        if not failed:
            _write_or_record(failed, lambda: copy_script(save_path))

    ckpt_engine.save = save
    if copy_script is not None:
        engine._copy_recovery_script = copy
    try:
        yield
    finally:
        ckpt_engine.save = write_state
        if copy_script is not None:
            engine._copy_recovery_script = copy_script


def _write_or_record(failed: list, write, always: bool = False) -> None:
    """Run `write` unless this rank has failed a write already (`always`: it holds a collective, so run it anyway);
    record a write failure in `failed` (naming the rank) instead of raising it. Any other error is raised."""
    if failed and not always:
        return
    try:
        write()
    except Exception as e:
        if not is_write_failure(e):
            raise
        if not failed:
            failed.append(f"rank {dist.rank()}: {type(e).__name__}: {str(e).splitlines()[0][:500]}")


def _failed_save_message(root: Path, tag: str, failures: list[str], free: int, removed: bool) -> str:
    head = (_no_space_message(root, 0, free) if any(is_no_space_text(f) for f in failures) else
            f"checkpoint {tag} could not be written to {root}; `latest` still names the last complete checkpoint.")
    tail = (f"Every rank stopped writing; then rank 0 removed the incomplete {tag}." if removed else
            f"{tag} is complete but `latest` could not be updated to name it.")
    return head + "\n  " + "\n  ".join(failures) + "\n" + tail


def _fsync_rank_files(step_dir: Path, rank: int) -> None:
    """Flush this rank's shards (DeepSpeed's torch.save does not) so `latest` never names data still in cache."""
    mine = [p for p in step_dir.iterdir() if p.is_file() and (f"zero_pp_rank_{rank}_" in p.name
                                                              or p.name == f"rng-rank{rank:05d}.pt"
                                                              or (rank == 0 and p.name.startswith("mp_rank_")))]
    for p in mine:
        fsync(p)
    fsync(step_dir)


def step_of(path: Path) -> Optional[int]:
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _prune(root: Path, current: str, keep_last: int, keep_best: int, metric: str = "eval_loss",
           mode: str = "min") -> None:
    """Keep the newest `keep_last` complete checkpoints and the `keep_best` best by `metric` (`mode` min or max);
    drop dirs that a crashed save left without META (every rank has passed the barrier, so none is still being
    written). Complete dirs past the current step belong to an abandoned branch of the run (a resume from an older
    checkpoint): they are neither counted nor removed here; a save at the same step replaces them."""
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    done = [p for p in dirs if (p / META).is_file() and step_of(p) <= step_of(root / current)]
    keep = set(done[-keep_last:]) | {root / current}
    keep |= {p for p in dirs if (p / META).is_file() and step_of(p) > step_of(root / current)}
    if keep_best:
        keep |= {p for p, _ in ranked(done, metric, mode)[:keep_best]}
    for p in dirs:
        if p not in keep:
            _remove_checkpoint(p)


def ranked(step_dirs: list[Path], metric: str, mode: str) -> list[tuple[Path, float]]:
    """(checkpoint, value) best first, for the checkpoints whose META records a finite `metric`; ties go to the
    earlier step."""
    scored = []
    for p in step_dirs:
        meta = json.loads((p / META).read_text())
        # Checkpoints written before META carried `metrics` recorded the eval loss alone.
        value = meta.get("metrics", {}).get(metric, meta.get("eval_loss") if metric == "eval_loss" else None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((p, float(value)))
    sign = 1 if mode == "min" else -1
    return sorted(scored, key=lambda s: (sign * s[1], step_of(s[0])))


def best(out_dir: Path, metric: str, mode: str) -> Optional[tuple[Path, float]]:
    """The best complete checkpoint of OUTPUT_DIR by `metric`, with its value; None when none recorded it."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / META).is_file()]
    order = ranked(done, metric, mode)
    return order[0] if order else None


def _remove_checkpoint(path: Path) -> None:
    (path / META).unlink(missing_ok=True)  # first: a half-removed dir must not look complete
    shutil.rmtree(path)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_resume_request(cfg: Config, out_dir: Path) -> None:
    """train.resume against what train.output_dir holds: a fresh start over another run's checkpoints, or a requested
    resume that finds nothing, is a config error. No collective, so preflight calls it before the process group (a
    launch outside a launcher stops here with its one line, not in MPI discovery)."""
    mode = resolved_mode(cfg.train.resume, out_dir)
    if mode == "none":
        _check_fresh_start(cfg.train.resume, out_dir)
    if mode == "auto" and read_latest(out_dir) is None:
        raise ConfigError(f"train.resume=auto but {checkpoint_root(out_dir)} has no complete checkpoint "
                          f"(no `latest`); use train.resume=none to start fresh, or {AUTO_OR_FRESH} where a run may "
                          "not have saved yet (a requeued job)")
    if mode not in ("auto", "none") and not (Path(mode) / META).is_file():
        raise ConfigError(f"train.resume={mode}: {mode} is not a complete ds_train checkpoint (no {META}); "
                          "give a step-XXXXXX dir that holds one, or train.resume=auto")


def resolved_mode(mode: str, out_dir: Path) -> str:
    """train.resume=auto_or_fresh is `auto` when OUTPUT_DIR has a `latest`, else `none`; other values as they are."""
    if mode != AUTO_OR_FRESH:
        return mode
    return "auto" if read_latest(out_dir) is not None else "none"


def _check_fresh_start(requested: str, out_dir: Path) -> None:
    """A fresh start into OUTPUT_DIR, which its first save would prune: refuse another run's checkpoints. `none` (the
    user asked for a fresh start) refuses complete ones; auto_or_fresh (chosen by a script, e.g. on a requeue) starts
    fresh only where no save was ever begun, so a wrong or shared output dir is never taken over silently."""
    root = checkpoint_root(out_dir)
    steps = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of) \
        if root.is_dir() else []
    complete = [p.name for p in steps if (p / META).is_file()]
    latest = read_latest(out_dir)
    if latest is not None:
        raise ConfigError(f"{out_dir} already holds checkpoints of a run; set train.resume=auto to continue it, "
                          "or choose a new train.output_dir")
    if complete:
        raise ConfigError(f"{out_dir} already holds complete checkpoints of a run ({', '.join(complete[-3:])}) but no "
                          "`latest`; set train.resume=PATH of one to continue it, or choose a new train.output_dir")
    if requested == AUTO_OR_FRESH and steps:
        raise ConfigError(f"train.resume={AUTO_OR_FRESH}: {root} has no `latest` but holds "
                          f"{', '.join(p.name for p in steps[-3:])}, whose save never finished: a run that stopped "
                          "mid-save, or another run writing there now. Not starting fresh over it: remove those dirs "
                          "(or set train.resume=none) if they are this run's, else choose a new train.output_dir")


def find_resume(cfg: Config, out_dir: Path) -> Optional[Path]:
    """The checkpoint dir to resume from, None for a fresh start; raises when a requested resume finds nothing.
    Collective in a process group (the checkpoint is validated by all ranks together): call it on every rank, after
    check_shared_dir."""
    check_resume_request(cfg, out_dir)
    mode = resolved_mode(cfg.train.resume, out_dir)
    if mode == "none":
        return None
    if mode == "auto":
        path = newest_intact(out_dir)
    else:
        path = Path(mode)
        damaged = checkpoint_problems(path)
        if damaged:
            raise CheckpointError(f"train.resume={mode}: the checkpoint is damaged:\n  " + "\n  ".join(damaged)
                                  + "\nGive an earlier step-XXXXXX dir, or train.resume=auto to take the newest "
                                  "intact one.")
    meta = json.loads((path / META).read_text())
    saved_cfg = meta.get("config", {})
    if meta["world_size"] != dist.world_size():
        _check_global_batch(path, meta["world_size"], saved_cfg, cfg)
        dist.print0(f"resume: {path.name} was written by {meta['world_size']} ranks; re-partitioning its weights and "
                    f"optimizer state over {dist.world_size()}")
        # Same global batch: a different grad_accum is what keeps it, not a change of the run.
        saved_cfg = {**saved_cfg, "train": {**saved_cfg.get("train", {}), "grad_accum": cfg.train.grad_accum}}
    changed = config_changes(saved_cfg, to_dict(cfg))
    if changed:
        dist.print0(f"warning: resuming {path} with changed settings, so the run will not continue exactly as it "
                    "would have: " + "; ".join(changed))
    return path


SHARED_CHECK_WAIT_S = 3.0  # a network filesystem may show another client's new file a moment late


def check_shared_dir(out_dir: Path, setting: str = "train.output_dir") -> None:
    """Collective, at start: stop every rank with one ConfigError unless all ranks see the same `out_dir`.

    Checkpoints assume one filesystem shared by every rank: each rank writes its shards into the same step dir,
    rank 0 alone writes `latest` and META and removes stale or incomplete step dirs, and a resume validates each
    rank's files once. Rank 0 writes a file with a fresh name there; every rank looks for it (the name is new, so no
    cache can answer for it) and one all-gather says who saw it."""
    import socket
    import uuid

    if not dist.in_process_group() or dist.world_size() == 1:
        return
    name = f".ds_train-shared-{uuid.uuid4().hex}" if dist.is_main() else None
    if dist.is_main():
        (Path(out_dir) / name).write_text(socket.gethostname())
    name = dist.broadcast_object(name)  # after rank 0's write
    marker = faults.view_of(out_dir) / name
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = dist.all_gather_object((marker.is_file(), socket.gethostname()))
    if dist.is_main():
        (Path(out_dir) / name).unlink()
    blind = [f"rank {r} on host {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"{setting}={out_dir} is not one directory shared by every rank: {', '.join(blind)} "
                          f"cannot see the file rank 0 (host {seen[0][1]}) wrote there. Checkpoints need a filesystem "
                          f"all ranks share (NFS, Lustre, ...): set {setting} to a path on one.")


def _check_global_batch(path: Path, old_world: int, saved: dict, cfg: Config) -> None:
    """On another number of ranks the run continues exactly only with the same global batch (the data plan and the
    step count depend on it)."""
    t = saved.get("train", {})
    new_world = dist.world_size()
    if not t:  # written before META carried the config
        raise ConfigError(f"checkpoint {path} was written by {old_world} ranks but this run has {new_world}, and it "
                          f"does not record its batch settings: relaunch with {old_world} ranks to resume.")
    old = old_world * t["grad_accum"] * t["micro_batch_size"]
    if old != new_world * cfg.train.grad_accum * cfg.train.micro_batch_size:
        accum = old / (new_world * cfg.train.micro_batch_size)
        hint = (f"set train.grad_accum={int(accum)}" if accum == int(accum) and accum >= 1 else
                f"use a number of ranks that divides {old}")
        raise ConfigError(f"checkpoint {path} was written by {old_world} ranks with a global batch of {old} "
                          f"micro-batch samples (ranks x train.grad_accum x train.micro_batch_size); this run has "
                          f"{new_world} ranks and would change it. To continue the run exactly, {hint}.")


# Settings whose change makes a resumed run differ from the uninterrupted one (data order, schedule, shapes).
CONTINUATION_KEYS = ("data.train_file", "data.train_files", "data.pairs_file", "data.eval_split",
                     "data.max_tokens", "train.objective", "train.micro_batch_size", "train.grad_accum",
                     "train.epochs", "train.max_steps", "train.seed",
                     "optim", "lora", "model.path", "model.train_audio_mlp", "model.trainable", "train.mode", "loss")


def load(engine, path: Path) -> dict:
    """Restore shards, optimizer, scheduler and this rank's RNG; return our client state. A checkpoint of another
    number of ranks is re-partitioned (reshard.py); a rank it has no RNG state for keeps its seeded one."""
    old_world = json.loads((path / META).read_text())["world_size"]
    rng = path / f"rng-rank{dist.rank():05d}.pt"
    if old_world != dist.world_size():
        client = {"ds_train": load_resharded(engine, path, old_world, shard_files)}
    else:
        if not rng.is_file():
            raise CheckpointError(f"{path} has no RNG state for rank {dist.rank()} ({rng.name}); the checkpoint is "
                                  "damaged")
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None or "ds_train" not in client:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    _cpu_adam_as_if_it_had_stepped(engine)
    return client["ds_train"]


def _cpu_adam_as_if_it_had_stepped(engine) -> None:
    """DeepSpeedCPUAdam (offload_optimizer) keeps beta1^t and beta2^t in its C++ object: multiplied by beta at each
    step of an uninterrupted run, but computed with pow() by a new object whose first step is t. The two differ in
    the last bit at some steps (fp32 0.999^3), so the first update after a resume differed from the uninterrupted
    run's (and in bf16 the difference grows). Stepping the object through 1..t on a one-element tensor with lr 0
    leaves it as the uninterrupted run's."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not isinstance(opt, DeepSpeedCPUAdam):
        return
    steps = {int(state["step"]) for state in opt.state.values() if "step" in state}
    if not steps:  # saved before its first step
        return
    if len(steps) != 1:
        raise CheckpointError(f"the optimizer's parameters were restored at different steps: {sorted(steps)}")
    group = opt.param_groups[0]
    param, grad, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    for t in range(1, steps.pop() + 1):
        opt.ds_opt_adam.adam_update(opt.opt_id, t, 0.0, *group["betas"], group["eps"], 0.0, group["bias_correction"],
                                    param, grad, exp_avg, exp_avg_sq)


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for the CONTINUATION_KEYS that differ between two config dicts."""
    if not saved:  # checkpoints written before META carried the config
        return []
    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in old.keys() | new.keys()
                  if any(k == c or k.startswith(c + ".") for c in CONTINUATION_KEYS))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def resolve_step_dir(checkpoint_dir: Path, tag: Optional[str]) -> Path:
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a directory")
    if (checkpoint_dir / "checkpoints").is_dir():  # OUTPUT_DIR given
        checkpoint_dir = checkpoint_dir / "checkpoints"
    if step_of(checkpoint_dir) is not None and not (checkpoint_dir / "latest").exists():
        if tag is not None and tag != checkpoint_dir.name:
            raise CheckpointError(f"--tag {tag} given with the step dir {checkpoint_dir}; give one or the other")
        step_dir = checkpoint_dir
    else:
        if tag is None:
            latest = checkpoint_dir / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{checkpoint_dir} has no `latest` file: give a step-XXXXXX dir, or --tag "
                                      f"(available: {_tags(checkpoint_dir)})")
            tag = latest.read_text().strip()
        step_dir = checkpoint_dir / tag
        if not step_dir.is_dir():
            raise CheckpointError(f"no checkpoint {tag} in {checkpoint_dir} (available: {_tags(checkpoint_dir)})")
    if not (step_dir / META).is_file():
        raise CheckpointError(f"{step_dir} is not a complete ds_train checkpoint (no {META}: its save did not "
                              f"finish); use an earlier one (available: {_tags(step_dir.parent)})")
    return step_dir


def _tags(root: Path) -> str:
    tags = sorted((p for p in root.iterdir() if (p / META).is_file()), key=lambda p: step_of(p) or -1)
    return ", ".join(p.name for p in tags) or "none"


SHARD_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt")


def shard_files(step_dir: Path, rank: int) -> tuple[Path, Path]:
    """(model states, optimizer states) of one rank. DeepSpeed prefixes the optimizer file with `bf16_` when the
    run trained in bf16 (the model file never)."""
    bf16 = any(SHARD_FILE.fullmatch(p.name) and p.name.startswith("bf16_") for p in step_dir.iterdir())
    return (step_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            step_dir / f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def check_shards(step_dir: Path) -> dict:
    """Check that each rank of the world size in META left a readable model and optimizer file of one ZeRO-3 run;
    raise one CheckpointError listing every problem. Returns the run config saved in the client state."""
    if (step_dir / "mp_rank_00_model_states.pt").is_file():
        raise CheckpointError(f"{step_dir} was saved under ZeRO-1/2 (mp_rank_00_model_states.pt); consolidate reads "
                              "ZeRO-3 shards. Its adapter/ dir, exported at save time, is the same adapter.")
    problems, config = zero3_shard_problems(step_dir)
    if problems:
        world = json.loads((step_dir / META).read_text())["world_size"]
        raise CheckpointError(f"checkpoint {step_dir} ({world} ranks) cannot be consolidated:\n  "
                              + "\n  ".join(problems))
    return config


def zero3_shard_problems(step_dir: Path) -> tuple[list[str], dict]:
    """(every problem with the ZeRO-3 shard files, the run config saved in the client state). Collective in a process
    group: each rank reads only its own share of the files (_my_ranks) and one all-gather combines the findings."""
    world = json.loads((step_dir / META).read_text())["world_size"]
    found = _combine([_zero3_rank_findings(step_dir, world, r) for r in _my_ranks(world)], world)
    return found["extra"] + found["problems"], found["config"]


def _my_ranks(world: int) -> range:
    """The ranks of a `world`-rank checkpoint whose files this process validates: in a process group its own rank
    and every world_size-th after it (a checkpoint of more ranks than this run), outside one (consolidate, tools)
    all of them (also rank 0 alone after dist.leave_peers: the end-of-run consolidation). Each file is then read by
    one process, not by every rank."""
    if not torch.distributed.is_initialized():
        return range(world)
    return range(dist.rank(), world, dist.world_size())


def _zero3_rank_findings(step_dir: Path, world: int, rank: int) -> dict:
    """What one rank's ZeRO-3 shard files show: problems, a digest of the parameter list, and (rank 0) the files of
    ranks beyond `world` and the saved run config."""
    found = {"rank": rank, "problems": [], "shapes": None, "extra": [], "config": {}}
    problems = found["problems"]
    if rank == 0:
        extra = sorted(p.name for p in step_dir.iterdir()
                       if SHARD_FILE.fullmatch(p.name) and int(SHARD_FILE.fullmatch(p.name).group(2)) >= world)
        if extra:
            found["extra"] = [f"files of ranks beyond the {world} in {META}: {', '.join(extra)}"]
    model_file, optim_file = shard_files(step_dir, rank)
    for f in (model_file, optim_file):
        if not f.is_file():
            problems.append(f"{f.name}: missing")
    if not model_file.is_file() or not optim_file.is_file():
        return found
    model_state = _load(model_file, problems)
    optim_state = _load(optim_file, problems)
    if model_state is None or optim_state is None:
        return found
    osd = optim_state.get("optimizer_state_dict", {})
    if int(osd.get("zero_stage", -1)) != 3 or "fp32_flat_groups" not in osd:
        problems.append(f"{optim_file.name}: not a ZeRO-3 optimizer shard (stage {osd.get('zero_stage')})")
        return found
    if osd.get("partition_count") != world or model_state.get("dp_world_size") != world:
        problems.append(f"{optim_file.name}: written by {osd.get('partition_count')} ranks, {META} says {world}")
    found["shapes"] = hashlib.sha1(repr(model_state.get("param_shapes")).encode()).hexdigest()
    if rank == 0:
        found["config"] = model_state.get("ds_train", {}).get("config", {})
    return found


def _combine(mine: list[dict], world: int) -> dict:
    """Every rank's findings (one all-gather; identity outside a process group), merged in rank order: the problems
    of each rank, then the parameter lists that differ from the first rank's."""
    by_rank = sorted((f for part in dist.all_gather_object(mine) for f in part), key=lambda f: f["rank"])
    problems, shapes, extra, rng, config = [], None, [], [], {}
    for f in by_rank:
        problems += f["problems"]
        extra += f["extra"]
        rng += f.get("rng", [])
        config = config or f["config"]
        if f["shapes"] is None:
            continue
        if shapes is None:
            shapes = f["shapes"]
        elif f["shapes"] != shapes:
            problems.append(f"zero_pp_rank_{f['rank']}_mp_rank_00_model_states.pt: parameter list differs from rank "
                            "0's (files of different runs)")
    return {"problems": problems, "extra": extra, "rng": rng, "config": config}


def _load(path: Path, problems: list) -> Optional[dict]:
    try:
        # mmap: the optimizer file's Adam moments are mapped, not read.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a truncated or garbled zip
        problems.append(f"{path.name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]}), "
                        "truncated or corrupt")
        return None


# ---- resume: the newest intact checkpoint; saves: room on disk ----------------------------------------------------

SPACE_MARGIN = 1.1  # a save writes about what the previous one did; 10% for pickle headers and the adapter


def checkpoint_problems(step_dir: Path) -> list[str]:
    """What makes `step_dir` unusable for a resume ([] when intact). Collective in a process group: each rank
    validates its own files and one all-gather combines the results (every rank gets the same list)."""
    if not (step_dir / META).is_file():
        return [f"no {META} (its save did not finish)"]
    world = json.loads((step_dir / META).read_text())["world_size"]
    if (step_dir / "mp_rank_00_model_states.pt").is_file():  # ZeRO-1/2: one model file, optimizer shards per rank
        mine = []
        for r in _my_ranks(world):
            problems = [] if r else _unreadable(step_dir / "mp_rank_00_model_states.pt")
            optim = shard_files(step_dir, r)[1]
            problems += _unreadable(optim) if optim.is_file() else [f"{optim.name}: missing"]
            mine.append({"rank": r, "problems": problems, "shapes": None, "extra": [], "config": {}})
        shards = _combine([{**f, "rng": _rng_missing(step_dir, f["rank"])} for f in mine], world)
    else:
        shards = _combine([{**_zero3_rank_findings(step_dir, world, r), "rng": _rng_missing(step_dir, r)}
                           for r in _my_ranks(world)], world)
    return shards["rng"] + shards["extra"] + shards["problems"]


def _rng_missing(step_dir: Path, rank: int) -> list[str]:
    name = f"rng-rank{rank:05d}.pt"
    return [] if (step_dir / name).is_file() else [f"{name}: missing"]


def _unreadable(path: Path) -> list[str]:
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a truncated or garbled zip
        return [f"{path.name}: unreadable ({type(e).__name__}), truncated or corrupt"]
    return []


def newest_intact(out_dir: Path) -> Path:
    """The checkpoint `resume=auto` continues from: `latest` if intact, else the newest intact one before it.
    Prints one line per damaged checkpoint passed over; raises CheckpointError when none is intact. Collective in a
    process group: one all-gather per checkpoint checked (checkpoint_problems)."""
    latest = read_latest(out_dir)
    root = checkpoint_root(out_dir)
    if latest is None or step_of(latest) is None:
        raise CheckpointError(f"{root} has no `latest` naming a checkpoint")
    # Dirs past `latest` belong to an abandoned branch of the run (or a save that crashed): never resumed.
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None
                         and step_of(p) <= step_of(latest) and (p / META).is_file()), key=step_of, reverse=True)
    skipped = []
    for path in candidates:
        found = checkpoint_problems(path)
        if not found:
            if skipped:
                dist.print0(f"resume: {skipped[0][0].name} (named by `latest`) is damaged: {'; '.join(skipped[0][1])}. "
                            f"Resuming from {path.name}, the newest intact checkpoint"
                            + (f" (also damaged: {', '.join(p.name for p, _ in skipped[1:])})" if skipped[1:] else ""))
            return path
        skipped.append((path, found))
    detail = "\n  ".join(f"{p.name}: {'; '.join(f)}" for p, f in skipped) or f"{latest.name}: missing"
    raise CheckpointError(f"no intact checkpoint to resume in {root}:\n  {detail}\n"
                          "Start over with train.resume=none in a new train.output_dir.")


def _check_space(root: Path) -> None:
    """Collective, before a save: stop every rank with one message when the filesystem cannot hold another
    checkpoint of the size of the newest complete one (the first save has nothing to measure and goes ahead)."""
    previous = read_latest(root.parent)
    need = 0
    if previous is not None and previous.is_dir():
        need = int(SPACE_MARGIN * dir_size(previous))
    free = _free_bytes(root)
    short = dist.all_reduce([1.0 if need > free else 0.0], op="max")[0] > 0
    if short:
        raise CheckpointError(_no_space_message(root, need, free))


def _free_bytes(root: Path) -> int:
    """Free bytes on the filesystem of the checkpoints dir `root` (or a test's small disk: faults.disk_kib)."""
    return faults.free_bytes(root.parent, shutil.disk_usage(root if root.exists() else root.parent).free)


def _no_space_message(root: Path, need: int, free: int) -> str:
    """`need` 0: not estimated (the first save), the write itself failed."""
    what = f"the checkpoint needs ~{need / 2**20:.1f} MB" if need else "a checkpoint write failed"
    return (f"no space left on {root}: {what}, {free / 2**20:.1f} MB free. Free space (or lower "
            "checkpoint.keep_last) and resume with train.resume=auto; `latest` still names the last complete "
            "checkpoint.")
