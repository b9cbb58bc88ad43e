"""Shared fixtures: one tiny real-format checkpoint and one demo data set per session, and a runner for the real
`deepspeed` launcher. Nothing here is mocked; tests that mock something (a GPU, the network) say so themselves.

`./run.sh test` runs test files in two pytest-xdist workers. The session fixtures that build files (the tiny model,
the data sets, the shared runs) build them once per test run, not once per worker (`built_once`): the runs'
configs name the model and data paths, so a run resumed by a test of either worker must find the same paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `name`, filled by `build(dir)` once per test run: by the first worker that asks for it, while
    the others wait for it. Its users read it and never write into it (they copy it first)."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the run's temp dir; each worker's own is a directory in it (popen-gw0, ...)
    root = base / "built_once" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if not (root / ".built").exists():
            import shutil

            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            build(root)
            (root / ".built").touch()
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from ds_train.demo.tiny import make_tiny

    return built_once(tmp_path_factory, "tiny", lambda root: make_tiny(str(root / "model"))) / "model"


@pytest.fixture(scope="session")
def tiny_model_nodelay(tiny_model, tmp_path_factory) -> Path:
    """The same checkpoint with the delay pattern off (a config switch: the weights do not depend on it)."""
    import shutil

    def build(root: Path) -> None:
        shutil.copytree(tiny_model, root / "model")
        config = json.loads((root / "model/config.json").read_text())
        config["use_delay_pattern"] = False
        (root / "model/config.json").write_text(json.dumps(config, indent=2))

    return built_once(tmp_path_factory, "tiny_nodelay", build) / "model"


@pytest.fixture(scope="session")
def text_tok(tiny_model):
    """The tiny model's text tokenizer, audio tokenizer and config: one of each for the data tests."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def audio_tok(tiny_model):
    from ds_train.data.audio import load_audio_tokenizer

    return load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))


@pytest.fixture(scope="session")
def model_config(tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """8 train + 2 eval voice-cloning samples (TTS manifest). Its prepared cache is shared by the session."""
    from ds_train.demo.data import make_demo_data

    return built_once(tmp_path_factory, "data", lambda root: make_demo_data(str(root / "demo"), n=8, n_eval=2)) / "demo"


@pytest.fixture(scope="session")
def nospeaker_data(demo_data, tmp_path_factory) -> Path:
    """demo_data's 8 training rows without their `speaker` key, as another manifest (absolute audio paths): a
    data set that can only be split by sample. Its prepared cache is shared by the session."""
    rows = [json.loads(line) for line in (demo_data / "train.jsonl").read_text().splitlines()]
    text = "".join(json.dumps({k: str(demo_data / v) if k in ("audio", "ref_audio") else v
                               for k, v in r.items() if k != "speaker"}) + "\n" for r in rows)
    root = built_once(tmp_path_factory, "nospeaker", lambda root: (root / "plain.jsonl").write_text(text))
    return root / "plain.jsonl"


def audio_mlp_config(tiny_model: Path, demo_data: Path, out: Path, **sections) -> Path:
    """LoRA on attention plus the DualFFN audio_mlp fully trained, for OUTPUT_DIR `out` (the config is written
    beside it); `sections` update it."""
    cfg = base_config(tiny_model, demo_data, out, lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                                        "target_modules": ATTENTION}, **sections)
    cfg["model"]["train_audio_mlp"] = True
    return write_config(out.parent / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="session")
