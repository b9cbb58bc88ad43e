"""Preemption, non-finite steps, crash-resume chaos: 2 real ranks under the real launcher, faults injected from
outside (signals, SIGKILL) or through DS_TRAIN_FAULT (ds_train/faults.py) for a NaN loss."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import (REF_STEPS, REPO, assert_same_run, free_port, launch, loss_records, read_metrics,
                      reference_config)
from ds_train.checkpoint import tag_of
from ds_train.errors import EXIT_DIVERGED as DIVERGED_EXIT
from ds_train.resilience import PREEMPTED_EXIT

pytestmark = pytest.mark.slow
KILLED_EXIT = 256 - signal.SIGKILL  # a rank killed by SIGKILL, as the launcher passes it on


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        path = out / "metrics.jsonl"
        if path.is_file():
            done = [r["step"] for r in read_metrics(out) if "loss" in r]
            if done and done[-1] >= step:
                return done[-1]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _rank_pid(launcher_pid: int, rank: int) -> int:
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "ds_train" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank) \
                    and "deepspeed.launcher" not in " ".join(p.cmdline()):
                return p.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"rank {rank} not found under {launcher_pid}")


def _launcher_cmd(config: Path, *extra: str, nprocs: int = 2) -> list[str]:
    bin_dir = Path(os.sys.executable).parent
    return [str(bin_dir / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
            "--no_local_rank", "--module", "ds_train", "train", str(config), *extra]


def test_sigterm_to_run_sh_checkpoints_exits_75_and_resumes_exactly(tiny_model, demo_data, tmp_path, reference_run):
    out = tmp_path / "preempt"
    config = reference_config(tiny_model, demo_data, out)
    proc = _start([str(REPO / "run.sh"), "train", str(config)], env={"LOCAL_SIZE": "2"})
    _wait_for_step(out, 5, proc)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)  # run.sh is the launcher the user (or SLURM) signals
    output, _ = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    print(f"SIGTERM-to-exit: {elapsed:.1f}s")
    assert proc.returncode == PREEMPTED_EXIT == 75, output[-4000:]
    assert elapsed < 30
    stopped = [r for r in read_metrics(out) if "preempted" in r]
    assert len(stopped) == 1 and stopped[0]["preempted"] == "SIGUSR1"
    step = stopped[0]["step"]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:06d}"
    assert 5 <= step < REF_STEPS

    launch(["train", str(config), "train.resume=auto"])
    assert_same_run(out, reference_run)


def _catches(pid: int, sig: int, timeout: float = 60) -> None:
    """Wait until process `pid` has a handler for `sig` (its SigCgt mask in /proc): a signal sent now is not fatal."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} set no handler for signal {sig} in {timeout}s")


def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tiny_model, demo_data, tmp_path):
    """SIGUSR1 to rank 1 alone, during its set-up (imports, model, DeepSpeed; the handler is set first thing, before
    torch loads: without it the signal would kill the rank): both ranks stop after their first step."""
    out = tmp_path / "rank_signal"
    config = reference_config(tiny_model, demo_data, out)
    proc = _start(_launcher_cmd(config), env={"LOCAL_SIZE": "2"})
    deadline = time.time() + 60
    while True:
        try:
            rank1 = _rank_pid(proc.pid, 1)
            break
        except (AssertionError, psutil.Error):  # not spawned yet
            assert time.time() < deadline, "rank 1 not started in 60 s"
            time.sleep(0.01)
    _catches(rank1, signal.SIGUSR1)
    os.kill(rank1, signal.SIGUSR1)  # only rank 1 hears it; rank 0 learns at the step boundary
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, output[-4000:]
    records = read_metrics(out)
    stopped = [r for r in records if "preempted" in r]
    assert len(stopped) == 1 and stopped[0]["preempted"] == "peer"  # rank 0 did not hear the signal itself
    step = stopped[0]["step"]
    assert step == 1 and records[-1] is stopped[0]  # nothing logged after the stop
    assert max(r["step"] for r in records) == max(loss_records(out)) == step  # no step trained past it
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:06d}"
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank00000.pt", "rng-rank00001.pt"]


def test_preemption_signal_before_the_ranks_start_exits_75_without_them(tiny_model, demo_data, tmp_path):
    """USR1 to run.sh during its set-up, before it starts the launcher (SLURM's warning can come that early, e.g.
    while it probes ssh to the other nodes): no rank starts, exit 75, so scripts/train.sbatch requeues."""
    out = tmp_path / "early"
    config = reference_config(tiny_model, demo_data, out)
    proc = _start([str(REPO / "run.sh"), "train", str(config)], env={"LOCAL_SIZE": "2"})
    _catches(proc.pid, signal.SIGUSR1)  # run.sh's trap, set in its first lines; its set-up follows
    os.kill(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT, output[-4000:]
    assert "preemption signal (USR1) before the ranks started: not starting them" in output, output[-4000:]
    assert "exit 75: preempted" in output and not out.exists(), output[-4000:]  # no rank ran preflight


def test_crash_resume_chaos_sigkill_one_rank(tiny_model, demo_data, tmp_path, reference_run):
    """SIGKILL a rank at random steps, relaunch with resume=auto each time: the result is the uninterrupted run.
    Rank 1 dies in the first launch, rank 0 in the resumed one (a resumed run killed and resumed again)."""
    out = tmp_path / "chaos"
    config = reference_config(tiny_model, demo_data, out)
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(4, REF_STEPS - 2), 2))
    killed_at = []
    for i, point in enumerate(kill_points):
        resume = [] if i == 0 else ["train.resume=auto"]
        proc = _start(_launcher_cmd(config, *resume), env={"LOCAL_SIZE": "2"})
        killed_at.append(_wait_for_step(out, point, proc))
        os.kill(_rank_pid(proc.pid, (i + 1) % 2), signal.SIGKILL)  # ranks 1, 0: each rank dies once
        output, _ = proc.communicate(timeout=120)
        print(f"chaos launch {i}: exit {proc.returncode}")
        # DeepSpeed's launcher exits with the code of the first dead rank its 1 s poll finds; the peer, whose
        # collective failed, waits PEER_EXIT_DELAY_S before it exits, so that is the killed rank: -9, passed on as
        # 256 - 9 = 247.
        assert proc.returncode == KILLED_EXIT == 247, output[-4000:]
    print(f"chaos kill points (step seen when killing): {killed_at}")
    assert len(set(killed_at)) == 2
    launch(["train", str(config), "train.resume=auto"])
    assert_same_run(out, reference_run)


