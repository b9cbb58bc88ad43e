"""Preemption, non-finite steps, crash-resume chaos: 2 real ranks under the real launcher, faults injected from
outside (signals, SIGKILL) or through DS_TRAIN_FAULT (ds_train/faults.py) for a NaN loss."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import REPO, base_config, free_port, launch, losses, read_metrics, write_config

pytestmark = pytest.mark.slow
STEPS = 24


def _config(tiny_model, demo_data, tmp_path, out, **sections):
    defaults = dict(train={"max_steps": STEPS, "epochs": 99}, checkpoint={"every_steps": 3, "keep_last": 20},
                    optim={"lr": 0.005, "scheduler": "cosine", "warmup_steps": 3})
    for k, v in sections.items():
        defaults.setdefault(k, {}).update(v)
    return write_config(tmp_path / f"{out.name}.yaml", base_config(tiny_model, demo_data, out, **defaults))


@pytest.fixture(scope="module")
def reference(tiny_model, demo_data, tmp_path_factory):
    """One uninterrupted run everything else must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "ref"
    launch(["train", str(_config(tiny_model, demo_data, tmp, out))])
    return out


def _adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_run(out: Path, reference: Path):
    """Same steps, each once, same losses, bit-equal final adapter."""
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    got, want = _adapter(out), _adapter(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert bool((got[k] == want[k]).all()), k


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


def test_sigterm_to_run_sh_checkpoints_exits_75_and_resumes_exactly(tiny_model, demo_data, tmp_path, reference):
    out = tmp_path / "preempt"
    config = _config(tiny_model, demo_data, tmp_path, out)
    proc = _start([str(REPO / "run.sh"), "train", str(config)], env={"LOCAL_SIZE": "2"})
    _wait_for_step(out, 5, proc)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)  # run.sh is the launcher the user (or SLURM) signals
    output, _ = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    print(f"SIGTERM-to-exit: {elapsed:.1f}s")
    assert proc.returncode == 75, output[-4000:]
    assert elapsed < 30
    stopped = [r for r in read_metrics(out) if "preempted" in r]
    assert len(stopped) == 1 and stopped[0]["preempted"] == "SIGUSR1"
    step = stopped[0]["step"]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:06d}"
    assert 5 <= step < STEPS

    launch(["train", str(config), "train.resume=auto"])
    assert_same_run(out, reference)


def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tiny_model, demo_data, tmp_path):
    out = tmp_path / "rank_signal"
    config = _config(tiny_model, demo_data, tmp_path, out)
    proc = _start(_launcher_cmd(config), env={"LOCAL_SIZE": "2"})
    _wait_for_step(out, 4, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # only rank 1 hears it; rank 0 learns at the step boundary
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-4000:]
    step = [r for r in read_metrics(out) if "preempted" in r][0]["step"]
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank00000.pt", "rng-rank00001.pt"]


def test_crash_resume_chaos_sigkill_one_rank(tiny_model, demo_data, tmp_path, reference):
    """SIGKILL a rank at random steps, relaunch with resume=auto each time: the result is the uninterrupted run."""
    out = tmp_path / "chaos"
    config = _config(tiny_model, demo_data, tmp_path, out)
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(4, STEPS - 2), 3))
    killed_at = []
    for i, point in enumerate(kill_points):
        resume = [] if i == 0 else ["train.resume=auto"]
        proc = _start(_launcher_cmd(config, *resume), env={"LOCAL_SIZE": "2"})
        killed_at.append(_wait_for_step(out, point, proc))
        os.kill(_rank_pid(proc.pid, rng.choice([0, 1])), signal.SIGKILL)
        proc.communicate(timeout=120)
        assert proc.returncode != 0
    print(f"chaos kill points (step seen when killing): {killed_at}")
    assert len(set(killed_at)) == 3
    launch(["train", str(config), "train.resume=auto"])
    assert_same_run(out, reference)


def test_nan_on_one_rank_skips_the_update_on_all_ranks(tiny_model, demo_data, tmp_path):
    out = tmp_path / "nan"
    config = _config(tiny_model, demo_data, tmp_path, out, train={"max_steps": 6})
    launch(["train", str(config)], env={"DS_TRAIN_FAULT": "nan_loss:3:1"})
    steps = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert steps[3]["skipped"] is True and steps[3]["loss"] != steps[3]["loss"]  # NaN, logged as such
    assert [s for s, r in steps.items() if r["skipped"]] == [3]
    assert steps[6]["skipped_steps"] == 1 and steps[6]["loss"] == steps[6]["loss"]
    assert all(bool(t.isfinite().all()) for t in _adapter(out).values())


def test_too_many_non_finite_steps_stop_with_last_good_checkpoint(tiny_model, demo_data, tmp_path):
    out = tmp_path / "diverge"
    config = _config(tiny_model, demo_data, tmp_path, out, train={"max_steps": 12, "max_consecutive_skips": 3},
                     checkpoint={"every_steps": 100})
    faults = ",".join(f"nan_loss:{s}" for s in range(3, 13))
    proc = launch(["train", str(config)], env={"DS_TRAIN_FAULT": faults}, check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps (up to step 5) had a non-finite loss" in proc.stderr + proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step-000005"
    good = load_file(out / "checkpoints" / "step-000005" / "adapter" / "adapter_model.safetensors")
    assert all(bool(t.isfinite().all()) for t in good.values())
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["skipped"] for r in records] == [False, False, True, True, True]


def test_ctrl_c_checkpoints_and_exits_75(tiny_model, demo_data, tmp_path):
    # A terminal's Ctrl-C sends SIGINT to run.sh's whole process group. (SIGINT back to its default first: a shell
    # that started this test in the background made it ignored, and bash cannot trap a signal ignored on entry.)
    out = tmp_path / "ctrl_c"
    config = _config(tiny_model, demo_data, tmp_path, out)
    proc = subprocess.Popen([str(REPO / "run.sh"), "train", str(config)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOCAL_SIZE": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-4000:]
    stopped = [r for r in read_metrics(out) if "preempted" in r]
    assert len(stopped) == 1, output[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped[0]['step']:06d}"
    assert "[run.sh] exit 75: preempted or interrupted" in output
