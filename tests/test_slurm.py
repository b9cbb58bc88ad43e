"""SLURM for real: a two-node SLURM cluster on this machine (`scripts/multihost.sh up --slurm`: munged + slurmctld
here, one slurmd in each of the two network-namespace hosts, see scripts/MULTIHOST.md) and the README's batch script
(scripts/train.sbatch, CPU-adapted: no --gres) submitted with sbatch. One cluster serves every test of the module.
Nothing is mocked; the tests skip only when the machine cannot host the harness (it says why: a missing tool, no
root, no namespaces)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REF_STEPS, REPO, assert_same_run, read_metrics, reference_config

pytestmark = [pytest.mark.slow, pytest.mark.multihost]
HARNESS = REPO / "scripts" / "multihost.sh"
SBATCH_SCRIPT = REPO / "scripts" / "train.sbatch"
PREEMPTED = 75


class Cluster:
    def __init__(self, name: str, env_sh: str, root: Path):
        self.name, self.env_sh, self.root = name, env_sh, root

    def sh(self, cmd: str, timeout: float = 60) -> str:
        """`cmd` in bash with the cluster's environment (SLURM_CONF, the ssh wrapper on PATH)."""
        proc = subprocess.run(["bash", "-c", f"source {self.env_sh} && {cmd}"], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def submit(self, config: Path, name: str, env: str = "") -> tuple[int, Path]:
        """sbatch the README's script, CPU-adapted (no GPUs to ask for), on CONFIG; returns the job id and log.
        `env`: VAR=VALUE ... for sbatch, which passes its environment to the job."""
        script = self.root / f"{name}.sbatch"
        script.write_text(SBATCH_SCRIPT.read_text().replace(" --gres=gpu:8 --cpus-per-task=64", ""))
        log = self.root / f"{name}.out"
        job = self.sh(f"{env} sbatch --parsable -N2 --chdir={REPO} --output={log} {script} {config}").strip()
        return int(job.split(";")[0]), log

    def job(self, job: int) -> dict[str, str]:
        out = self.sh(f"scontrol show job {job}")
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: int, log: Path, timeout: float = 420) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job)
            if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
                return info
            time.sleep(1)
        self.sh(f"scancel {job}")
        pytest.fail(f"job {job} not done in {timeout}s: {info}\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-6000:] if log.exists() else "(no log)"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # `run` (not `up`): the harness process owns the instance while the tests use it, so a concurrent
    # `scripts/multihost.sh down` (test_multihost.py's cleanup) leaves it alone; SIGTERM to it tears everything down.
    proc = subprocess.Popen([str(HARNESS), "run", "--slurm", "--", "bash", "-c",
                             'echo "READY $MULTIHOST_NAME $MULTIHOST_WORKDIR/env.sh"; exec sleep 3600'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        while not line.startswith("READY") and proc.poll() is None:
            line = proc.stdout.readline()
        if not line.startswith("READY"):
            stderr = proc.stderr.read()
            if proc.returncode == 77 and "MULTIHOST_SKIP:" in stderr:
                pytest.skip(stderr.split("MULTIHOST_SKIP:", 1)[1].strip().splitlines()[0])
            pytest.fail(f"harness exit {proc.returncode}\n{stderr}")
        _, name, env_sh = line.split()
        yield Cluster(name, env_sh, tmp_path_factory.mktemp("slurm"))
    finally:
        if proc.poll() is None:
            proc.terminate()
        stderr = proc.communicate(timeout=120)[1]
        subprocess.run([str(HARNESS), "down"], cwd=REPO, capture_output=True, timeout=120)  # after a killed run
    assert "ERROR" not in stderr, stderr
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not subprocess.run(["pgrep", "-f", f"{name}.multihost/slurm"], capture_output=True).stdout, \
        "slurmctld or munged left running"


def _wait_for_step(out: Path, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step and "loss" in r
                                                     for r in read_metrics(out)):
            return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached in {timeout}s\n{_tail(log)}")


def _stopped_at(out: Path, text: str) -> int:
    stopped = [r for r in read_metrics(out) if "preempted" in r]
    # Every rank gets USR1; rank 0 (which writes the record) says "peer" when another rank's arrived first.
    assert len(stopped) == 1 and stopped[0]["preempted"] in ("SIGUSR1", "peer"), text[-6000:]
    return stopped[0]["step"]


def _requeued_and_resumed(cluster: Cluster, job: int, log: Path, out: Path) -> tuple[str, int]:
    """Wait for the requeued job to finish; check the one preemption, its exit 75 and the resume from its step."""
    info = cluster.wait(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    step = _stopped_at(out, text)
    assert f"exit {PREEMPTED}: preempted" in text and f"resumed from {out}/checkpoints/step-{step:06d}" in text, \
        text[-6000:]
    return text, step


def _preempt_requeue_resume(cluster: Cluster, config: Path, out: Path, name: str) -> str:
    """Submit, signal the batch shell as SLURM's preemption warning does, wait for the requeued job to finish."""
    job, log = cluster.submit(config, name)
    _wait_for_step(out, 4, log)
    cluster.sh(f"scancel --batch --signal=USR1 {job}")
    text, step = _requeued_and_resumed(cluster, job, log, out)
    assert 4 <= step < REF_STEPS, step
    return text


def test_sbatch_two_nodes_trains_as_one_node(cluster, tiny_model, demo_data, reference_run, tmp_path):
    """run.sh writes the hostfile from the allocation (2 nodes x 1 task), launches over ssh (pdsh), and the 2 ranks
    on 2 nodes train exactly as 2 ranks on one node (reference_run)."""
    out = tmp_path / "run"
    t0 = time.time()
    job, log = cluster.submit(reference_config(tiny_model, demo_data, out), "plain")
    info = cluster.wait(job, log)
    print(f"sbatch run: {time.time() - t0:.1f}s")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{text[-6000:]}"
    assert "from SLURM_JOB_NODELIST (2 nodes x 1 slots)" in text and "--launcher pdsh" in text, text[:3000]
    assert f"{cluster.name}-host1: " in text  # the launcher's per-host output prefix: a rank ran on the 2nd node
    assert_same_run(out, reference_run)


def test_time_limit_warning_requeues_and_resumes_exactly(cluster, tiny_model, demo_data, reference_run, tmp_path):
    """The script's `--signal=B:USR1@120` reached by the time limit, no manual signal: once step 4 is logged the job's
    limit is cut to end 60-120 s later (`scontrol update TimeLimit`); slurmctld's next time-limit check (every 30 s,
    PERIODIC_TIMEOUT) finds the end within 120 + 30 s and sends USR1 to the batch shell. Every rank checkpoints at
    the next step boundary, run.sh exits 75, the script requeues the job, and the requeued job resumes
    (train.resume=auto_or_fresh) to the uninterrupted run's result. The ranks hold after step 4 until the signal
    (DS_TRAIN_FAULT=hold:4: training outlasts the wait for the check); the limit is lifted again once the
    checkpoint is saved, or the requeued job, with a 2-minute limit, would be warned again."""
    out = tmp_path / "run"
    t0 = time.time()
    job, log = cluster.submit(reference_config(tiny_model, demo_data, out), "timelimit", env="DS_TRAIN_FAULT=hold:4")
    _wait_for_step(out, 4, log)
    hours, minutes, seconds = (int(v) for v in cluster.job(job)["RunTime"].split(":"))  # H:MM:SS (under a day)
    elapsed = 3600 * hours + 60 * minutes + seconds
    cluster.sh(f"scontrol update JobId={job} TimeLimit={elapsed // 60 + 2}")  # whole minutes: ends in 60-120 s
    t_cut = time.time()
    deadline = t_cut + 60
    while not any("preempted" in r for r in read_metrics(out)):
        assert time.time() < deadline, f"no time-limit warning 60 s after the cut\n{_tail(log)}"
        time.sleep(0.1)
    print(f"time-limit warning acted on {time.time() - t_cut:.1f}s after the cut")
    cluster.sh(f"scontrol update JobId={job} TimeLimit=UNLIMITED")
    text, step = _requeued_and_resumed(cluster, job, log, out)
    print(f"time limit + requeue: {time.time() - t0:.1f}s")
    assert step == 4, step  # held there until the warning: nothing else could have stopped it
    assert "--launcher pdsh" in text and "USR1 to the ranks on" in text, text[:3000]
    assert "DUE TO TIME LIMIT" not in text, text[-3000:]  # warned ahead, never killed by the limit
    assert_same_run(out, reference_run)


def test_without_ssh_srun_launches_preempts_and_resumes(cluster, tiny_model, demo_data, reference_run, tmp_path):
    """Compute nodes that cannot ssh to each other (sshd stopped on both hosts): run.sh finds ssh failing and starts
    one run.sh per node with srun; preemption and requeue work the same. Runs last: it stops the cluster's sshd."""
    cluster.sh(f"{HARNESS} stop-ssh {cluster.name}")
    out = tmp_path / "run"
    t0 = time.time()
    text = _preempt_requeue_resume(cluster, reference_config(tiny_model, demo_data, out), out, "nossh")
    print(f"srun preempt + requeue: {time.time() - t0:.1f}s")
    assert f"ssh to {cluster.name}-host0 failed: launching with srun" in text, text[:3000]
    assert "--launcher pdsh" not in text and "--no_ssh --node_rank 1" in text, text[:3000]
    assert_same_run(out, reference_run)


def test_readme_shows_the_tested_batch_script():
    readme = (REPO / "README.md").read_text()
    assert SBATCH_SCRIPT.read_text() in readme, "README's sbatch script differs from scripts/train.sbatch"
