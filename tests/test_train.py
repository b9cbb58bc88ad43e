"""The training loop end to end: the real `deepspeed` launcher, 2 CPU processes, ZeRO-3 with every parameter
partitioned (stage3_param_persistence_threshold 0), real peft, real boson classes, the tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import (PLAIN_STEPS, REF_STEPS, base_config, ds_train, launch, loss_records, losses, plain_config,
                      read_metrics, write_config)

pytestmark = pytest.mark.slow

RECORD_KEYS = {"step", "epoch", "loss", "text_loss", "audio_loss", "codebook_losses", "lr", "grad_norm", "tokens",
               "tokens_per_s", "samples_per_s", "step_time_s", "peak_mem_gb"}


def test_zero3_two_ranks_loss_falls_and_outputs(tiny_model, demo_data, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, demo_data, out,
                      lora={"r": 16, "alpha": 16, "dropout": 0.0,
                            "target_modules": ["self_attn.q_proj", "self_attn.v_proj", "audio_mlp.up_proj",
                                               "audio_mlp.down_proj", "audio_lm_head", "text_lm_head"]},
                      data={"train_file": str(demo_data / "train.jsonl"), "eval_file": str(demo_data / "eval.jsonl")},
                      optim={"lr": 0.01, "scheduler": "constant"},
                      train={"epochs": 8, "micro_batch_size": 2, "eval_every": 8, "eval_on_start": True},
                      checkpoint={"every_steps": 16})
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    proc = launch(["train", str(write_config(tmp_path / "c.yaml", cfg))])
    assert "parameters:" in proc.stdout and "trainable" in proc.stdout
    # bitsandbytes (installed for QLoRA, imported by peft) must not warn about an optional package in a LoRA run
    assert "gemm_4bit_forward" not in proc.stdout + proc.stderr
    # DeepSpeed's CPU shm all-reduce would leave 69 MB per rank in /dev/shm (RAM) after every run; it is off.
    assert set(Path("/dev/shm").glob("deepspeed_*")) == shm_before

    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 16 and [r["step"] for r in steps] == list(range(1, 17))
    per_step_tokens = step_tokens(demo_data, tiny_model, tmp_path)
    # Step 1 trains the base model (LoRA's B starts at 0, dropout 0) on the plan's first two micro-batches of 2
    # samples, one per rank: [7, 0] and [2, 1] (MicroBatchSampler, seed 42, written out). Its logged losses are a
    # plain Boson forward of those batches with the token-weighted cross-entropy written out in this file.
    want = independent_losses(tiny_model, demo_data, [[7, 0], [2, 1]])
    assert steps[0]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert steps[0]["text_loss"] == pytest.approx(want["text_loss"], rel=1e-5)
    assert steps[0]["audio_loss"] == pytest.approx(want["audio_loss"], rel=1e-5)
    assert steps[0]["codebook_losses"] == pytest.approx(want["codebook_losses"], rel=1e-5)
    for r in steps:
        assert RECORD_KEYS <= r.keys()
        assert len(r["codebook_losses"]) == 8
        assert r["tokens"] in per_step_tokens  # 2 ranks x 2 samples: the positions of 4 of the 8 samples
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-6)
        assert r["samples_per_s"] == pytest.approx(4 / r["step_time_s"], rel=1e-6)
        assert r["grad_norm"] > 0
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < first - 2.0, (first, last)  # overfits 8 samples: the loss clearly falls
    assert steps[-1]["audio_loss"] < steps[0]["audio_loss"] - 0.3
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    for r in evals:
        assert r["eval_loss"] == pytest.approx(r["eval_text_loss"] + r["eval_audio_loss"], rel=1e-9)
        assert sum(r["eval_codebook_losses"]) / 8 == pytest.approx(r["eval_audio_loss"], rel=1e-9)
    assert evals[0]["eval_loss"] > evals[1]["eval_loss"]  # training helped on held-out data too

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 8 and saved["model"]["path"] == str(tiny_model)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * (3 * 2 + 2 * 2 + 2)  # A and B of every targeted module
    assert all(t.numel() > 0 and t.abs().sum() > 0 for t in adapter.values())
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert (out / "checkpoints" / "latest").read_text() == "step-000016"


@pytest.fixture(scope="module")
def one_process_run(tiny_model, demo_data, eval3, tmp_path_factory) -> Path:
    """conftest's plain run on 1 process with grad_accum 2: the same global batch of 2 samples per step."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    launch(["train", str(plain_config(tiny_model, demo_data, eval3, out, train={"grad_accum": 2}))], nprocs=1)
    return out


