"""Helpers run.sh calls around the `deepspeed` launcher (python -m ds_train.launch ...)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+)\s+slots=(?P<slots>[1-9][0-9]*)\s*$")
# Settings every rank on every host should share. Credentials are deliberately absent (use `wandb login` on the
# nodes: a key written into an env file would sit on disk in the working directory), and so are interface names
# (GLOO/NCCL_SOCKET_IFNAME), which differ from host to host.
PROPAGATE = ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PYTORCH_CUDA_ALLOC_CONF",
             "TOKENIZERS_PARALLELISM", "NCCL_IB_DISABLE", "NCCL_DEBUG",
             "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "HF_HOME", "HF_HUB_OFFLINE", "PATH",
             "DS_TRAIN_FAULT")  # the tests' fault injection (ds_train/faults.py), on every host


class HostfileError(ValueError):
    pass


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """`host slots=N` per line; '#' comments and blank lines allowed. Errors name the line."""
    hosts, seen = [], set()
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOST_LINE.match(line)
        if not m:
            raise HostfileError(f"{path}:{lineno}: expected 'HOSTNAME slots=N' (N >= 1), got {raw.strip()!r}")
        if m["host"] in seen:
            raise HostfileError(f"{path}:{lineno}: host {m['host']} is listed twice")
        seen.add(m["host"])
        hosts.append((m["host"], int(m["slots"])))
    if not hosts:
        raise HostfileError(f"{path}: no hosts (expected lines like 'node001 slots=8')")
    return hosts


def write_env(path: str = ".deepspeed_env") -> None:
    """The env file DeepSpeed's multi-node launchers export on every host (never empty: its parser splits
    every line on '=')."""
    lines = [f"{k}={os.environ[k]}" for k in PROPAGATE if os.environ.get(k)]
    if lines:
        Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "check-hostfile":
            parse_hostfile(args[0])
        elif cmd == "write-env":
            write_env(*args)
        else:
            print(f"unknown launch helper {cmd}", file=sys.stderr)
            return 2
    except HostfileError as e:
        print(f"hostfile error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
