"""ds_train/checkpoint.py: save, resume, pruning and adapter export, on real 2-rank ZeRO-3 runs of the tiny model.

The reference is conftest's `reference_run`: 12 uninterrupted steps over 3 epochs of 4 steps, a checkpoint every 2
steps, a cosine schedule with warmup (the learning rate differs at every step) and LoRA dropout (every forward draws
from each rank's RNG). Every resumed run must reproduce its logged losses and learning rates and its final adapter
bit for bit. (The preemption and SIGKILL tests in test_resilience.py reproduce the same run.)
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (DS_CONFIGS, REF_STEPS, REPO, SETTINGS_STEPS, assert_same_adapter, assert_same_run, base_config,
                      launch, loss_records, read_metrics, reference_config, write_config)
from ds_train.adapter import ADAPTER_WEIGHTS
from ds_train.checkpoint import META, _prune, find_resume, step_of, tag_of
from ds_train.fsutil import staged_dir
from ds_train.config import load_config
from ds_train.errors import CheckpointError, ConfigError
from ds_train.faults import CRASH_EXIT

LAST = tag_of(REF_STEPS)


def train(config: Path, **kwargs):
    return launch(["train", str(config)], **kwargs)


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had died right after checkpoint `step` was complete."""
    shutil.copytree(src, dst)
    root = dst / "checkpoints"
    for d in root.glob("step-*"):
        if int(d.name.removeprefix("step-")) > step:
            shutil.rmtree(d)
    shutil.rmtree(dst / "adapter")
    (root / "latest").write_text(tag_of(step))
    return dst


