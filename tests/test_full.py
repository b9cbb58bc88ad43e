"""Full fine-tuning (train.mode=full) under ZeRO-3: a real 2-rank run of the tiny model memorises one voice-cloning
sample with every weight but the text embedding trained (model.trainable); its checkpoints resume exactly, on 2
ranks and on 1; `consolidate` (ds_train/export.py through merge.py's writer) turns a checkpoint into a model dir
that is DeepSpeed's zero_to_fp32 output cast to bf16 over the base's frozen weights, and Boson's serve engine
regenerates the memorised sample from the end-of-run OUTPUT_DIR/merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMO_ROWS, base_config, launch, loss_records, write_config, write_memo_data
from test_generate import boson_engine, boson_greedy, memo_prompts, target_codes

STEPS = 16  # memorised from step ~14 on at lr 0.01 (the loss falls 12.5 -> 0.13)
TRAINABLE = ["layers", "norm", "audio_*"]  # all but embed_tokens, the text embedding: frozen, taken from the base
FROZEN = ["embed_tokens.weight"]


def full_config(tiny_model: Path, data: Path, out: Path, **sections) -> Path:
    cfg = base_config(tiny_model, data, out, train={"mode": "full", "max_steps": STEPS},
                      optim={"lr": 0.01, "warmup_steps": 0, "scheduler": "constant"},
                      checkpoint={"every_steps": 8, "keep_last": 5})
    del cfg["lora"]
    cfg["model"]["trainable"] = TRAINABLE
    for section, values in sections.items():
        cfg[section].update(values)
    return write_config(out.parent / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory) -> Path:
    """OUTPUT_DIR of the 2-rank full fine-tuning run: step-000008, step-000016 (= latest), merged/ (fp32: the run
    trained on CPU); its final summary line in ../summary.json. Read it, never write into it."""
    root = tmp_path_factory.mktemp("full")
    data = write_memo_data(root / "data")
    out = root / "run"
    proc = launch(["train", str(full_config(tiny_model, data, out))])
    (root / "summary.json").write_text([ln for ln in proc.stdout.splitlines() if ln.startswith('{"first_loss"')][-1])
    return out


def zero_to_fp32(step_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                    exclude_frozen_parameters=True)


def model_dir_tensors(model_dir: Path) -> dict:
    tensors = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def resumed_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of OUTPUT_DIR as a run interrupted right after saving `step` left it."""
    out = shutil.copytree(run, dest)
    shutil.rmtree(out / "merged")
    tag = f"step-{step:06d}"
    for d in (out / "checkpoints").glob("step-*"):
        if d.name > tag:
            shutil.rmtree(d)
    (out / "checkpoints" / "latest").write_text(tag)
    return out


@pytest.mark.slow
def test_loss_falls_and_checkpoints_hold_the_trained_weights_only(full_run, tiny_model):
    got = loss_records(full_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS]["loss"] < 0.05 * got[1]["loss"], (got[1]["loss"], got[STEPS]["loss"])
    step = full_run / "checkpoints" / "step-000016"
    assert not (step / "adapter").exists()  # no per-save gather of the model on rank 0
    trained = zero_to_fp32(step)
    base = load_file(tiny_model / "model.safetensors")
    assert sorted(trained) == sorted(set(base) - set(FROZEN))  # no LoRA, nothing frozen in the shards
    summary = json.loads((full_run.parent / "summary.json").read_text())
    assert summary.get("merged") == str(full_run / "merged") and "adapter" not in summary