def test_data_parallel_equivalence(plain_run, one_process_run):
    """2 ranks x 1 sample (conftest's plain_run) and 1 process x 2 accumulated samples see the same global batch,
    epoch 2 included (step 5): the same token-weighted losses and the same gradients (DeepSpeed's averaging over
    ranks and accumulation steps is undone exactly)."""
    runs, grad_norms = {}, {}
    for name, out in (("two_ranks", plain_run), ("one_process", one_process_run)):
        runs[name] = losses(out)
        grad_norms[name] = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
    assert len(runs["two_ranks"]) == PLAIN_STEPS
    assert runs["two_ranks"] == pytest.approx(runs["one_process"], rel=1e-5)
    assert grad_norms["two_ranks"] == pytest.approx(grad_norms["one_process"], rel=1e-5)  # the same gradient
    assert runs["two_ranks"][-1] != runs["two_ranks"][0]  # training moved the weights


def test_activation_checkpointing_same_losses_under_zero3(plain_run, tiny_model, demo_data, eval3, tmp_path):
    """conftest's plain run again with model.activation_checkpointing=true: the same losses and gradients."""
    out = tmp_path / "ckpt_True"
    launch(["train", str(plain_config(tiny_model, demo_data, eval3, out, model={"activation_checkpointing": True}))])
    runs = {}
    for flag, run in ((False, plain_run), (True, out)):
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["activation_checkpointing"] is flag
        runs[flag] = [v for r in read_metrics(run) if "loss" in r for v in (r["loss"], r["grad_norm"])]
    assert len(runs[False]) == 2 * PLAIN_STEPS
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_config_errors_stop_before_any_process_group(tiny_model, demo_data, tmp_path):
    cfg = base_config(tiny_model, demo_data, tmp_path / "o", optim={"lrr": 1})
    proc = ds_train(["train", str(write_config(tmp_path / "bad.yaml", cfg))])
    assert proc.returncode == 2 and "config error: Key 'lrr' not in 'OptimConfig'" in proc.stderr
    assert "Traceback" not in proc.stderr


def independent_losses(tiny_model, demo_data, micro_batches: list[list[int]], model=None) -> dict:
    """The token-weighted losses of one step over `micro_batches` (indices into the demo train set's prepared cache)
    by a plain HiggsAudioModel forward (fp32, the base model unless `model` is given) and torch's cross-entropy,
    written here rather than taken from ds_train.loss: text position t scores label t+1 of the forward's
    expanded labels; audio position n of the concatenated stream scores code n+1 of each codebook; every trained
    position of every micro-batch counts once, text and each codebook separately, loss = text + mean of codebooks."""
    import torch
    import torch.nn.functional as F
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.data.cache import CachedDataset, default_cache_dir
    from ds_train.data.collate import Collate, make_collator

    if model is None:
        model = HiggsAudioModel.from_pretrained(str(tiny_model), torch_dtype=torch.float32).eval()
    ds = CachedDataset(default_cache_dir(str(demo_data / "train.jsonl")), model.config)
    collate = Collate(make_collator(model.config))
    text, codes = [], [[] for _ in range(8)]
    with torch.no_grad():
        for indices in micro_batches:
            b = collate([ds[i] for i in indices])
            out = model(**b.inputs)
            labels = out.expanded_labels[:, 1:]
            trained = labels != -100
            text.append(F.cross_entropy(out.logits[:, :-1][trained].double(), labels[trained], reduction="none"))
            for k in range(8):
                target = b.label_audio_ids[k, 1:]
                trained = target != -100
                codes[k].append(F.cross_entropy(out.audio_logits[:-1, k][trained].double(), target[trained],
                                                reduction="none"))
    text_loss = torch.cat(text).mean().item()
    codebook_losses = [torch.cat(c).mean().item() for c in codes]
    audio_loss = sum(codebook_losses) / 8
    return {"loss": text_loss + audio_loss, "text_loss": text_loss, "audio_loss": audio_loss,
            "codebook_losses": codebook_losses}


