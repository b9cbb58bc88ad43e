"""ds_train.lean_imports: modules a rank is kept from importing, the runs that still get them, and how often a
command collects garbage while it starts."""

import sys

import pytest
import torch

from ds_train.lean_imports import MUON_MODULE, muon_only_when_configured

MUON_KERNELS = "deepspeed.runtime.zero.muon.original_muon"  # the module that runs torch.compile when imported


def test_deepspeed_asks_about_muon_without_compiling_its_kernels(monkeypatch):
    for name in (MUON_MODULE, MUON_KERNELS):  # restored after the test, whatever imported them before
        monkeypatch.delitem(sys.modules, name, raising=False)
    muon_only_when_configured({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    # What DeepSpeed's ZeRO and bf16 optimizers run (runtime/zero/stage3.py, stage_1_and_2.py, utils.py).
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), MuonWithAuxAdam)
    assert MUON_KERNELS not in sys.modules


def test_a_run_whose_deepspeed_config_picks_muon_gets_deepspeeds_muon(monkeypatch):
    monkeypatch.delitem(sys.modules, MUON_MODULE, raising=False)
    muon_only_when_configured({"optimizer": {"type": "Muon", "params": {}}})
    assert MUON_MODULE not in sys.modules  # left for DeepSpeed to import


def test_a_command_starts_with_rare_collections_and_returns_pythons_thresholds(monkeypatch):
    """torch and the libraries load with young collections every START_UP_GC_THRESHOLD allocations; train (and
    bench-train) keep it until they have set up, any other command goes to its work with Python's thresholds."""
    import gc

    from ds_train import cli
    from ds_train.lean_imports import START_UP_GC_THRESHOLD

    before, seen = gc.get_threshold(), {}
    assert before == (700, 10, 10)  # Python's own
    for cmd in ("bench-train", "prepare"):  # (train would also install its preemption handlers in this process)
        monkeypatch.setitem(cli.COMMANDS, cmd, lambda words, cmd=cmd: seen.setdefault(cmd, gc.get_threshold()))
        assert cli.main([cmd, "somewhere.yaml"]) == 0
        assert gc.get_threshold() == before  # restored on return
    assert seen == {"bench-train": (START_UP_GC_THRESHOLD, 10, 10), "prepare": before}
    monkeypatch.setitem(cli.COMMANDS, "bench-train", lambda words: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["bench-train", "somewhere.yaml"])
    assert gc.get_threshold() == before
