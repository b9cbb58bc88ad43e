"""What every rank of every launch pays to start: transformers, peft and DeepSpeed are kept from importing libraries
or modules that are installed but that a run does not use (on a 2-core CPU box: torchvision 1.4 s, scipy.optimize
0.5 s, bitsandbytes with the torch.compile stack it pulls in 1.5 s, DeepSpeed's Muon optimizer 1.1-1.7 s), and
Python's garbage collector runs rarely while the process starts."""

from __future__ import annotations

import gc
import sys
import types

# Python collects its youngest objects every 700 net allocations of container objects (its default). Importing
# torch, DeepSpeed, transformers and boson-multimodal and building the model allocate millions that all live on, and
# each of those collections walks them again: 0.5-0.7 s of a rank's start-up on a 2-core box. Start-up is almost
# free of cyclic garbage, so it collects every 100,000.
START_UP_GC_THRESHOLD = 100_000
DEFAULT_GC_THRESHOLDS = gc.get_threshold()


def collect_garbage_rarely() -> None:
    """For the start-up of a command (imports; train's and bench-train's model and engine): young collections every
    START_UP_GC_THRESHOLD allocations. `collect_garbage_as_usual` ends it before the command's loop."""
    gc.set_threshold(START_UP_GC_THRESHOLD, *DEFAULT_GC_THRESHOLDS[1:])


def collect_garbage_as_usual() -> None:
    """Python's thresholds again: for a training loop, and when a command returns."""
    gc.set_threshold(*DEFAULT_GC_THRESHOLDS)


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_vision_and_detection() -> None:
    """transformers imports torchvision (through its loss and image modules) and scipy.optimize (for its object
    detection losses) whenever they are installed; ds_train processes no images and trains no detector, and
    boson-multimodal installs torchvision without importing it. (Libraries that need scipy, e.g. librosa, import it
    themselves.) Call before transformers' models are imported."""
    from transformers.utils import import_utils

    import_utils._torchvision_available = False
    import_utils._scipy_available = False


def peft_bnb_only_when_loaded() -> None:
    """peft imports bitsandbytes to offer its LoRA layers whenever bitsandbytes is installed (for QLoRA). A model can
    hold bitsandbytes layers only once bitsandbytes has been imported (ds_train.qlora imports it), so peft looks for
    them only then."""
    from peft.tuners.lora import model as lora_model

    lora_model.is_bnb_available = lora_model.is_bnb_4bit_available = lambda: "bitsandbytes" in sys.modules


def muon_only_when_configured(ds_config: dict) -> None:
    """DeepSpeed's optimizers (ZeRO-1/2/3, bf16) import its Muon optimizer module only to ask
    `isinstance(optimizer, MuonWithAuxAdam)`, and that module compiles its kernels with torch.compile when imported
    (inductor's modules: 1.1-1.7 s of CPU a rank on a 2-core box). Unless the DeepSpeed config's optimizer is Muon,
    no Muon object exists in the process, so DeepSpeed gets a stand-in module whose class nothing is an instance of.
    Call before deepspeed.initialize."""
    if "muon" in str(ds_config.get("optimizer", {}).get("type", "")).lower() or MUON_MODULE in sys.modules:
        return
    stand_in = types.ModuleType(MUON_MODULE, "ds_train.lean_imports: no Muon optimizer in this run")
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    sys.modules[MUON_MODULE] = stand_in
