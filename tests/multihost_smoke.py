"""Smoke test for the two-host harness (scripts/multihost.sh).

Not a pytest module (no test_ prefix): it is the user script that DeepSpeed's
multi-node launcher starts on every "host", e.g.

    scripts/multihost.sh run -- bash -c 'deepspeed --hostfile "$DS_HOSTFILE" \
        --launcher pdsh --master_port 29611 tests/multihost_smoke.py --out /tmp/mh_out'

Every rank joins a gloo process group (env:// rendezvous set up by the
launcher), all-reduces a tensor and all-gathers a description of where it runs
(hostname, network namespace, interface address). Rank 0 checks the results
and writes OUT/ok.json. Exits non-zero on any mismatch so the launcher, and
the harness, report failure.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import socket
import struct
import sys


def interface_ipv4(ifname: str | None) -> str | None:
    """IPv4 address of ifname via SIOCGIFADDR, or None."""
    if not ifname:
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def netns_id() -> str:
    """Identity of this process's network namespace (e.g. 'net:[4026532290]')."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "unknown"


def describe(rank: int) -> dict:
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    return {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
        "hostname": socket.gethostname(),
        "netns": netns_id(),
        "gloo_socket_ifname": ifname,
        "ifname_ipv4": interface_ipv4(ifname),
        "multihost_name": os.environ.get("MULTIHOST_NAME"),
        "multihost_host_index": os.environ.get("MULTIHOST_HOST_INDEX"),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "pid": os.getpid(),
        "python": sys.executable,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for ok.json (rank 0 writes it)")
    parser.add_argument("--expect-world-size", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="rendezvous / collective timeout")
    # The DeepSpeed launcher appends --local_rank=N; accept and ignore it.
    args, _unknown = parser.parse_known_args()

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()

    # Sum of (rank + 1) over all ranks must be world * (world + 1) / 2.
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    expected = world * (world + 1) / 2

    infos: list = [None] * world
    dist.all_gather_object(infos, describe(rank))
    dist.barrier()

    errors = []
    if t.item() != expected:
        errors.append(f"all_reduce gave {t.item()}, expected {expected}")
    if args.expect_world_size is not None and world != args.expect_world_size:
        errors.append(f"world size {world}, expected {args.expect_world_size}")

    if rank == 0:
        report = {
            "ok": not errors,
            "errors": errors,
            "world_size": world,
            "all_reduce_sum": t.item(),
            "expected_sum": expected,
            "distinct_hostnames": len({i["hostname"] for i in infos}),
            "distinct_netns": len({i["netns"] for i in infos}),
            "ranks": infos,
        }
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "ok.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        print(f"[multihost_smoke] wrote {path}: world_size={world} sum={t.item()}", flush=True)

    dist.destroy_process_group()
    if errors:
        print(f"[multihost_smoke] rank {rank}: " + "; ".join(errors), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