def audio_mlp_run(tiny_model, demo_data, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a 3-step 2-rank run: LoRA on attention plus fully trained audio_mlp, checkpoints step-000002
    and step-000003 (= latest), and merged/ (checkpoint.merge=true). Shared by the consolidate and merge tests."""
    def build(root: Path) -> None:
        out = root / "run"
        config = audio_mlp_config(tiny_model, demo_data, out, train={"max_steps": 3},
                                  checkpoint={"every_steps": 2, "keep_last": 5, "merge": True})
        proc = launch(["train", str(config)])
        summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"first_loss"')][-1])
        assert summary["merged"] == str(out / "merged")

    return built_once(tmp_path_factory, "audio_mlp_run", build) / "run"


# One voice-cloning sample short enough (10 frames) to memorise in a few dozen steps: (speaker, reference text,
# text). Two distinct samples need 44+ steps and even then the greedy clips flip between them from one step count to
# the next; one sample regenerates exactly from step 24 on, and its audio loss falls steadily (0.004 at step 32).
MEMO_ROWS = [("alto", "blue", "calm")]
# The demo's targets: at tiny scale the random heads must adapt too; r = hidden size makes the heads' update full rank.
MEMO_LORA = {"r": 64, "alpha": 64, "dropout": 0.0,
             "target_modules": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj", "audio_lm_head",
                                "text_lm_head"]}
MEMO_STEPS = 32
# What the tiny ASR judge hears in any clip (tiny_judges): against "calm", 1 word of 1 and 2 characters of 4 wrong.
JUDGE_HEARS = "Clam!"


def write_memo_data(out: Path) -> Path:
    """MEMO_ROWS as a TTS manifest (22.05 kHz clips, so the resampler runs), each row twice: one per rank."""
    import soundfile as sf

    from ds_train.demo.data import RATE, SPEAKERS, synth

    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (speaker, ref_text, text) in enumerate(MEMO_ROWS):
        sf.write(out / "audio" / f"ref_{speaker}.wav", synth(ref_text, SPEAKERS[speaker]), RATE)
        sf.write(out / "audio" / f"utt_{i}.wav", synth(text, SPEAKERS[speaker]), RATE)
        rows.append({"audio": f"audio/utt_{i}.wav", "text": text, "speaker": speaker,
                     "ref_audio": f"audio/ref_{speaker}.wav", "ref_text": ref_text})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows for _ in range(2)))
    return out


@pytest.fixture(scope="session")
def tiny_judges(tmp_path_factory) -> tuple[Path, Path]:
    root = built_once(tmp_path_factory, "judges", _build_judges)
    return root / "asr", root / "speaker"


def _build_judges(root: Path) -> None:
    """(asr dir, speaker dir): tiny random-weight models of the classes eval.asr_model / eval.speaker_model load
    (WhisperForConditionalGeneration + WhisperProcessor, WavLMForXVector + its feature extractor), saved like the
    hub's. The Whisper decoder's layers are zeroed and its positions wired to JUDGE_HEARS, so its transcript of any
    clip is known; the WavLM keeps random weights and the real x-vector TDNN shape (0.3 s receptive field)."""
    import torch
    from transformers import (GenerationConfig, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector,
                              WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    from ds_train.demo.tiny import _bytes_to_unicode

    asr, speaker = root / "asr", root / "speaker"
    asr.mkdir()
    # A byte-level Whisper tokenizer: token id == byte, then Whisper's specials.
    symbols = _bytes_to_unicode()
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                "<|notimestamps|>"]
    vocab = {**{symbols[b]: b for b in range(256)}, **{t: 256 + i for i, t in enumerate(specials)}}
    (asr / "vocab.json").write_text(json.dumps(vocab))
    (asr / "merges.txt").write_text("#version: 0.2\n")
    eot, sot, notimestamps = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"], vocab["<|notimestamps|>"]
    tokenizer = WhisperTokenizer(str(asr / "vocab.json"), str(asr / "merges.txt"), unk_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(asr)
    torch.manual_seed(0)
    d = 16
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=d, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=d, tie_word_embeddings=False, pad_token_id=eot,
        bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot))
    # Decoder input at position i is one-hot e_i (token embeddings and layer outputs zeroed); the output projection
    # maps e_i to the token wanted after it: <|notimestamps|>, the bytes of JUDGE_HEARS, then end of text.
    wanted = [notimestamps, *JUDGE_HEARS.encode(), *[eot] * (d - 1 - len(JUDGE_HEARS))]
    with torch.no_grad():
        decoder = model.model.decoder
        decoder.embed_tokens.weight.zero_()
        decoder.embed_positions.weight.copy_(torch.eye(d))
        for layer in decoder.layers:
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        model.proj_out.weight.zero_()
        for position, token in enumerate(wanted):
            model.proj_out.weight[token, position] = 10.0
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                                               max_length=d, no_timestamps_token_id=notimestamps,
                                               is_multilingual=False)
    model.save_pretrained(asr)
    torch.manual_seed(1)
    WavLMForXVector(WavLMConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16, 16, 16, 32),
        xvector_output_dim=16)).save_pretrained(speaker)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(speaker)


@pytest.fixture(scope="session")
def memorised_run(tiny_model, tiny_judges, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a 2-rank ZeRO-3 run that memorises the MEMO_ROWS sample (trained on both ranks in every step),
    with an audio sample of it generated at the end of training (eval.samples=1: there is no eval set, so the first
    training sample) and judged by tiny_judges, merged/ for Boson's serve engine, curves.png, and the run's final
    summary line in ../summary.json.

    The DeepSpeed config is ds_configs/zero3.json with the persistence threshold at 1e5 elements (it ships 1e6, which
    keeps every tensor of the tiny model whole): LoRA, layer weights and norms stay whole on every rank, so decoding
    does not re-gather them at every step, while the audio embedding and heads (0.5M each) are partitioned and
    gathered at every forward of training and of generation."""
    def build(root: Path) -> None:
        data = write_memo_data(root / "data")
        asr, speaker = tiny_judges
        cfg = base_config(tiny_model, data, root / "run", lora=MEMO_LORA, train={"max_steps": MEMO_STEPS},
                          optim={"lr": 0.005, "warmup_steps": 0, "scheduler": "constant"},
                          checkpoint={"keep_last": 1, "merge": True, "best_metric": "wer"},
                          eval={"samples": 1, "samples_max_frames": 16, "asr_model": str(asr),
                                "speaker_model": str(speaker)})
        ds_config = json.loads((REPO / "ds_configs/zero3.json").read_text())
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 100_000
        (root / "zero3.json").write_text(json.dumps(ds_config))
        cfg["train"]["deepspeed_config"] = str(root / "zero3.json")
        proc = launch(["train", str(write_config(root / "run.yaml", cfg))])
        (root / "summary.json").write_text(
            [ln for ln in proc.stdout.splitlines() if ln.startswith('{"first_loss"')][-1])

    return built_once(tmp_path_factory, "memorised", build) / "run"


ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]

