"""Two hosts on this machine (network namespaces + veth + sshd each, see scripts/MULTIHOST.md) and the real
`./run.sh train ... --hostfile FILE` path: deepspeed --hostfile over ssh (pdsh), 2 nodes x 1 process, ZeRO-3, gloo.
Nothing is mocked; the test skips only when the machine cannot host the harness (the harness says why: a missing
tool, which it never installs itself (.ci/run does, as root), no root, no namespaces)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, base_config, losses, write_config

pytestmark = [pytest.mark.slow, pytest.mark.multihost]
HARNESS = REPO / "scripts" / "multihost.sh"


def test_two_hosts_hostfile_launch(tiny_model, demo_data, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 4, "epochs": 2},
                      data={"train_file": str(demo_data / "train.jsonl"), "cache_dir": str(tmp_path / "cache")})
    config = write_config(tmp_path / "mh.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "LOCAL_SIZE")}
    cmd = [str(HARNESS), "run", "--", "bash", "-c",
           f'./run.sh train "{config}" --hostfile "$DS_HOSTFILE" --master_port 29633']
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the harness tears its hosts down on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"multi-host run timed out\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        subprocess.run([str(HARNESS), "down"], cwd=REPO, capture_output=True, timeout=120)
    if proc.returncode == 77 and "MULTIHOST_SKIP:" in stderr:
        pytest.skip(stderr.split("MULTIHOST_SKIP:", 1)[1].strip().splitlines()[0])
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{stdout[-5000:]}\n--- stderr\n{stderr[-5000:]}"
    print(f"multi-host run wall time: {time.time() - t0:.1f}s")

    assert "--hostfile" in stderr and "--launcher pdsh" in stderr
    assert len(losses(out)) == 4
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 36 and all(t.numel() > 0 for t in adapter.values())  # A and B of the 18 default targets
    # Both hosts' ranks wrote their shards of the final checkpoint.
    step = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.glob("rng-rank*.pt")) == ["rng-rank00000.pt", "rng-rank00001.pt"]
    # This run's hosts are gone (another test's harness may be up meanwhile: tests/test_slurm.py).
    name = re.search(r"up: (dst\S+) on ", stderr).group(1)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_harness_installs_nothing_and_names_the_missing_tool(tmp_path):
    # A PATH without pdsh (every other command of the machine's PATH is linked in) and with an apt-get that records
    # its calls: the harness must skip naming pdsh, and never call apt-get.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f not in ("pdsh", "apt-get") and not (bin_dir / f).exists() and shutil.which(f, path=d):
                    (bin_dir / f).symlink_to(os.path.join(d, f))
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'apt-calls'}\n")
    (bin_dir / "apt-get").chmod(0o755)
    proc = subprocess.run([str(HARNESS), "run", "--", "true"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(bin_dir)})
    assert proc.returncode == 77, proc.stderr
    reason = proc.stderr.split("MULTIHOST_SKIP:", 1)[1].strip().splitlines()[0]
    assert "pdsh" in reason.removeprefix("missing tool(s): ").split(" (")[0].split(), reason
    assert "apt-get install --no-install-recommends" in reason and ".ci/run installs them" in reason
    assert not (tmp_path / "apt-calls").exists()
