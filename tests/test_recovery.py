"""ds_train/checkpoint.py recovery: resume past a damaged checkpoint, and a save on a full disk, on real 2-rank ZeRO-3 runs.

Faults are injected the way a user meets them: a deleted or truncated shard file. A filesystem that fills up is
simulated through DS_TRAIN_FAULT (ds_train/faults.py: `disk_kib` a small disk, `enospc` one rank's failing write), so
the tests need no root to mount a small disk and run on any machine: what is simulated is the free space a save
sees and the OSError(ENOSPC) of the write, nothing else. The damaged checkpoints are copies of conftest's plain_run
(checkpoints step-000002, -4 and -6 = latest), and the resumed runs must reproduce it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import PLAIN_STEPS, REPO, base_config, launch, plain_config, read_metrics, write_config
from ds_train.checkpoint import checkpoint_problems, find_resume
from ds_train.errors import CheckpointError
from ds_train.adapter import ADAPTER_WEIGHTS
from ds_train.config import load_config
from ds_train.errors import ConfigError

LAST = f"step-{PLAIN_STEPS:06d}"  # plain_run's latest checkpoint; the one before it is step-000004


def disk_config(tiny_model, demo_data, out: Path, **train) -> Path:
    """The full-disk runs: checkpoints of ~460 KB every 2 steps."""
    cfg = base_config(tiny_model, demo_data, out, train={"epochs": 9, **train},
                      checkpoint={"every_steps": 2, "keep_last": 10})
    return write_config(out.parent / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="module")
def four_steps_adapter_like(tiny_model, tmp_path_factory) -> Path:
    """A real PEFT adapter dir of the tiny model (r=8, alpha=16, the default targets), made without training."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.model import apply_lora

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    cfg = load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                             "train.output_dir=/o", "lora.r=8", "lora.alpha=16"])
    apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)), cfg).save_pretrained(str(out))
    return out


def damaged_copy(src: Path, dst: Path, step: int, damage: str) -> Path:
    shutil.copytree(src, dst)
    d = dst / "checkpoints" / f"step-{step:06d}"
    if damage == "deleted optimizer shard":
        (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "deleted model shard":
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    elif damage == "truncated shard":
        f = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "deleted rng":
        (d / "rng-rank00001.pt").unlink()
    return dst


def resume_cfg(out: Path, resume="auto"):
    return load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                              f"train.output_dir={out}", f"train.resume={resume}"])


@pytest.mark.slow
@pytest.mark.parametrize("damage, named", [("deleted optimizer shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"),
                                           ("deleted model shard", "zero_pp_rank_0_mp_rank_00_model_states.pt: missing"),
                                           ("truncated shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt: unreadable"),
                                           ("deleted rng", "rng-rank00001.pt: missing")])