# The reference run the resume, preemption and crash tests of test_checkpoint.py and test_resilience.py reproduce:
# 8 samples / 2 ranks = 4 steps per epoch, so 12 steps cross two epoch boundaries (steps 4 and 8); a cosine
# schedule with warmup changes the learning rate at every step; LoRA dropout draws from every rank's torch RNG at
# every forward, so equal losses after a resume need each rank's RNG restored exactly.
REF_STEPS = 12


def reference_config(tiny_model: Path, demo_data: Path, out: Path, **sections) -> Path:
    """The reference run's config file for OUTPUT_DIR `out` (written beside it); `sections` update it."""
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": REF_STEPS, "epochs": 99},
                      lora={"r": 8, "alpha": 16, "dropout": 0.3},
                      optim={"lr": 0.005, "warmup_steps": 2, "scheduler": "cosine"},
                      checkpoint={"every_steps": 2, "keep_last": 20})
    for section, values in sections.items():
        cfg[section].update(values)
    return write_config(out.parent / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="session")
def reference_run(tiny_model, demo_data, tmp_path_factory) -> Path:
    """OUTPUT_DIR of one uninterrupted reference run: a checkpoint every 2 steps, all kept. Read it, never write
    into it (copy it first)."""
    def build(root: Path) -> None:
        launch(["train", str(reference_config(tiny_model, demo_data, root / "run"))])

    return built_once(tmp_path_factory, "reference", build) / "run"


# A plain run shared by tests of test_recovery.py and test_train.py that each need an uninterrupted 2-rank run of it:
# no LoRA dropout (so 1 process x grad_accum 2 and activation checkpointing reproduce it exactly), a linear schedule
# with warmup (the learning rate differs at every step), 6 steps of 4 per epoch (step 5 starts epoch 2), a
# checkpoint every 2 steps (step-000002, -4, -6 = latest), and an evaluation of EVAL3 (3 samples: on 2 ranks, rank 1
# has one micro-batch fewer) at step 0 and at the end.
PLAIN_STEPS = 6


@pytest.fixture(scope="session")
def eval3(demo_data, tmp_path_factory) -> Path:
    """EVAL3: a 3-sample eval manifest, the demo's 2 eval rows and its first training row."""
    def build(root: Path) -> None:
        (root / "audio").symlink_to(demo_data / "audio")  # the rows' relative audio paths resolve from here
        rows = (demo_data / "eval.jsonl").read_text().splitlines()
        rows += (demo_data / "train.jsonl").read_text().splitlines()[:1]
        (root / "eval3.jsonl").write_text("\n".join(rows) + "\n")

    return built_once(tmp_path_factory, "eval3", build) / "eval3.jsonl"