@pytest.mark.slow
def test_consolidated_dir_is_zero_to_fp32_in_bf16_over_the_base(full_run, tiny_model, tmp_path):
    from ds_train.cli import main
    from ds_train.merge import MERGE_INFO

    step = full_run / "checkpoints" / "step-000008"
    out = tmp_path / "model"
    assert main(["consolidate", str(full_run / "checkpoints"), str(out), "--tag", step.name,
                 "--max-shard-size", "1MB"]) == 0
    got, want, base = model_dir_tensors(out), zero_to_fp32(step), load_file(tiny_model / "model.safetensors")
    assert got.keys() == base.keys() and len(list(out.glob("model-*.safetensors"))) > 1
    for name in want:  # trained: DeepSpeed's fp32 master, cast to bf16
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name].to(torch.bfloat16)), name
    for name in FROZEN:  # frozen: the base's weight, never trained
        assert torch.equal(got[name], base[name].to(torch.bfloat16))
    assert not torch.equal(want["layers.0.audio_mlp.up_proj.weight"], base["layers.0.audio_mlp.up_proj.weight"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "audio_tokenizer/config.json",
              MERGE_INFO):
        assert (out / f).is_file(), f
    # The end of the run consolidated the final checkpoint in the run's dtype (fp32 on CPU): bit-equal.
    merged, final = model_dir_tensors(full_run / "merged"), zero_to_fp32(full_run / "checkpoints" / "step-000016")
    assert all(torch.equal(merged[n], final[n]) for n in final)
    assert all(torch.equal(merged[n], base[n]) for n in FROZEN)


@pytest.mark.slow
def test_memorised_sample_regenerates_from_the_merged_dir(full_run, tiny_model, tmp_path):
    from ds_train.generate import Sampling, load_engine, speak

    data = full_run.parent / "data"
    (target,) = target_codes(data, tiny_model)
    ((codes, stopped_by_eos),) = boson_greedy(boson_engine(full_run / "merged"), memo_prompts(data),
                                              target.shape[1] + 10)
    assert stopped_by_eos and torch.equal(codes, target), (codes[0], target[0])
    # `ds-train generate`'s engine on the same dir (no adapter): the same codes.
    spoken = speak(load_engine(str(full_run / "merged")), memo_prompts(data)[0],
                   Sampling(temperature=0.0, max_new_frames=20))
    assert spoken.stopped_by == "eos" and torch.equal(spoken.codes, target)
    assert len(MEMO_ROWS) == 1


@pytest.mark.slow
def test_resume_on_two_ranks_is_bit_exact(full_run, tiny_model, tmp_path):
    out = resumed_copy(full_run, tmp_path / "run", 8)
    launch(["train", str(full_config(tiny_model, full_run.parent / "data", out, train={"resume": "auto"}))])
    got, want = loss_records(out), loss_records(full_run)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), (s, got[s]["loss"], want[s]["loss"])
    a, b = zero_to_fp32(out / "checkpoints" / "step-000016"), zero_to_fp32(full_run / "checkpoints" / "step-000016")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_resume_on_one_rank_gives_the_two_rank_losses(full_run, tiny_model, tmp_path):
    # The checkpoint of 2 ranks re-partitioned over 1 (ds_train/reshard.py, names without a PEFT prefix); grad_accum 2
    # keeps the global batch, so steps 9-12 on 1 rank must log the 2-rank run's losses.
    out = resumed_copy(full_run, tmp_path / "run", 8)
    proc = launch(["train", str(full_config(tiny_model, full_run.parent / "data", out,
                                            train={"resume": "auto", "grad_accum": 2, "max_steps": 12}))], nprocs=1)
    assert "re-partitioning" in proc.stdout
    got, want = loss_records(out), loss_records(full_run)
    assert sorted(got) == list(range(1, 13))
    for s in range(9, 13):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), (s, got[s]["loss"], want[s]["loss"])


def test_model_dir_of_every_weight_trained_needs_no_base_weights(tiny_model, tmp_path):
    # model.init=random with model.trainable=["*"]: the base dir (a make-arch dir) has config and tokenizers but no
    # weights; every tensor comes from the checkpoint, so none is read from it.
    from ds_train.merge import write_model_dir

    base = shutil.copytree(tiny_model, tmp_path / "arch", ignore=shutil.ignore_patterns("*.safetensors"))
    trained = {n: t.float() * 2 for n, t in load_file(tiny_model / "model.safetensors").items()}
    out = write_model_dir(base, tmp_path / "model", trained, {}, "bf16", "1MB", {"checkpoint": "test"})
    got = model_dir_tensors(out)
    assert got.keys() == trained.keys()
    assert all(torch.equal(got[n], trained[n].to(torch.bfloat16)) for n in trained)
    del trained["norm.weight"]  # one weight not trained: it must come from the base, which has none
    from ds_train.errors import CheckpointError

    with pytest.raises(CheckpointError, match="has neither model.safetensors"):
        write_model_dir(base, tmp_path / "model2", trained, {}, "bf16", "1MB", {"checkpoint": "test"})
    assert not (tmp_path / "model2").exists()


def test_a_random_init_full_run_without_a_base_dir_stops_at_start(tiny_model, tmp_path):
    # OUTPUT_DIR/merged at the end of a full run takes config, tokenizers and frozen weights from model.path: with
    # model.init=random an arch JSON, or a weightless dir while some weights stay frozen, must stop before training.
    from ds_train.config import load_config
    from ds_train.errors import ConfigError
    from ds_train.preflight import check_full_run_base

    weightless = shutil.copytree(tiny_model, tmp_path / "arch", ignore=shutil.ignore_patterns("*.safetensors"))

    def check(path, trainable=None, mode="full"):
        check_full_run_base(load_config(None, [
            f"model.path={path}", "model.init=random", "model.audio_tokenizer_path=/a", "data.train_file=t.jsonl",
            "train.output_dir=/o", f"train.mode={mode}"]
            + ([f"model.trainable={json.dumps(trainable)}"] if trainable else [])))

    with pytest.raises(ConfigError, match=r"arch\.json: a full fine-tuning run .* `ds-train make-arch ARCH.json DIR`"):
        check(tmp_path / "arch.json", ["*"])
    with pytest.raises(ConfigError, match=r"holds no weights, and model.trainable=\['layers'\] .* --weights"):
        check(weightless, ["layers"])
    check(weightless, ["*"])  # every weight trained: the dir's config and tokenizers suffice
    check(tiny_model, ["layers"])  # a dir with weights
    check(tmp_path / "arch.json", mode="lora")  # LoRA writes an adapter, not a model dir
