"""ds_train.lean_imports: modules a rank is kept from importing, and the runs that still get them."""

import sys

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