def plain_config(tiny_model: Path, demo_data: Path, eval_file: Path, out: Path, **sections) -> Path:
    """The plain run's config file for OUTPUT_DIR `out` (written beside it); `sections` update it."""
    cfg = base_config(tiny_model, demo_data, out,
                      data={"train_file": str(demo_data / "train.jsonl"), "eval_file": str(eval_file)},
                      train={"max_steps": PLAIN_STEPS, "epochs": 9, "eval_on_start": True},
                      optim={"lr": 0.01, "scheduler": "linear", "warmup_steps": 2},
                      checkpoint={"every_steps": 2, "keep_last": 10})
    for section, values in sections.items():
        cfg[section].update(values)
    return write_config(out.parent / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="session")
def plain_run(tiny_model, demo_data, eval3, tmp_path_factory) -> Path:
    """OUTPUT_DIR of the plain run on 2 ranks. Read it, never write into it (copy it first)."""
    def build(root: Path) -> None:
        launch(["train", str(plain_config(tiny_model, demo_data, eval3, root / "run"))])

    return built_once(tmp_path_factory, "plain", build) / "run"


OFFLOAD = str(REPO / "ds_configs/zero3_offload.json")


@pytest.fixture(scope="session")
def plain_offload_run(tiny_model, demo_data, eval3, tmp_path_factory) -> Path:
    """The plain run with ds_configs/zero3_offload.json (parameters and DeepSpeedCPUAdam's state on the host; its
    C++ op is JIT-built into ~/.cache/torch_extensions by the first run that needs it, ~90 s on a 2-core box). Read
    it, never write into it (copy it first)."""
    def build(root: Path) -> None:
        offload = {"deepspeed_config": OFFLOAD}
        launch(["train", str(plain_config(tiny_model, demo_data, eval3, root / "run", train=offload))])

    return built_once(tmp_path_factory, "plain_offload", build) / "run"


# Non-finite steps on the reference config (test_resilience.py, and the learning-rate check of test_train.py).
NON_FINITE_FAULTS = "nan_loss:3:1,nan_loss:5,nan_loss:6,nan_loss:7"


@pytest.fixture(scope="session")
def non_finite_run(tiny_model, demo_data, tmp_path_factory):
    """The reference config with a checkpoint after every step and train.max_consecutive_skips=3. Rank 1 alone gets
    a NaN loss at step 3; both ranks at steps 5, 6 and 7, the third in a row, so the run stops after step 7.
    Returns (OUTPUT_DIR, the launcher's CompletedProcess)."""
    def build(root: Path) -> None:
        config = reference_config(tiny_model, demo_data, root / "run", train={"max_consecutive_skips": 3},
                                  checkpoint={"every_steps": 1, "keep_last": 100})
        proc = launch(["train", str(config)], env={"DS_TRAIN_FAULT": NON_FINITE_FAULTS}, check=False)
        (root / "launch.json").write_text(json.dumps([proc.args, proc.returncode, proc.stdout, proc.stderr]))

    root = built_once(tmp_path_factory, "non_finite", build)
    return root / "run", subprocess.CompletedProcess(*json.loads((root / "launch.json").read_text()))


def assert_same_run(out: Path, reference: Path) -> None:
    """Every step logged once, the reference's losses and learning rates, a bit-equal final adapter."""
    got, want = loss_records(out), loss_records(reference)
    assert sorted(got) == sorted(want) == list(range(1, REF_STEPS + 1)), (sorted(got), sorted(want))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), \
            f"step {step}: loss {got[step]['loss']} here, {want[step]['loss']} in the reference"
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12, abs=1e-15), f"step {step}: lr"
    assert_same_adapter(out / "adapter", reference / "adapter")


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file
    import torch

    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:  # bit-equal: same data, same order of operations
        assert torch.equal(ta[k], tb[k]), f"{k}: max difference {(ta[k] - tb[k]).abs().max()}"