def test_auto_resume_skips_a_damaged_latest(plain_run, tmp_path, monkeypatch, capsys, damage, named):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = damaged_copy(plain_run, tmp_path / "run", PLAIN_STEPS, damage)
    assert find_resume(resume_cfg(out), out) == out / "checkpoints" / "step-000004"
    line = capsys.readouterr().out
    assert f"{LAST} (named by `latest`) is damaged" in line and named in line
    assert "Resuming from step-000004, the newest intact checkpoint" in line
    # Asked for by path, the damaged checkpoint is an error naming the file.
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(")):
        find_resume(resume_cfg(out, str(out / "checkpoints" / LAST)), out)


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_listing_each(plain_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = damaged_copy(plain_run, tmp_path / "run", PLAIN_STEPS, "truncated shard")
    (out / "checkpoints" / "step-000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    (out / "checkpoints" / "step-000002" / "rng-rank00001.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        find_resume(resume_cfg(out), out)
    msg = str(e.value)
    assert "no intact checkpoint to resume" in msg
    assert f"{LAST}: zero_pp_rank_1_mp_rank_00_optim_states.pt: unreadable" in msg
    assert "step-000004: zero_pp_rank_0_mp_rank_00_model_states.pt: missing" in msg
    assert "step-000002: rng-rank00001.pt: missing" in msg


@pytest.mark.slow
def test_resume_from_the_intact_checkpoint_continues_the_run(plain_run, tiny_model, demo_data, eval3, tmp_path):
    out = damaged_copy(plain_run, tmp_path / "run", PLAIN_STEPS, "truncated shard")
    proc = launch(["train", str(plain_config(tiny_model, demo_data, eval3, out, train={"resume": "auto"}))])
    assert "Resuming from step-000004" in proc.stdout
    assert proc.stdout.count("is damaged") == 1  # rank 0 says it once
    want = {r["step"]: r["loss"] for r in read_metrics(plain_run) if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, PLAIN_STEPS + 1))
    assert got == pytest.approx(want, rel=1e-5)
    # The damaged latest checkpoint was replaced by a good one.
    assert checkpoint_problems(out / "checkpoints" / LAST) == []


def assert_no_partial_dirs(out: Path, complete: list[str]) -> None:
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == complete
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


@pytest.mark.slow
def test_full_disk_is_refused_before_writing(tiny_model, demo_data, tmp_path):
    # Each checkpoint of this run takes ~450 KB (+ 40 KB of DeepSpeed's scripts): 1120 KiB hold two, and the third
    # is refused up front. (A 1200 KiB tmpfs did the same: its page-rounded sizes took ~100 KiB more.)
    out = tmp_path / "run"
    proc = launch(["train", str(disk_config(tiny_model, demo_data, out, max_steps=6))],
                  env={"DS_TRAIN_FAULT": "disk_kib:1120"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    assert f"no space left on {out / 'checkpoints'}: the checkpoint needs ~0.5 MB, 0.2 MB free" in err \
        or f"no space left on {out / 'checkpoints'}: the checkpoint needs ~0.5 MB, 0.1 MB free" in err, err[-3000:]
    assert "iostream error" not in err and "Traceback" not in err
    assert_no_partial_dirs(out, ["step-000002", "step-000004"])
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"


@pytest.mark.slow
def test_full_disk_at_the_first_save_leaves_no_partial_dir(tiny_model, demo_data, tmp_path):
    # Nothing to measure before the first save: it fails while writing, and the half-written dir is removed.
    out = tmp_path / "run"
    proc = launch(["train", str(disk_config(tiny_model, demo_data, out, max_steps=2))],
                  env={"DS_TRAIN_FAULT": "disk_kib:300"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"no space left on {out / 'checkpoints'}: a checkpoint write failed" in proc.stderr, proc.stderr[-3000:]
    assert_no_partial_dirs(out, [])


def watch_dir(path: Path, stop: threading.Event, seen: list) -> None:
    """Record every distinct set of file names under `path` (a step dir being written) until `stop`."""
    last = None
    while not stop.is_set():
        names = frozenset(p.name for p in path.iterdir()) if path.is_dir() else frozenset()
        if names != last:
            seen.append(names)
            last = names
        time.sleep(0.01)


@pytest.mark.slow
def test_a_rank_out_of_space_never_deletes_what_its_peers_write(tiny_model, demo_data, tmp_path):
    # Rank 1's first write of step 4's save fails (ENOSPC) while rank 0 is still writing (each of its writes takes
    # 2 s longer). Rank 0's files must be written in full before anything is removed: the ranks agree first, then rank 0
    # removes the incomplete step dir. A rank that removed the dir on its own would do it while rank 0 waits, and
    # the launcher would then stop rank 0 before it wrote anything.
    out = tmp_path / "run"
    step4 = out / "checkpoints" / "step-000004"
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_dir, args=(step4, stop, seen), daemon=True)
    watcher.start()
    try:
        proc = launch(["train", str(disk_config(tiny_model, demo_data, out, max_steps=6))],
                      env={"DS_TRAIN_FAULT": "enospc:4:1,slow_write:4:0"}, check=False)
    finally:
        stop.set()
        watcher.join()
    err = proc.stderr
    assert proc.returncode == 3, err[-3000:]
    assert f"ds-train train: no space left on {out / 'checkpoints'}: a checkpoint write failed" in err, err[-3000:]
    failures = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("rank ")]
    assert len(failures) == 1 and failures[0].startswith(
        "rank 1: OSError: [Errno 28] No space left on device (injected by DS_TRAIN_FAULT enospc:4)"), failures
    assert str(step4 / "zero_pp_rank_1_mp_rank_00_model_states.pt") in failures[0]
    assert "Every rank stopped writing; then rank 0 removed the incomplete step-000004." in err
    assert "Traceback" not in err and err.count("no space left on") == 1  # one report, by rank 0
    # Rank 0 wrote its shards and then its RNG file before the dir was removed. (Its adapter, renamed into place last,
    # lives only milliseconds before the removal: too short for the poll to be sure to see it.)
    rank0 = {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "rng-rank00000.pt"}
    assert any(rank0 <= names for names in seen), seen
    assert not any(n.startswith(("zero_pp_rank_1", "rng-rank00001")) for names in seen for n in names)
    assert seen[-1] == frozenset() and not step4.exists()
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert checkpoint_problems(out / "checkpoints" / "step-000002") == []
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


# Run by each of 2 processes of a gloo process group (no DeepSpeed launcher): find_resume on a checkpoint dir,
# counting the files each process opens with torch.load.
VALIDATE = r"""
import json, os, sys
import torch, torch.distributed
torch.distributed.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
opened, real_load = [], torch.load
def counting_load(f, *args, **kwargs):
    opened.append(os.path.relpath(f, sys.argv[3]))
    return real_load(f, *args, **kwargs)
torch.load = counting_load
from ds_train.checkpoint import find_resume
from ds_train.config import load_config
cfg = load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                         f"train.output_dir={sys.argv[3]}", "train.resume=auto"])
path = find_resume(cfg, __import__("pathlib").Path(sys.argv[3]))
print(json.dumps({"path": str(path), "opened": sorted(opened)}))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_validates_its_own_shards(plain_run, tmp_path):
    # 2 ranks resume past a damaged latest: each opens only its own rank's shard files (2 per checkpoint, not 2 per
    # checkpoint and rank), and both learn from one all-gather that rank 1's file of step-000006 is truncated.
    out = damaged_copy(plain_run, tmp_path / "run", PLAIN_STEPS, "truncated shard")
    init = f"file://{tmp_path / 'store'}"
    procs = [subprocess.Popen([sys.executable, "-c", VALIDATE, init, str(r), str(out)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    got = [json.loads(stdout.splitlines()[-1]) for stdout, _ in results]
    assert [g["path"] for g in got] == [str(out / "checkpoints" / "step-000004")] * 2
    for rank, g in enumerate(got):
        assert g["opened"] == sorted(f"checkpoints/{step}/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
                                     for step in (LAST, "step-000004") for kind in ("model", "optim")), g["opened"]
    said = results[0][0]  # rank 0 prints; rank 1 never opened the damaged file itself but rank 0 names it
    assert f"{LAST} (named by `latest`) is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt: unreadable" in said
    assert "is damaged" not in results[1][0]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["plain_run", "plain_offload_run"])
def test_resume_on_one_rank_continues_a_two_rank_run(run, request, tiny_model, demo_data, eval3, tmp_path):
    """A requeued job gets fewer ranks: 2 ranks x grad_accum 1 -> 1 rank x grad_accum 2, the same global batch; with
    ds_configs/zero3_partition_all.json (torch AdamW, `step` a tensor) and zero3_offload.json (DeepSpeedCPUAdam on
    the host, `step` a Python int)."""
    plain_run = request.getfixturevalue(run)
    ds_json = json.loads((plain_run / "checkpoints" / LAST / "ds_train_meta.json").read_text())["config"]["train"][
        "deepspeed_config"]
    out = tmp_path / "run"
    shutil.copytree(plain_run, out)
    for step in (4, PLAIN_STEPS):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    (out / "checkpoints" / "latest").write_text("step-000002")
    config = plain_config(tiny_model, demo_data, eval3, out,
                          train={"resume": "auto", "grad_accum": 2, "deepspeed_config": ds_json})
    proc = launch(["train", str(config)], nprocs=1)
    assert "step-000002 was written by 2 ranks; re-partitioning its weights and optimizer state over 1" in proc.stdout
    assert "warning" not in proc.stdout  # grad_accum changed to keep the global batch: the run continues exactly
    assert "Gathering sharded weights" not in proc.stderr  # zero_to_fp32's tqdm bars stay out of the log
    want = {r["step"]: r for r in read_metrics(plain_run) if "loss" in r}
    got = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert sorted(got) == list(range(1, PLAIN_STEPS + 1))
    for step in range(3, PLAIN_STEPS + 1):  # steps 4-6 show the Adam moments and step count were restored too
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == want[step]["lr"]
    assert json.loads((out / "checkpoints" / LAST / "ds_train_meta.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_init_from_adapter_starts_from_its_weights(plain_run, tiny_model, demo_data, tmp_path):
    # lr 1e-30: Adam's first update is ~1e-30 per weight, below fp32 resolution, so the exported adapter after one
    # step is the initial one bit for bit: the run started from the given adapter, not from a fresh LoRA init.
    out = tmp_path / "continued"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 1, "epochs": 9},
                      optim={"lr": 1e-30, "scheduler": "constant"})
    cfg["lora"]["init_from"] = str(plain_run / "adapter")
    proc = launch(["train", str(write_config(tmp_path / "c.yaml", cfg))])
    assert proc.stdout.count(f"lora.init_from: 36 LoRA tensors from {plain_run / 'adapter'}") == 1
    from safetensors.torch import load_file
    start, end = load_file(plain_run / "adapter" / ADAPTER_WEIGHTS), load_file(out / "adapter" / ADAPTER_WEIGHTS)
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    fresh_first = [r["loss"] for r in read_metrics(plain_run) if "loss" in r][0]
    assert [r["loss"] for r in read_metrics(out) if "loss" in r][0] < fresh_first - 0.01  # trained adapter: lower


def test_init_from_adapter_must_match_rank_scale_and_targets(four_steps_adapter_like, tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.adapter import check_init_adapter, load_init_adapter
    from ds_train.model import apply_lora

    adapter = four_steps_adapter_like
    with pytest.raises(ConfigError, match=r"trained with lora.r=8 \(this run: 16\), lora.alpha=16 \(this run: 32\)"):
        check_init_adapter(str(adapter), 16, 32)
    with pytest.raises(ConfigError, match="not a PEFT adapter dir \\(missing adapter_config.json"):
        check_init_adapter(str(adapter.parent), 8, 16)
    cfg = load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                             "train.output_dir=/o", "lora.r=8", "lora.alpha=16",
                             "lora.target_modules=[self_attn.q_proj]"])
    model = apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)), cfg)
    with pytest.raises(ConfigError, match=r"does not match this model and lora.target_modules: 30 tensor\(s\) for "
                                          r"modules this run does not adapt"):
        load_init_adapter(model, str(adapter))
