"""ds_train/config.py: one structured config, clear errors at start, old-trainer aliases, derived DeepSpeed JSON."""

from __future__ import annotations

import json

import re

import pytest

from conftest import SETTINGS_STEPS, loss_records, read_metrics
from ds_train.cli import translate_args
from ds_train.config import load_config, redact, to_dict
from ds_train.ds_config import deepspeed_config
from ds_train.errors import ConfigError

REQUIRED = ["model.path=/m", "model.audio_tokenizer_path=/m/audio_tokenizer", "data.train_file=/d/train.jsonl",
            "train.output_dir=/o"]


def cfg_with(*extra):
    return load_config(None, [*REQUIRED, *extra])


def test_defaults_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.002\ntrain:\n  grad_accum: 4\n")
    cfg = load_config(str(y), [*REQUIRED, "optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4  # dotlist wins over YAML
    assert cfg.train.grad_accum == 4
    assert "audio_mlp.gate_proj" in cfg.lora.target_modules and "mlp.gate_proj" not in cfg.lora.target_modules


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "Key 'lrr' not in 'OptimConfig'"),
    ("nosuch.key=1", "nosuch"),
    ("train.micro_batch_size=two", "train.micro_batch_size"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0"),
    ("model.dtype=fp16", "model.dtype must be one of"),
    ("wandb.mode=maybe", "wandb.mode must be one of"),
    ("lora.enabled=false", "lora.enabled is replaced by train.mode"),
    ("train.mode=freeze", "train.mode must be one of lora, full, qlora"),
    ("model.trainable=[audio_mlp]", "model.trainable is for train.mode=full"),
    ("train.eval_every=10", "needs data.eval_file"),
    ("train.eval_on_start=true", "needs data.eval_file"),
    ("checkpoint.keep_best=1", "needs data.eval_file"),
    ("data.prefetch_factor=2", "need data.num_workers > 0"),
    # Accepted, or crashed after data preparation, before issue 11:
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
    ("optim.scheduler=foo", "optim.scheduler must be one of linear, cosine"),
    ("train.max_steps=-5", "train.max_steps must be >= 0, got -5"),
    ("lora.alpha=-1", "lora.alpha must be > 0, got -1"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0, got -1"),
    ("checkpoint.keep_best=-1", "checkpoint.keep_best must be >= 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas needs two values in [[]0, 1)"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("data.min_audio_seconds=40", "data.min_audio_seconds (40.0) must be below data.max_audio_seconds"),
    ("data.shard_size=0", "data.shard_size must be > 0"),
    ("train.epochs=-1", "train.epochs must be >= 0"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be > 0"),
    ("lora.target_modules=[]", "lora.target_modules is empty"),
    # Issue 10: the samples' judges and the metric that picks the best checkpoint.
    ("eval.asr_model=/asr", "eval.asr_model judges the generated samples: it needs eval.samples"),
    ("checkpoint.best_metric=bleu", "checkpoint.best_metric must be one of eval_loss,"),
    ("checkpoint.best_mode=up", "checkpoint.best_mode must be one of auto, min, max"),
    ("checkpoint.best_metric=eval_audio_acc", "checkpoint.best_metric=eval_audio_acc needs data.eval_file"),
    ("checkpoint.best_metric=speaker_sim", "checkpoint.best_metric=samples_speaker_sim needs eval.samples"),
    # Issue 15 item 3: how a round of samples holds the ZeRO-3 parameters.
    ("eval.samples_gather=often", "eval.samples_gather must be one of auto, always, never, got 'often'"),
    # Issue 11 item 10: several training manifests, a held-out eval fraction.
    ("data.train_files=[/d/a.jsonl]", "set one of data.train_file (one manifest) and data.train_files (a list), "
                                      "not both"),
    ("data.eval_split=1", "data.eval_split must be in (0, 1), got 1.0"),
    ("data.eval_split=0", "data.eval_split must be in (0, 1), got 0.0"),
    # Issue 17 item 5: a token budget, or auto (the largest ds-train plan fits the device).
    ("data.max_tokens=-1", "data.max_tokens must be a number >= 0 or auto, got -1"),
    ("data.max_tokens=most", "data.max_tokens must be a number >= 0 or auto, got 'most'"),
    ("data.eval_split=0.1 data.eval_file=/d/e.jsonl", "data.eval_split holds out part of the training data as the eval "
                                                      "set: set it or data.eval_file, not both"),
])
def test_bad_settings_fail_at_start(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg_with(*override.split(" "))


ONE_OF = [item for item in REQUIRED if not item.startswith("data.train_file=")]


def test_train_files_take_paths_and_weights_in_place_of_train_file(tmp_path):
    y = tmp_path / "mix.yaml"
    y.write_text("data:\n  train_files:\n    - /d/en.jsonl\n    - {path: /d/fr.jsonl, weight: 2.5}\n"
                 "    - {path: /e/en.jsonl, weight: 1}\n  eval_split: 0.1\ntrain:\n  eval_every: 5\n")
    cfg = load_config(str(y), ONE_OF)
    assert cfg.data.train_file is None and cfg.data.eval_split == 0.1 and cfg.train.eval_every == 5
    assert cfg.data.manifests() == [("/d/en.jsonl", 1.0), ("/d/fr.jsonl", 2.5), ("/e/en.jsonl", 1.0)]
    assert to_dict(cfg)["data"]["train_files"][0] == {"path": "/d/en.jsonl", "weight": 1.0}  # config.yaml's form
    assert cfg_with().data.manifests() == [("/d/train.jsonl", 1.0)]  # data.train_file: one manifest, weight 1
    with pytest.raises(ConfigError, match=r"missing required settings: data.train_file \(or data.train_files\)$"):
        load_config(None, ONE_OF)


@pytest.mark.parametrize("value, message", [
    ("[]", "data.train_files is empty"),
    ("[/d/a.jsonl,{path: /d/b.jsonl, weight: 0}]", r"data.train_files\[1\].weight must be a number > 0, got 0"),
    ("[{path: /d/b.jsonl, weight: -1}]", r"data.train_files\[0\].weight must be a number > 0, got -1"),
    ("[{path: /d/b.jsonl, weight: x}]", r"data.train_files\[0\].weight must be a number > 0, got 'x'"),
    ("[/d/a.jsonl,{path:/d/b.jsonl}]", r"data.train_files\[1\] must be a path or \{path: ..., weight: ...\}, got "
                                       r"\{'path:/d/b.jsonl': None\} \(YAML flow style needs a space"),
    ("[{file: /d/b.jsonl}]", r"data.train_files\[0\] must be a path or"),
    ("[/d/a.jsonl,/d/b.jsonl,/d/../d/a.jsonl]", r"data.train_files\[2\] repeats data.train_files\[0\]"),
])
def test_bad_train_files_name_the_item(value, message):
    with pytest.raises(ConfigError, match=message + r".*\(from the command line: data.train_files="):
        load_config(None, [*ONE_OF, f"data.train_files={value}"])


def test_best_metric_names_and_directions():
    with pytest.raises(ConfigError, match="best_metric=samples_wer needs eval.asr_model"):
        cfg_with("eval.samples=2", "checkpoint.best_metric=wer")
    judged = ["eval.samples=2", "eval.asr_model=/asr", "eval.speaker_model=/spk"]
    for metric, name, direction in [("wer", "samples_wer", "min"), ("speaker_sim", "samples_speaker_sim", "max"),
                                    ("samples_code_match", "samples_code_match", "max")]:
        ck = cfg_with(*judged, f"checkpoint.best_metric={metric}").checkpoint
        assert (ck.best_metric, ck.best_direction()) == (name, direction)
    ck = cfg_with("data.eval_file=/d/eval.jsonl", "checkpoint.best_metric=eval_audio_acc", "checkpoint.keep_best=2",
                  "checkpoint.best_mode=min").checkpoint
    assert (ck.best_metric, ck.best_direction()) == ("eval_audio_acc", "min")  # an explicit mode wins
    assert cfg_with().checkpoint.best_direction() == "min"  # the default, eval_loss, needs no eval set unless ranking


def test_full_audio_mlp_and_lora_on_audio_mlp_contradict():
    with pytest.raises(ConfigError, match="must not also target audio_mlp"):
        cfg_with("model.train_audio_mlp=true")
    cfg = cfg_with("model.train_audio_mlp=true", "lora.target_modules=[self_attn.q_proj]")
    assert cfg.model.train_audio_mlp


def test_mode_keys_belong_to_their_mode():
    assert cfg_with("train.mode=full", "model.trainable=[audio_mlp]").model.trainable == ["audio_mlp"]
    assert cfg_with("lora.enabled=true").uses_lora()  # the old switch, on, still works
    for extra, key in (("model.train_audio_mlp=true", "model.train_audio_mlp"),
                       ("lora.modules_to_save=[audio_codebook_embeddings]", "lora.modules_to_save"),
                       ("lora.enabled=true", "lora.enabled=true contradicts train.mode=full"),
                       ("model.trainable=[]", "model.trainable is empty")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            cfg_with("train.mode=full", extra)


def test_missing_required_are_listed():
    with pytest.raises(ConfigError, match=r"missing required settings: data.train_file \(or data.train_files\), model.audio_tokenizer_path"):
        load_config(None, ["model.path=/m"])


def test_yaml_errors_name_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"lerning_rate.*bad.yaml"):
        load_config(str(y), REQUIRED)


def test_old_trainer_flags_are_aliases():
    # The user's torchrun command (shared/seeds/001), word for word.
    words = ("--model_path bosonai/higgs-audio-v2-generation-3B-base --audio_tokenizer_path bosonai/higgs-audio-v2-tokenizer "
             "--train_data_file ../../higgs-audio/training_data/chatml/train_chatml_samples.json --output_dir ./output_expmt_v1 "
             "--save_steps 5000 --disable_evaluation --per_device_train_batch_size 2 --learning_rate 5e-5 "
             "--num_train_epochs 3 --logging_steps 50 --warmup_steps 500 --bf16 --use_lora").split()
    yaml_path, dotlist = translate_args(words)
    cfg = load_config(yaml_path, dotlist)
    assert yaml_path is None
    assert cfg.model.path == "bosonai/higgs-audio-v2-generation-3B-base"
    assert cfg.model.audio_tokenizer_path == "bosonai/higgs-audio-v2-tokenizer"
    assert cfg.data.train_file.endswith("train_chatml_samples.json") and cfg.data.eval_file is None
    assert cfg.train.output_dir == "./output_expmt_v1"
    assert cfg.checkpoint.every_steps == 5000 and cfg.train.micro_batch_size == 2 and cfg.optim.lr == 5e-5
    assert cfg.train.epochs == 3 and cfg.train.log_every == 50 and cfg.optim.warmup_steps == 500
    assert cfg.model.dtype == "bf16" and cfg.train.mode == "lora" and cfg.train.eval_every == 0


def test_alias_forms_and_unknown_flags():
    assert translate_args(["c.yml", "--learning_rate=1e-3", "x.y=1"]) == ("c.yml", ["optim.lr=1e-3", "x.y=1"])
    with pytest.raises(ConfigError, match="unknown flag '--lr'"):
        translate_args(["--lr", "1"])
    with pytest.raises(ConfigError, match="needs a value"):
        translate_args(["--learning_rate"])


def _ds_json(tmp_path, body) -> str:
    p = tmp_path / "ds.json"
    p.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(p)


def test_deepspeed_json_takes_numbers_from_config(tmp_path):
    cfg = cfg_with("train.micro_batch_size=3", "train.grad_accum=4", "optim.lr=2e-4", "optim.max_grad_norm=0.5")
    ds = deepspeed_config(cfg, world_size=16, cuda=True, path="ds_configs/zero3.json")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 16 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["zero_optimization"]["stage"] == 3
    cpu = deepspeed_config(cfg, world_size=2, cuda=False, path="ds_configs/zero3_offload.json")
    assert cpu["bf16"]["enabled"] is False  # auto -> fp32 without a GPU
    assert cpu["zero_optimization"]["offload_param"]["pin_memory"] is False  # pinning needs a GPU driver
    assert deepspeed_config(cfg, 8, True, "ds_configs/zero2.json")["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("body, message", [
    ('{"zero_optimization": {"stage": 3},\n "train_batch_size": 7', "not valid JSON: line 2"),
    ({"train_batch_size": 64}, r"train_batch_size=64 but our config gives 32"),
    ({"train_micro_batch_size_per_gpu": 2}, "train.micro_batch_size"),
    ({"gradient_accumulation_steps": 8}, "train.grad_accum"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ({"bf16": {"enabled": True}}, "bf16.enabled contradicts model.dtype=fp32"),
    ([1, 2], "must be a JSON object"),
])
def test_deepspeed_json_errors(tmp_path, body, message):
    cfg = cfg_with("train.micro_batch_size=1", "train.grad_accum=2", "model.dtype=fp32")
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(cfg, world_size=16, cuda=False, path=_ds_json(tmp_path, body))
    # "auto" and equal values are accepted
    ok = deepspeed_config(cfg, 16, False, _ds_json(tmp_path, {"train_batch_size": 32, "gradient_clipping": "auto"}))
    assert ok["gradient_clipping"] == 1.0


def test_missing_deepspeed_json():
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json"):
        deepspeed_config(cfg_with(), 1, False, "nope.json")


def test_redact_hides_credentials(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcdef0123456789secret")
    cfg = cfg_with("wandb.run_name=abcdef0123456789secret", "wandb.tags=[hf_token_here]")
    red = redact({**to_dict(cfg), "HF_TOKEN": "hf_xyz", "tokenizer_path": "/m"})
    text = json.dumps(red)
    assert "abcdef0123456789secret" not in text and "hf_xyz" not in text
    assert red["tokenizer_path"] == "/m" and red["wandb"]["tags"] == ["hf_token_here"]


def test_errors_say_whether_the_value_came_from_the_command_line_or_the_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("optim:\n  weight_decay: -1\n")
    with pytest.raises(ConfigError, match=r"optim.weight_decay must be >= 0, got -1.0 \(in .*run.yaml\)$"):
        load_config(str(y), REQUIRED)
    with pytest.raises(ConfigError, match=r"got -2.0 \(from the command line: optim.weight_decay=-2\)$"):
        load_config(str(y), [*REQUIRED, "optim.weight_decay=-2"])
    with pytest.raises(ConfigError, match=r"train.epochs.*\(command-line override 'train.epochs=abc'\)$"):
        load_config(str(y), [*REQUIRED, "optim.weight_decay=0", "train.epochs=abc"])
    assert load_config(str(y), [*REQUIRED, "optim.weight_decay=0.1"]).optim.weight_decay == 0.1


@pytest.mark.slow
def test_shipped_zero2_and_zero3_configs_train_alike(settings_runs):
    """ds_configs/zero2.json and zero3.json in real 2-rank runs (conftest's settings_runs, identical otherwise): each
    runs its ZeRO stage (the checkpoint layout says which), and they compute the same training run."""
    z3, z2 = settings_runs["zero3_inline"], settings_runs["zero2"]
    last = f"step-{SETTINGS_STEPS:06d}"
    rng = ["rng-rank00000.pt", "rng-rank00001.pt"]
    z3_files = sorted(p.name for p in (z3 / "checkpoints" / last).glob("*.pt"))
    z2_files = sorted(p.name for p in (z2 / "checkpoints" / last).glob("*.pt"))
    # ZeRO-3 partitions the parameters too: a model file per rank.
    assert z3_files == sorted(rng + [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)
                                     for kind in ("model", "optim")])
    # ZeRO-2 keeps whole parameters (one model file, rank 0's) and partitions the optimizer state over both ranks.
    assert z2_files == sorted(rng + ["mp_rank_00_model_states.pt"] +
                              [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)])
    a, b = loss_records(z3), loss_records(z2)
    assert sorted(a) == sorted(b) == list(range(1, SETTINGS_STEPS + 1))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6), step  # measured: 1e-8 apart
    evals = [{r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r} for out in (z3, z2)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)