def loss_records(out: Path) -> dict[int, dict]:
    """{step: record} of the training-step records; a step logged twice is an error."""
    records = [r for r in read_metrics(out) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{out}: a step logged twice: {steps}"
    return {r["step"]: r for r in records}


def base_config(model_dir: Path, data_dir: Path, out: Path, **sections) -> dict:
    """A small-run config as a dict; `sections` deep-merge over it (e.g. train={"max_steps": 3})."""
    cfg = {
        "model": {"path": str(model_dir), "audio_tokenizer_path": str(model_dir / "audio_tokenizer")},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train_file": str(data_dir / "train.jsonl")},
        "optim": {"lr": 0.005, "warmup_steps": 0, "scheduler": "constant"},
        "train": {"output_dir": str(out), "deepspeed_config": str(REPO / "ds_configs/zero3_partition_all.json"),
                  "micro_batch_size": 1, "grad_accum": 1, "epochs": 1, "log_every": 1},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nprocs: int = 2, env: dict | None = None, timeout: int = 600,
           check: bool = True, module: str = "ds_train") -> subprocess.CompletedProcess:
    """DeepSpeed's per-node launcher (`python -m deepspeed.launcher.launch`), as the `deepspeed` command runs it on a
    single node, starting N real processes of `python -m MODULE ARGS`. Started directly, not through the `deepspeed`
    command: that front end only computes the world info below and waits, and it would cost every launch one more
    process that imports torch and DeepSpeed (~2.5 s on this box). run.sh's tests go through the command."""
    from deepspeed.launcher.runner import encode_world_info

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_SIZE": str(nprocs), "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    world_info = encode_world_info({"localhost": list(range(nprocs))})
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--no_local_rank", "--module", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def ds_train(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m ds_train ARGS` in one process (no launcher)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ds_train", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


# Small runs of the settings a real run uses and the reference does not: the shipped DeepSpeed configs, token-budget
# micro-batches, DataLoader workers, evaluation with keep_best. A checkpoint and an evaluation after every step,
# keep_last=1 (3 in bf16, below) and keep_best=2. The demo's merged lengths are 187-234 tokens: a budget of 700
# makes micro-batches of 1-3 samples (233 x 3 = 699 fits, 234 x 3 does not).
SETTINGS_STEPS = 4
SETTINGS_MAX_TOKENS = 700
# Every file in ds_configs/ has a settings run named after it (so a new file cannot ship untrained); zero3.json's
# runs with 2 DataLoader workers, and "zero3_inline" is the same run without workers. The runs of the base config
# (zero3_partition_all.json) and of the offload config train in bf16, the dtype a GPU run takes by default
# (test_bf16.py reads their checkpoints); the others in fp32.
DS_CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
BF16_SETTINGS = ("zero3_partition_all", "zero3_offload")
SETTINGS_RUNS = {  # name: (file in ds_configs/, data.num_workers)
    **{Path(name).stem: (name, 2 if name == "zero3.json" else 0) for name in DS_CONFIGS},
    "zero3_inline": ("zero3.json", 0),
}


def settings_config(tiny_model: Path, demo_data: Path, out: Path, name: str) -> Path:
    ds_json, workers = SETTINGS_RUNS[name]
    data = {"train_file": str(demo_data / "train.jsonl"), "eval_file": str(demo_data / "eval.jsonl"),
            "max_tokens": SETTINGS_MAX_TOKENS, "num_workers": workers}
    if workers:
        data["persistent_workers"] = True
    cfg = base_config(tiny_model, demo_data, out, data=data,
                      train={"max_steps": SETTINGS_STEPS, "epochs": 99, "eval_every": 1,
                             "deepspeed_config": str(REPO / "ds_configs" / ds_json)},
                      optim={"lr": 0.01, "warmup_steps": 0, "scheduler": "constant"},
                      checkpoint={"every_steps": 1, "keep_last": 1, "keep_best": 2})
    if name in BF16_SETTINGS:
        # keep_last=3: test_checkpoint.py resumes from step 2, where a DeepSpeedCPUAdam rebuilt at a checkpoint took
        # step 3 other than the uninterrupted run in the last bit (fp32 0.999^3) before checkpoint.load stepped it
        # through.
        cfg["model"]["dtype"], cfg["checkpoint"]["keep_last"] = "bf16", 3
    return write_config(out.parent / f"{name}.yaml", cfg)


class _SettingsRuns(dict):
    """name -> OUTPUT_DIR; each run is launched the first time a test asks for it."""

    def __init__(self, tiny_model: Path, demo_data: Path, tmp_path_factory):
        super().__init__()
        self.tiny_model, self.demo_data, self.tmp_path_factory = tiny_model, demo_data, tmp_path_factory

    def __missing__(self, name: str) -> Path:
        def build(root: Path) -> None:
            launch(["train", str(settings_config(self.tiny_model, self.demo_data, root / name, name))])

        self[name] = built_once(self.tmp_path_factory, f"settings_runs/{name}", build) / name
        return self[name]


@pytest.fixture(scope="session")
def settings_runs(tiny_model, demo_data, tmp_path_factory) -> _SettingsRuns:
    return _SettingsRuns(tiny_model, demo_data, tmp_path_factory)