def step_tokens(demo_data, tiny_model, tmp_path) -> set:
    """Every possible `tokens` of a step of 4 of the 8 training samples: sums of 4 merged lengths."""
    import itertools

    from ds_train.data.cache import CachedDataset, default_cache_dir
    from ds_train.preflight import load_model_config

    ds = CachedDataset(default_cache_dir(str(demo_data / "train.jsonl")), load_model_config(str(tiny_model)))
    return {sum(c) for c in itertools.combinations(ds.lengths, 4)}


def test_eval_loss_is_the_same_on_one_and_two_ranks(plain_run, one_process_run, eval3, tiny_model, demo_data,
                                                    tmp_path):
    """A 3-sample eval set (conftest's EVAL3, evaluated at step 0 by the plain run on 2 ranks and by its 1-process
    run): 1 rank runs 3 micro-batches; on 2 ranks rank 1 has one fewer and forwards a filler with weight 0. Before: a
    rank whose eval share was empty got a shuffled *training* sampler over the eval set (a sample evaluated twice),
    and a 1-sample eval set on 2 ranks (launched here) raised at the final eval, losing the run."""
    one = tmp_path / "eval1.jsonl"
    (tmp_path / "audio").symlink_to(demo_data / "audio")  # the rows' relative audio paths resolve from here
    one.write_text(eval3.read_text().splitlines()[0] + "\n")
    out = tmp_path / "one_sample"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 1, "eval_on_start": True},
                      data={"train_file": str(demo_data / "train.jsonl"), "eval_file": str(one),
                            "cache_dir": str(tmp_path / "cache_one_sample")})
    launch(["train", str(write_config(tmp_path / "one_sample.yaml", cfg))])
    assert (tmp_path / "cache_one_sample-eval" / "index.json").is_file()  # the eval cache follows data.cache_dir

    evals = {}
    for name, run in (("one_rank", one_process_run), ("two_ranks", plain_run), ("one_sample", out)):
        evals[name] = [r for r in read_metrics(run) if "eval_loss" in r]
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((one_process_run / "config.yaml").read_text())["data"]["eval_file"] == str(eval3)
    assert [r["step"] for r in evals["two_ranks"]] == [r["step"] for r in evals["one_rank"]] == [0, PLAIN_STEPS]
    for key in ("eval_loss", "eval_text_loss", "eval_audio_loss"):
        assert evals["two_ranks"][0][key] == pytest.approx(evals["one_rank"][0][key], rel=1e-9), key
    assert evals["two_ranks"][0]["eval_codebook_losses"] == pytest.approx(evals["one_rank"][0]["eval_codebook_losses"],
                                                                          rel=1e-9)
    assert [r["step"] for r in evals["one_sample"]] == [0, 1]
    assert evals["one_sample"][0]["eval_loss"] != pytest.approx(evals["two_ranks"][0]["eval_loss"], rel=1e-6)


def test_a_set_without_a_full_step_is_refused_at_start_also_with_max_steps(tiny_model, demo_data, tmp_path):
    """8 samples, 2 ranks x 8 accumulated micro-batches need 16: no full step. Before, max_steps > 0 skipped the
    check and the loop died in StopIteration."""
    cfg = base_config(tiny_model, demo_data, tmp_path / "o", train={"max_steps": 3, "grad_accum": 8})
    proc = launch(["train", str(write_config(tmp_path / "c.yaml", cfg))], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the training set gives no full step: 8 samples for 2 ranks x train.grad_accum=8" in proc.stderr
    assert "StopIteration" not in proc.stderr


def test_lr_follows_the_step_across_a_skipped_update(non_finite_run):
    """DeepSpeed does not advance the LR schedule on a skipped (non-finite) update while our step counter does.
    ds_train advances it too, so the logged lr is the schedule's value at the logged step and the schedule ends where
    the run ends. (conftest's non_finite_run: the reference schedule, cosine over 12 steps after 2 warmup steps;
    rank 1 alone computes a NaN loss at step 3, both ranks at steps 5-7: every rank skips those updates.)"""
    out, _ = non_finite_run
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert [records[s]["skipped"] for s in range(1, 8)] == [False, False, True, False, True, True, True]

    def schedule(step: int) -> float:  # transformers' cosine schedule with warmup, written out
        if step < 2:
            return 0.005 * step / 2
        return 0.005 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (REF_STEPS - 2)))

    assert [records[s]["lr"] for s in range(1, 8)] == pytest.approx([schedule(s) for s in range(1, 8)], rel=1e-9)


