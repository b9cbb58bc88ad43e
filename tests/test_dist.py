"""ds_train/dist.py: one device binding for every process group.

There is no GPU here: these tests mock the CUDA calls (torch.cuda.is_available / set_device / current_device) and
DeepSpeed's process-group start, and nothing else. They record the order in which a subcommand binds its device,
starts the process group and runs a collective; the real code paths run up to the process group's start."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO, base_config, write_config

LOCAL_RANK = 3


class _GroupStarted(Exception):
    """Raised by the mocked deepspeed.init_distributed: the entry path has reached the process group."""


@pytest.fixture
def fake_gpu_rank(monkeypatch):
    """Rank 1 of 8, local rank 3, on a mocked GPU machine; returns the list of recorded events."""
    import deepspeed
    import torch
    import torch.distributed

    events = []
    bound = {"device": 0}

    def set_device(index):
        bound["device"] = int(index)
        events.append(("set_device", int(index)))

    def init_distributed(*args, **kwargs):
        events.append(("init_process_group", bound["device"]))
        raise _GroupStarted

    def collective(name):
        def record(*args, **kwargs):
            events.append((name, bound["device"]))
            raise AssertionError(f"{name} ran before the process group started")
        return record

    for key, value in {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": str(LOCAL_RANK), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: bound["device"])
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    for name in ("all_gather_object", "broadcast_object_list", "all_reduce", "barrier", "init_process_group"):
        monkeypatch.setattr(torch.distributed, name, collective(name))
    return events


def test_init_distributed_binds_the_local_rank_before_the_group_starts(fake_gpu_rank):
    from ds_train import dist

    with pytest.raises(_GroupStarted):
        dist.init_distributed()
    assert fake_gpu_rank == [("set_device", LOCAL_RANK), ("init_process_group", LOCAL_RANK)]
    assert dist.device().index == LOCAL_RANK


def launched_subcommands() -> list[str]:
    """The ds-train subcommands run.sh starts on every rank under the deepspeed launcher (its `launch` case)."""
    text = (REPO / "run.sh").read_text()
    m = re.search(r"^\s*([a-z|-]+)\)\n(?:.*\n){0,4}?.*launch \"\$cmd\"", text, re.M)
    assert m, "run.sh: the case that launches ranks (`launch \"$cmd\"`) not found"
    return m.group(1).split("|")


def test_the_launched_subcommands_are_cli_commands():
    from ds_train.cli import COMMANDS

    assert sorted(launched_subcommands()) == ["bench-train", "make-pairs", "prepare", "train"]
    assert set(launched_subcommands()) <= set(COMMANDS)


@pytest.mark.parametrize("cmd", launched_subcommands())
def test_every_launched_subcommand_binds_its_gpu_before_the_process_group(cmd, fake_gpu_rank, tiny_model, demo_data,
                                                                         tmp_path):
    """Each subcommand's real entry path (config, preflight, DeepSpeed config) up to the process group: the rank's
    GPU is bound first, and no collective runs before it."""
    from ds_train.cli import COMMANDS

    config = write_config(tmp_path / "c.yaml", base_config(tiny_model, demo_data, tmp_path / "out"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "hello there"}\n')
    words = [str(config)] + {"bench-train": ["--synthetic", "64"],
                             "make-pairs": ["--prompts", str(prompts), "--candidates", "2", "--out",
                                            str(tmp_path / "pairs")]}.get(cmd, [])
    with pytest.raises(_GroupStarted):
        COMMANDS[cmd](words)
    assert fake_gpu_rank == [("set_device", LOCAL_RANK), ("init_process_group", LOCAL_RANK)], cmd


def _calls(tree: ast.AST) -> list[str]:
    """Dotted names of the functions a module calls (`torch.cuda.set_device`, `dist.init_distributed`, ...)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            out.append(".".join(reversed(parts)))
    return out


def test_only_dist_binds_devices_and_starts_process_groups():
    """Binding and process-group starts live in ds_train/dist.py alone; every other module goes through
    dist.init_distributed, and each module that does is an entry path tested above (or a launched script)."""
    sources = sorted((REPO / "ds_train").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    own = {"set_device", "init_process_group", "init_distributed"}
    callers, strays = set(), []
    for path in sources:
        rel = str(path.relative_to(REPO))
        for name in _calls(ast.parse(path.read_text(), rel)):
            last = name.rsplit(".", 1)[-1]
            if last not in own or rel == "ds_train/dist.py":
                continue
            if name == "dist.init_distributed":
                callers.add(rel)
            else:
                strays.append(f"{rel}: {name}")
    assert strays == []
    # A new caller is a new entry point: drive it in the test above (or add it here, if it is a script).
    assert callers == {"ds_train/cli.py", "ds_train/train.py", "ds_train/bench/train.py", "ds_train/make_pairs.py",
                       "scripts/bench_build.py"}


def test_object_collectives_use_the_bound_device(monkeypatch):
    """Under NCCL the object collectives move their pickles to this rank's GPU (mocked: no GPU, no NCCL here)."""
    import torch
    import torch.distributed

    from ds_train import dist

    seen = {}
    monkeypatch.setenv("LOCAL_RANK", str(LOCAL_RANK))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.distributed, "broadcast_object_list",
                        lambda box, src=None, group=None, device=None, group_src=None: seen.update(device=device))
    assert dist.broadcast_object("x") == "x"
    assert seen["device"] == torch.device("cuda", LOCAL_RANK)
