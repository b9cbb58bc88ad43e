"""ds_train/export.py consolidate: ZeRO-3 shards of a real 2-rank run -> PEFT adapter dir, offline, in this process.

The run trains LoRA on the attention projections and the DualFFN audio_mlp fully (model.train_audio_mlp), so the
output has both files: adapter_model.safetensors and base_trainable.safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import audio_mlp_config, launch
from ds_train.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE
from ds_train.checkpoint import META
from ds_train.errors import CheckpointError
from ds_train.export import consolidate

@pytest.fixture(scope="module")
def run(audio_mlp_run) -> Path:
    """OUTPUT_DIR of a 3-step run with checkpoints step-000002 and step-000003 (= latest)."""
    return audio_mlp_run


def zero_to_fp32(root: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)


def read_output(out: Path) -> dict:
    """Output tensors under their parameter names in the trained (PEFT-wrapped) model."""
    tensors = {}
    for key, t in load_file(out / ADAPTER_WEIGHTS).items():
        tensors[key.replace(".weight", ".default.weight")] = t
    for key, t in load_file(out / BASE_TRAINABLE).items():
        tensors["base_model.model." + key] = t
    return tensors


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["step-000002", "step-000003"])
def test_equals_zero_to_fp32_bit_for_bit(run, tmp_path, tag):
    root = run / "checkpoints"
    out = consolidate(root, tmp_path / "adapter", tag=tag)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_TRAINABLE]
    got, want = read_output(out), zero_to_fp32(root, tag)
    assert got.keys() == want.keys()
    assert len(want) == 4 * 3 * 2 + 3 * 2  # LoRA A/B of q/k/v/o in 3 layers; audio_mlp gate/up/down in 2 layers
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
    # The same tensors the training run exported at that step through safe_get_full_fp32_param.
    for file in (ADAPTER_WEIGHTS, BASE_TRAINABLE):
        exported, ours = load_file(root / tag / "adapter" / file), load_file(out / file)
        assert exported.keys() == ours.keys() and all(torch.equal(exported[k], ours[k]) for k in ours)


@pytest.mark.slow
def test_checkpoints_differ(run, tmp_path):
    # Guards the test above against comparing two copies of the initial weights.
    a = read_output(consolidate(run / "checkpoints", tmp_path / "a", tag="step-000002"))
    b = read_output(consolidate(run / "checkpoints", tmp_path / "b", tag="step-000003"))
    assert all(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_output_loads_with_peft(run, tiny_model, tmp_path):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    out = consolidate(run / "checkpoints", tmp_path / "adapter")
    base = HiggsAudioModel.from_pretrained(str(tiny_model))
    trained_mlp = load_file(out / BASE_TRAINABLE)
    missing, unexpected = base.load_state_dict(trained_mlp, strict=False)
    assert not unexpected and all(".audio_mlp." in k for k in trained_mlp)
    model = PeftModel.from_pretrained(base, str(out))
    saved, loaded = load_file(out / ADAPTER_WEIGHTS), get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")


@pytest.mark.slow
def test_accepts_step_dir_output_dir_and_latest(run, tmp_path):
    root = run / "checkpoints"
    outs = [consolidate(root / "step-000003", tmp_path / "a"), consolidate(root, tmp_path / "b"),
            consolidate(run, tmp_path / "c"), consolidate(root, tmp_path / "d", tag="step-000003")]
    first = read_output(outs[0])
    for out in outs[1:]:
        other = read_output(out)
        assert all(torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(CheckpointError, match="no checkpoint step-000001 .*available: step-000002, step-000003"):
        consolidate(root, tmp_path / "e", tag="step-000001")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_needs_no_base_model(tiny_model, demo_data, tmp_path):
    # The run's base model dir is gone while consolidating: nothing of it is read. The run trains on its own copy of
    # the base: the session's tiny model is read by other tests meanwhile (./run.sh test runs two files at a time).
    base = shutil.copytree(tiny_model, tmp_path / "base")
    run = tmp_path / "run"
    launch(["train", str(audio_mlp_config(base, demo_data, run, train={"max_steps": 1}))])  # both output files
    shutil.rmtree(base)
    out = consolidate(run / "checkpoints", tmp_path / "adapter")
    assert read_output(out).keys() == zero_to_fp32(run / "checkpoints", "step-000001").keys()


@pytest.mark.slow
def test_rebuilds_adapter_config_from_saved_run_config(run, tmp_path):
    step = shutil.copytree(run / "checkpoints" / "step-000003", tmp_path / "step-000003")
    exported = json.loads((step / "adapter" / ADAPTER_CONFIG).read_text())
    shutil.rmtree(step / "adapter")
    out = consolidate(step, tmp_path / "adapter")
    rebuilt = json.loads((out / ADAPTER_CONFIG).read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "peft_type"):
        assert rebuilt[key] == exported[key], key


def damage_missing_optim(step: Path) -> str:
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return r"zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"


def damage_truncated_model_states(step: Path) -> str:
    f = step / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    os.truncate(f, f.stat().st_size // 2)
    return r"zero_pp_rank_0_mp_rank_00_model_states.pt: unreadable .*truncated or corrupt"


def damage_garbled_optim(step: Path) -> str:
    f = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(b"\0" * f.stat().st_size)
    return r"zero_pp_rank_0_mp_rank_00_optim_states.pt: unreadable"


def damage_two_at_once(step: Path) -> str:
    damage_missing_optim(step)
    damage_truncated_model_states(step)
    return (r"(?s)(?=.*zero_pp_rank_0_mp_rank_00_model_states.pt: unreadable)"
            r"(?=.*zero_pp_rank_1_mp_rank_00_optim_states.pt: missing)")


def damage_more_ranks_in_meta(step: Path) -> str:
    meta = json.loads((step / META).read_text())
    (step / META).write_text(json.dumps({**meta, "world_size": 3}))
    return (r"(?s)(?=.*\(3 ranks\))(?=.*zero_pp_rank_2_mp_rank_00_model_states.pt: missing)"
            r"(?=.*zero_pp_rank_0_mp_rank_00_optim_states.pt: written by 2 ranks, ds_train_meta.json says 3)")


def damage_fewer_ranks_in_meta(step: Path) -> str:
    meta = json.loads((step / META).read_text())
    (step / META).write_text(json.dumps({**meta, "world_size": 1}))
    return r"files of ranks beyond the 1 in ds_train_meta.json: zero_pp_rank_1_mp_rank_00_model_states.pt"


def damage_incomplete_save(step: Path) -> str:
    (step / META).unlink()
    return r"not a complete ds_train checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [damage_missing_optim, damage_truncated_model_states, damage_garbled_optim,
                                    damage_two_at_once, damage_more_ranks_in_meta, damage_fewer_ranks_in_meta,
                                    damage_incomplete_save])
def test_damaged_checkpoint_is_named_and_leaves_no_output(run, tmp_path, damage):
    step = shutil.copytree(run / "checkpoints" / "step-000003", tmp_path / "ckpt" / "step-000003")
    message = damage(step)
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(CheckpointError, match=message):
        consolidate(step, parent / "adapter")
    assert list(parent.iterdir()) == []


@pytest.mark.slow
def test_output_dir_rules(run, tmp_path):
    # Someone else's dir is never replaced; an earlier adapter output is.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        consolidate(run / "checkpoints", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = consolidate(run / "checkpoints", tmp_path / "adapter", tag="step-000002")
    consolidate(run / "checkpoints", out, tag="step-000003")
    name = "base_model.model.layers.0.audio_mlp.up_proj.weight"
    assert torch.equal(read_output(out)[name], zero_to_fp32(run / "checkpoints", "step-000003")[name])
    assert leftovers(tmp_path) == []