def test_a_cache_shipped_without_its_audio_trains_the_same(one_process_run, tiny_model, demo_data, eval3, tmp_path):
    """Only the manifests and their caches copied to another machine (here: another folder), no audio file:
    prepare finds the caches current from the manifests' bytes and fingerprint, and training gives the losses of
    the run that had the audio (1 process, grad_accum 2: one_process_run), eval at step 0 included."""
    ship = tmp_path / "ship"
    for manifest in (demo_data / "train.jsonl", eval3):
        (ship / ".ds_train_cache").mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest, ship / manifest.name)
        shutil.copytree(manifest.parent / ".ds_train_cache" / manifest.stem, ship / ".ds_train_cache" / manifest.stem)
    assert not list(ship.rglob("*.wav"))
    out = tmp_path / "run"
    launch(["train", str(plain_config(tiny_model, ship, ship / eval3.name, out,
                                      train={"grad_accum": 2, "max_steps": 2}))], nprocs=1)
    want, got = loss_records(one_process_run), loss_records(out)
    assert [got[s]["loss"] for s in (1, 2)] == pytest.approx([want[s]["loss"] for s in (1, 2)], rel=1e-5)
    evals = [[r["eval_loss"] for r in read_metrics(o) if r.get("step") == 0 and "eval_loss" in r]
             for o in (one_process_run, out)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5) and evals[0]


class _Engine:
    """Stands in for DeepSpeed's engine around a plain model (DeepSpeed's needs a process group, which a unit test
    of one step does not start): the forward is the model's, backward is autograd's, and the update is skipped."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        return self.model(**inputs)

    def train(self):
        self.model.train()

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


def test_a_step_whose_forward_trains_other_positions_than_collated_raises(tiny_model, demo_data, tmp_path):
    """train_step divides each micro-batch's summed loss by the counts the collator made from the labels before the
    forward. If the forward trains other positions (here: one text label hidden after collation, as a label
    expansion that disagrees with loss.trained_positions would), the step's loss is silently mis-weighted; the step
    must stop with an error that names the step and the count. The same batches unchanged pass, with the loss of a
    token-weighted mean written out here."""
    from types import SimpleNamespace

    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.config import load_config
    from ds_train.data.cache import CachedDataset
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.prepare import prepare
    from ds_train.preflight import load_model_config, load_text_tokenizer
    from ds_train.loss import Sft
    from ds_train.train import train_step

    cfg = load_config(None, [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                             f"data.train_file={demo_data}/train.jsonl", f"train.output_dir={tmp_path}/out"])
    model_config = load_model_config(str(tiny_model))
    # the session's shared cache next to the manifest
    cache = prepare(cfg, cfg.data.train_file, load_text_tokenizer(cfg, model_config)).cache_dir
    ds = CachedDataset(cache, model_config)
    collate = Collate(make_collator(model_config))
    model = HiggsAudioModel.from_pretrained(str(tiny_model))
    model.config.use_cache = False
    run = SimpleNamespace(cfg=cfg, engine=_Engine(model), state={"step": 4}, objective=Sft(cfg))

    batches = [collate([ds[0], ds[1]]), collate([ds[2]])]  # the cache independent_losses reads
    result = train_step(run, batches)
    # the token-weighted step loss: every trained position of both micro-batches, one mean
    model.eval()  # no dropout in the tiny model: the same forward
    assert result.loss.loss == pytest.approx(independent_losses(tiny_model, demo_data, [[0, 1], [2]], model)["loss"],
                                             rel=1e-5)

    labels = batches[1].inputs["label_ids"]
    last_trained = int((labels[0] != -100).nonzero()[-1])  # the sample's last text label, e.g. <|eot_id|>
    labels[0, last_trained] = -100  # after collation: batches[1].counts still counts it
    with pytest.raises(RuntimeError, match=r"step 5: the forward trained other positions than the collator counted "
                                           r"\(text: off by 1 of \d+\)"):
        train_step(run, batches)