@pytest.mark.slow
def test_cpu_adam_rebuilt_at_a_checkpoint_takes_the_next_step_as_the_one_that_never_stopped():
    """DeepSpeedCPUAdam (zero3_offload.json) keeps beta^t in its C++ object: products in an uninterrupted run, pow()
    in one rebuilt at step t, and fp32 0.999^3 differs between the two in the last bit. Restored at step 2 and stepped
    through (checkpoint.load does it), step 3 is bit-equal; not stepped through, it is not (the test would pass
    without the fix otherwise)."""
    from types import SimpleNamespace

    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from ds_train.checkpoint import _cpu_adam_as_if_it_had_stepped

    grads = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))

    def adam(start: torch.Tensor):
        p = torch.nn.Parameter(start.clone())
        return p, DeepSpeedCPUAdam([p], lr=0.01, betas=(0.9, 0.999), adamw_mode=True)

    def step(p, opt, grad):
        p.grad = grad.clone()
        opt.step()

    p, opt = adam(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    for grad in grads[:2]:
        step(p, opt, grad)
    at_2, state_2 = p.detach().clone(), copy.deepcopy(opt.state_dict())
    step(p, opt, grads[2])
    for stepped_through in (False, True):
        q, rebuilt = adam(at_2)
        rebuilt.load_state_dict(copy.deepcopy(state_2))  # it keeps the tensors it is given and steps them in place
        if stepped_through:
            _cpu_adam_as_if_it_had_stepped(SimpleNamespace(optimizer=rebuilt))
        step(q, rebuilt, grads[2])
        assert torch.equal(q, p) == stepped_through


def test_resume_at_epoch_boundary_restores_position_schedule_and_rng(reference_run, tiny_model, demo_data, tmp_path):
    # Step 4 ends epoch 1: the resumed run must start epoch 2 with its own shuffle, the schedule at step 5, and each
    # rank's RNG where it was (the dropout masks of steps 5-12 depend on it).
    out = rewind(reference_run, tmp_path / "resumed", 4)
    proc = train(reference_config(tiny_model, demo_data, out, train={"resume": "auto"}))
    assert f"resumed from {out / 'checkpoints' / 'step-000004'} at step 4" in proc.stdout
    assert_same_run(out, reference_run)


@pytest.mark.slow
def test_crash_mid_save_keeps_latest_complete_and_resumes(reference_run, tiny_model, demo_data, tmp_path):
    # Killed while saving step 4, resumed from step 2: the middle of epoch 1, so the sampler must restart at its
    # saved position; the losses and learning rates of steps 3-12 must be those of the uninterrupted run.
    out = tmp_path / "crashed"
    keep_2 = {"every_steps": 2, "keep_last": 2}
    proc = train(reference_config(tiny_model, demo_data, out, checkpoint=keep_2),
                 env={"DS_TRAIN_FAULT": "after_shards:4"}, check=False)
    # Both ranks reach the fault and exit CRASH_EXIT; the launcher exits with the first failed rank's code.
    assert proc.returncode == CRASH_EXIT == 99, proc.stderr[-4000:]
    root = out / "checkpoints"
    # Step 4's shards are on disk but the save never finished: `latest` still names step 2.
    assert (root / "latest").read_text() == "step-000002"
    assert (root / "step-000002" / META).is_file()
    assert sorted(p.name for p in (root / "step-000004").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (root / "step-000004" / META).exists()

    resumed = train(reference_config(tiny_model, demo_data, out, train={"resume": "auto"}, checkpoint=keep_2))
    assert f"resumed from {root / 'step-000002'} at step 2" in resumed.stdout
    assert_same_run(out, reference_run)
    # keep_last=2 pruned the rest; no half-written dir or staging dir is left.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-000010", LAST]
    assert all((root / t / META).is_file() for t in ("step-000010", LAST))
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


@pytest.mark.slow
def test_checkpoint_holds_only_trainable_state(reference_run, tiny_model):
    step = reference_run / "checkpoints" / LAST
    world = json.loads((step / META).read_text())["world_size"]
    assert world == 2
    adapter = load_file(reference_run / "adapter" / ADAPTER_WEIGHTS)
    trainable = sum(t.numel() for t in adapter.values())
    base_bytes = sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
    frozen = sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())

    module = torch.load(step / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert len(module) == len(adapter) and all("lora_" in name for name in module), "a frozen weight is in the module state"
    optim = sum(f.stat().st_size for f in step.glob("zero_pp_rank_*_optim_states.pt"))
    model_states = sum(f.stat().st_size for f in step.glob("zero_pp_rank_*_model_states.pt"))
    # fp32 master weights + two Adam moments per trainable parameter, plus pickle/zip overhead per rank file.
    assert 12 * trainable <= optim <= 12 * trainable + world * 64 * 1024, (optim, trainable)
    assert model_states <= world * 64 * 1024, model_states
    # The frozen weights alone would add 4 bytes per frozen parameter.
    assert optim + model_states < 4 * frozen / 10
    assert optim + model_states < base_bytes / 10


@pytest.mark.slow
def test_exported_adapter_is_the_trained_weights_and_loads_with_peft(reference_run, tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    shards = get_fp32_state_dict_from_zero_checkpoint(str(reference_run / "checkpoints"), tag=LAST,
                                                      exclude_frozen_parameters=True)
    for adapter in (reference_run / "adapter", reference_run / "checkpoints" / LAST / "adapter"):
        saved = load_file(adapter / ADAPTER_WEIGHTS)
        assert len(saved) == len(shards) == 36  # lora_A + lora_B of q/k/v/o x 3 layers and gate/up/down x 2
        for name, value in shards.items():
            assert torch.equal(saved[name.replace(".default", "")], value), name
        trained_b = [k for k, v in saved.items() if k.endswith("lora_B.weight") and v.abs().max() > 0]
        assert len(trained_b) == 18  # every lora_B (zero at init) was trained

        model = PeftModel.from_pretrained(HiggsAudioModel.from_pretrained(str(tiny_model)), str(adapter))
        loaded = get_peft_model_state_dict(model)
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_keep_best_keeps_the_lowest_eval_loss_checkpoints(settings_runs, stage):
    """checkpoint.keep_last=1, keep_best=2, a checkpoint and an evaluation after every step (conftest's
    settings_runs, with the shipped ds_configs/zero3.json and zero2.json)."""
    out = settings_runs[stage]
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    assert sorted(evals) == list(range(1, SETTINGS_STEPS + 1))
    assert all(math.isfinite(v) for v in evals.values())
    best = sorted(evals, key=lambda s: (evals[s], s))[:2]
    root = out / "checkpoints"
    kept = sorted(step_of(p) for p in root.iterdir() if p.is_dir())
    assert kept == sorted({SETTINGS_STEPS, *best}), (kept, evals)
    assert (root / "latest").read_text() == tag_of(SETTINGS_STEPS)
    for step in kept:  # each dir records the eval loss it was kept for
        assert json.loads((root / tag_of(step) / META).read_text())["eval_loss"] == evals[step]


@pytest.mark.slow
@pytest.mark.parametrize("ds_json", DS_CONFIGS)
def test_every_shipped_ds_config_trains_resumes_and_consolidates(settings_runs, ds_json, tmp_path):
    """Each file in ds_configs/ (conftest's settings_runs, one per file; bf16 for the base and offload configs): its
    4-step 2-rank run trained, its latest checkpoint consolidates offline to the adapter the run exported at that
    step, and a resume from the earliest checkpoint it kept reproduces the rest of the run (losses, learning rates,
    final adapter)."""
    from ds_train.export import consolidate

    src = settings_runs[Path(ds_json).stem]
    want = loss_records(src)
    assert sorted(want) == list(range(1, SETTINGS_STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in want.values())
    assert want[SETTINGS_STEPS]["loss"] < want[1]["loss"]  # it trained

    last = src / "checkpoints" / tag_of(SETTINGS_STEPS)
    exported = load_file(last / "adapter" / ADAPTER_WEIGHTS)
    if json.loads((REPO / "ds_configs" / ds_json).read_text())["zero_optimization"]["stage"] < 3:
        # consolidate reads ZeRO-3 shards; a ZeRO-1/2 checkpoint's consolidated form is the adapter/ it exported.
        with pytest.raises(CheckpointError, match=r"saved under ZeRO-1/2 .* Its adapter/ dir, exported at save time"):
            consolidate(src / "checkpoints", tmp_path / "consolidated")
        got = exported
    else:
        got = load_file(consolidate(src / "checkpoints", tmp_path / "consolidated") / ADAPTER_WEIGHTS)
    assert got.keys() == exported.keys() and len(got) == 2 * (4 * 3 + 3 * 2)
    for key in got:
        assert torch.equal(got[key], exported[key]), key

    # keep_last=1 (3 in bf16) and keep_best=2 keep at least one checkpoint before the last.
    start = min(step_of(d) for d in (src / "checkpoints").glob("step-*"))
    assert start < SETTINGS_STEPS
    out = rewind(src, tmp_path / "resumed", start)
    saved = json.loads((out / "checkpoints" / tag_of(start) / META).read_text())["config"]
    saved["train"]["output_dir"], saved["train"]["resume"] = str(out), "auto"
    proc = train(write_config(tmp_path / "resume.yaml", saved))
    assert f"resumed from {out / 'checkpoints' / tag_of(start)} at step {start}" in proc.stdout
    resumed = loss_records(out)
    assert sorted(resumed) == list(range(1, SETTINGS_STEPS + 1))
    for step in range(start + 1, SETTINGS_STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert resumed[step]["lr"] == want[step]["lr"], step
    if saved["model"]["dtype"] == "bf16":  # conftest.BF16_SETTINGS: bit for bit (DeepSpeedCPUAdam's too, see above)
        assert [resumed[s]["loss"] for s in range(start + 1, SETTINGS_STEPS + 1)] == [
            want[s]["loss"] for s in range(start + 1, SETTINGS_STEPS + 1)]
    assert_same_adapter(out / "adapter", src / "adapter")


# ---- without a launch -------------------------------------------------------------------------------------------

def fake_checkpoint(root: Path, step: int, eval_loss=None, world_size: int = 2, complete: bool = True) -> Path:
    d = root / tag_of(step)
    d.mkdir(parents=True)
    for rank in range(world_size):  # the files resume validation reads, in DeepSpeed's ZeRO-3 layout, no tensors
        prefix = d / f"zero_pp_rank_{rank}_mp_rank_00"
        torch.save({"param_shapes": [], "dp_world_size": world_size}, f"{prefix}_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "fp32_flat_groups": [], "partition_count": world_size}},
                   f"{prefix}_optim_states.pt")
        torch.save({}, d / f"rng-rank{rank:05d}.pt")
    if complete:
        (d / META).write_text(json.dumps({"step": step, "eval_loss": eval_loss, "world_size": world_size}))
    return d


def test_prune_keeps_last_and_best_and_drops_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, loss in [(1, 5.0), (2, 2.0), (3, None), (4, 3.0), (5, float("nan")), (6, 4.0)]:
        fake_checkpoint(root, step, loss)
    fake_checkpoint(root, 7, complete=False)  # a crashed save
    fake_checkpoint(root, 9, 1.0)  # a later branch of the run (resumed from an older checkpoint): not ours to drop
    (root / "latest").write_text("step-000006")
    _prune(root, "step-000006", keep_last=2, keep_best=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000005", "step-000006",
                                                       "step-000009"]


def test_prune_and_best_by_a_sample_metric(tmp_path):
    """checkpoint.best_metric=speaker_sim (higher is better): META's metrics rank the checkpoints; one without the
    metric (saved between sample rounds) is never the best; ties go to the earlier step."""
    from ds_train.checkpoint import best

    root = tmp_path / "checkpoints"
    for step, sim in [(2, 0.5), (4, None), (6, 0.8), (8, 0.8), (10, 0.1)]:
        d = fake_checkpoint(root, step)
        metrics = {"eval_loss": 1.0 / step, **({"samples_speaker_sim": sim} if sim is not None else {})}
        (d / META).write_text(json.dumps({"step": step, "eval_loss": 1.0 / step, "metrics": metrics, "world_size": 2}))
    assert best(tmp_path, "samples_speaker_sim", "max") == (root / "step-000006", 0.8)
    assert best(tmp_path, "eval_loss", "min") == (root / "step-000010", 0.1)
    assert best(tmp_path, "samples_wer", "min") is None
    _prune(root, "step-000010", keep_last=1, keep_best=2, metric="samples_speaker_sim", mode="max")
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008", "step-000010"]


def resume_config(tmp_path: Path, resume: str, **optim):
    cfg = base_config(Path("/nonexistent/model"), Path("/nonexistent/data"), tmp_path / "out",
                      train={"resume": resume}, optim={"lr": 0.005, **optim})
    return load_config(str(write_config(tmp_path / "c.yaml", cfg)))


def test_find_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert find_resume(resume_config(tmp_path, "none"), out) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_resume(resume_config(tmp_path, "auto"), out)

    root = out / "checkpoints"
    step = fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, complete=False)
    with pytest.raises(ConfigError, match="not a complete ds_train checkpoint"):
        find_resume(resume_config(tmp_path, str(root / "step-000006")), out)
    (root / "latest").write_text("step-000004")
    assert find_resume(resume_config(tmp_path, "auto"), out) == step
    assert find_resume(resume_config(tmp_path, str(step)), out) == step

    monkeypatch.setenv("WORLD_SIZE", "4")
    # Another number of ranks resumes (re-partitioned; tests/test_recovery.py) only with the same global batch,
    # which a checkpoint without its config cannot tell.
    with pytest.raises(ConfigError, match=r"written by 2 ranks but this run has 4.*relaunch with 2 ranks"):
        find_resume(resume_config(tmp_path, "auto"), out)

    # A changed setting that alters the continuation is reported.
    monkeypatch.setenv("WORLD_SIZE", "2")
    meta = json.loads((step / META).read_text())
    saved = resume_config(tmp_path, "auto")
    from ds_train.config import to_dict
    (step / META).write_text(json.dumps({**meta, "config": to_dict(saved)}))
    capsys.readouterr()
    find_resume(resume_config(tmp_path, "auto"), out)
    assert "warning" not in capsys.readouterr().out
    find_resume(resume_config(tmp_path, "auto", lr=0.01), out)
    assert "optim.lr: 0.005 -> 0.01" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"2 ranks with a global batch of 2 .* use a number of ranks that divides 2"):
        find_resume(resume_config(tmp_path, "auto"), out)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"this run has 1 ranks .* set train.grad_accum=2"):
        find_resume(resume_config(tmp_path, "auto"), out)


def test_auto_or_fresh_resumes_a_checkpoint_starts_fresh_without_one_and_never_over_another_run(tmp_path, monkeypatch):
    """train.resume=auto_or_fresh (what scripts/train.sbatch adds on a requeue): `auto` where `latest` exists, a fresh
    start where no save was ever begun, and an error (never a silent fresh start) over step dirs without `latest`."""
    from ds_train.metrics import MetricsLogger

    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = resume_config(tmp_path, "auto_or_fresh")
    assert find_resume(cfg, out) is None  # nothing there: fresh (`auto` would refuse)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')  # a first attempt stopped before any save
    assert find_resume(cfg, out) is None
    MetricsLogger(cfg, out)  # fresh: the attempt's records are kept aside, never mixed with this run's
    assert (out / "metrics.1.jsonl").is_file() and not (out / "metrics.jsonl").exists()

    root = out / "checkpoints"
    fake_checkpoint(root, 2, complete=False)  # a save that never finished: this run's or another's in progress
    with pytest.raises(ConfigError, match=r"auto_or_fresh: .* has no `latest` but holds step-000002, whose save "
                                          r"never finished.*choose a new train.output_dir"):
        find_resume(cfg, out)
    fake_checkpoint(root, 4)  # complete, but `latest` lost: another run's, which a fresh start would prune
    for mode in ("auto_or_fresh", "none"):
        with pytest.raises(ConfigError, match=r"holds complete checkpoints of a run \(step-000004\) but no `latest`"):
            find_resume(resume_config(tmp_path, mode), out)
    (root / "latest").write_text("step-000004")
    assert find_resume(cfg, out) == root / "step-000004"  # as `auto`
    (out / "metrics.jsonl").write_text('{"step": 4, "loss": 2.5}\n')
    MetricsLogger(cfg, out, start_step=4).log({"step": 5, "loss": 2.0})  # resumed: appends to the run's records
    assert [r["step"] for r in read_metrics(out)] == [4, 5] and not (out / "metrics.2.jsonl").exists()


@pytest.mark.slow
def test_ranks_that_do_not_share_the_output_dir_stop_at_start(tiny_model, demo_data, tmp_path):
    # Simulated through DS_TRAIN_FAULT (ds_train/faults.py `local_output_dir`): rank 1 looks for OUTPUT_DIR's files
    # in a private dir of its own, as a rank whose train.output_dir is on a node-local disk would.
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", base_config(tiny_model, demo_data, out, train={"max_steps": 2}))
    proc = train(config, env={"DS_TRAIN_FAULT": "local_output_dir:0:1"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    host = socket.gethostname()
    assert (f"ds-train train: config error: train.output_dir={out} is not one directory shared by every rank: rank 1 "
            f"on host {host} cannot see the file rank 0 (host {host}) wrote there.") in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("is not one directory shared") == 1  # reported once, by rank 0
    assert sorted(p.name for p in out.iterdir()) == []  # stopped before anything was written there
    assert "steps on 2 rank(s)" not in proc.stdout  # the loop never started


def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(out, replace=lambda d: True) as tmp:
            (tmp / "a").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with staged_dir(out, replace=lambda d: True) as tmp:
        (tmp / "a").write_text("1")
    with staged_dir(out, replace=lambda d: (d / "a").is_file()) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(FileExistsError, match="not an earlier output"):
        with staged_dir(out, replace=lambda d: False):
            pass
    assert (out / "b").read_text() == "2"