# ---- non-finite steps: conftest's non_finite_run serves both tests (and test_train.py's learning-rate check) ------


def trainable_state(step_dir: Path) -> dict:
    """Everything a step changes: the exported adapter, and every tensor of each rank's optimizer shard (fp32 master
    weights, Adam moments and step counts)."""
    state = {f"adapter/{k}": v for k, v in load_file(step_dir / "adapter" / "adapter_model.safetensors").items()}
    shards = sorted(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards
    for shard in shards:
        optim = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for key, value in _tensors(optim):
            state[f"{shard.name}/{key}"] = value
    return state


def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{k}")


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:  # exactly: a skipped update must not touch a single bit
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {(a[k].double() - b[k].double()).abs().max()})"


def test_nan_on_one_rank_skips_the_update_on_all_ranks(non_finite_run):
    out, _ = non_finite_run
    steps = loss_records(out)
    assert math.isnan(steps[3]["loss"]) and steps[3]["skipped"] is True  # NaN, logged as such
    assert [s for s in (1, 2, 3, 4) if steps[s]["skipped"]] == [3]
    assert steps[4]["skipped_steps"] == 1 and math.isfinite(steps[4]["loss"])

    root = out / "checkpoints"
    before, skipped, after = (trainable_state(root / tag_of(s)) for s in (2, 3, 4))
    assert len([k for k in before if k.startswith("adapter/")]) == 36
    assert_same_state(before, skipped, "step 3 was skipped")  # weights and optimizer state of step 2, on every rank
    # Step 4 trained again: every adapter tensor moved (so the comparison above could see an update).
    changed = [k for k in after if k.startswith("adapter/") and not torch.equal(after[k], skipped[k])]
    assert len(changed) == 36
    assert all(bool(t.isfinite().all()) for t in after.values())


def test_too_many_non_finite_steps_stop_with_last_good_checkpoint(non_finite_run):
    out, proc = non_finite_run
    # Every rank raises Diverged at the same step and exits DIVERGED_EXIT after leaving the process group together;
    # DeepSpeed's launcher exits with the code of the first failed rank it sees, the same on both.
    assert proc.returncode == DIVERGED_EXIT == 4, proc.stderr[-4000:]
    assert "3 consecutive steps (up to step 7) had a non-finite loss" in proc.stderr
    records = loss_records(out)
    assert sorted(records) == list(range(1, 8))
    assert [records[s]["skipped"] for s in range(1, 8)] == [False, False, True, False, True, True, True]
    assert records[7]["skipped_steps"] == 4
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-000007"  # saved by the stop: the periodic save comes after it
    assert not (out / "adapter").exists()  # the run did not finish
    # Steps 5-7 changed nothing: every checkpoint from step 4 on holds step 4's weights and optimizer state.
    good = trainable_state(root / tag_of(4))
    assert all(bool(t.isfinite().all()) for t in good.values())
    for step in (5, 6, 7):
        assert_same_state(good, trainable_state(root / tag_of(step)), f"step {step} was skipped")


def child_cmdlines(pid):
    """The command lines of pid's children. run.sh's short-lived helpers exit while we look: a child that is gone or a
    zombie (its cmdline unreadable until reaped) is skipped, as it cannot be the launcher we wait for."""
    lines = []
    for child in psutil.Process(pid).children():
        try:
            lines.append(" ".join(child.cmdline()))
        except psutil.NoSuchProcess:  # ZombieProcess is one
            pass
    return lines


def test_ctrl_c_while_the_ranks_start_checkpoints_and_exits_75(tiny_model, demo_data, tmp_path):
    """Ctrl-C once DeepSpeed's launcher runs but before it has spawned the ranks (it takes seconds): run.sh keeps the
    signal and passes it on every 0.5 s until a rank catches it; the ranks stop after their first step. (Mid-training
    relays: test_sigterm_to_run_sh_..., tests/test_slurm.py.)"""
    # A terminal's Ctrl-C sends SIGINT to run.sh's whole process group. (SIGINT back to its default first: a shell
    # that started this test in the background made it ignored, and bash cannot trap a signal ignored on entry.)
    out = tmp_path / "ctrl_c"
    config = reference_config(tiny_model, demo_data, out)
    proc = subprocess.Popen([str(REPO / "run.sh"), "train", str(config)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOCAL_SIZE": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any("deepspeed" in line for line in child_cmdlines(proc.pid)):
        assert time.time() < deadline and proc.poll() is None, "run.sh started no launcher in 60 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, output[-4000:]
    assert "preemption signal: no rank is up yet; passing it on once one is" in output, output[-4000:]
    stopped = [r for r in read_metrics(out) if "preempted" in r]
    assert len(stopped) == 1 and stopped[0]["step"] == 1, output[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped[0]['step']:06d}"
    assert "[run.sh] exit 75: preempted or interrupted" in output
