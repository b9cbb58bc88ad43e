"""ds_train/export.py merge and the engine's checkpoint.merge hook: a real 2-rank run trains LoRA on the attention
projections and the DualFFN audio_mlp fully, then writes OUTPUT_DIR/merged; the merged model must compute what
base + adapter computes, load wherever the base model loads, and be byte for byte what peft's merge_and_unload +
save_pretrained write, streamed in one shard's memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds_train.adapter import ADAPTER_WEIGHTS, BASE_TRAINABLE
from ds_train.errors import CheckpointError
from ds_train.merge import MERGE_INFO, merge

from conftest import REPO, free_port

@pytest.fixture(scope="module")
def run(audio_mlp_run) -> Path:
    """A 3-step run with LoRA on attention and audio_mlp trained fully; its merged/ came from checkpoint.merge."""
    return audio_mlp_run


@pytest.fixture(scope="module")
def batch(run, tiny_model, demo_data):
    """A real collated batch of 4 training samples (the prepared cache the run wrote)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    from ds_train.data.cache import CachedDataset
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.cache import default_cache_dir

    config = HiggsAudioConfig.from_pretrained(str(tiny_model))
    dataset = CachedDataset(default_cache_dir(str(demo_data / "train.jsonl")), config)
    collate = Collate(make_collator(config))
    return collate([dataset[i] for i in range(4)]).inputs


def load(path: Path, dtype=torch.float32):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    return HiggsAudioModel.from_pretrained(str(path), torch_dtype=dtype).eval()


def base_plus_adapter(tiny_model: Path, adapter: Path, lora: bool = True, mlp: bool = True):
    """The unmerged reference: base, trained audio_mlp loaded over it, LoRA applied by PEFT."""
    from peft import PeftModel

    model = load(tiny_model)
    if mlp:
        missing, unexpected = model.load_state_dict(load_file(adapter / BASE_TRAINABLE), strict=False)
        assert not unexpected
    return PeftModel.from_pretrained(model, str(adapter)).eval() if lora else model


@torch.no_grad()
def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**batch)
    assert out.logits.numel() and out.audio_logits.numel()
    return out.logits, out.audio_logits


@pytest.mark.slow
def test_merged_model_computes_base_plus_adapter(run, tiny_model, batch):
    merged = load(run / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # the engine merges in fp32 on CPU
    logits, audio_logits = outputs(merged, batch)
    ref_logits, ref_audio = outputs(base_plus_adapter(tiny_model, run / "adapter"), batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(audio_logits, ref_audio, rtol=1e-5, atol=1e-5)
    # Both parts of the adapter matter, so the comparison above would see either one missing.
    for partial in (base_plus_adapter(tiny_model, run / "adapter", lora=False),
                    base_plus_adapter(tiny_model, run / "adapter", mlp=False)):
        _, partial_audio = outputs(partial, batch)
        assert (partial_audio - ref_audio).abs().max() > 1e-3


@pytest.mark.slow
def test_merged_dir_is_a_drop_in_for_the_base(run, tiny_model):
    from transformers import AutoTokenizer

    merged = run / "merged"
    for f in tiny_model.rglob("*"):  # every file of the base except its weights, unchanged
        rel = f.relative_to(tiny_model)
        if f.is_file() and str(rel) not in ("model.safetensors", "config.json", "generation_config.json"):
            assert (merged / rel).read_bytes() == f.read_bytes(), rel
    assert (merged / "generation_config.json").is_file()
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no staging dir left
    base_tok, tok = AutoTokenizer.from_pretrained(str(tiny_model)), AutoTokenizer.from_pretrained(str(merged))
    assert tok.get_vocab() == base_tok.get_vocab()
    model, base = load(merged), load(tiny_model)
    config, base_config_ = model.config.to_dict(), base.config.to_dict()
    config.pop("_name_or_path"), base_config_.pop("_name_or_path")
    assert config == base_config_
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in base.named_parameters())


@pytest.mark.slow
def test_serve_engine_generates_from_merged_dir_what_base_plus_adapter_generates(run, tiny_model):
    """Boson's serve engine, constructed from the merged dir's path as a user constructs it, decodes greedily the
    same audio codes as base + adapter applied in memory (ds_train.generate.load_engine: LoRA by PEFT, audio_mlp
    loaded over the base), the same prompt through the same HiggsAudioServeEngine.generate. The base alone decodes
    other codes, so the comparison sees the adapter."""
    from boson_multimodal.data_types import ChatMLSample, Message
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from ds_train.data.audio import _local_semantic_teacher
    from ds_train.generate import load_engine

    merged = run / "merged"
    # The tiny audio tokenizer ships its semantic teacher; boson would otherwise fetch it from the hub.
    with _local_semantic_teacher(str(merged / "audio_tokenizer" / "semantic_model")):
        engine = HiggsAudioServeEngine(str(merged), str(merged / "audio_tokenizer"), device="cpu",
                                       torch_dtype=torch.float32, kv_cache_lengths=[256])
    sample = ChatMLSample(messages=[Message(role="system", content="Generate audio following instruction."),
                                    Message(role="user", content="the quick brown fox")])

    def greedy(engine) -> torch.Tensor:  # (codebooks, steps) as generated, delay pattern and stream BOS/EOS kept
        response = engine.generate(sample, max_new_tokens=24, temperature=0.0, ras_win_len=0, force_audio_gen=True,
                                   seed=0)
        return torch.from_numpy(response.generated_audio_tokens)

    codes = greedy(engine)
    reference = greedy(load_engine(str(tiny_model), str(run / "adapter"), device="cpu", dtype="fp32"))
    base = greedy(load_engine(str(tiny_model), device="cpu", dtype="fp32"))
    assert codes.shape[0] == 8 and codes.shape[1] >= 12, codes.shape  # frames, not a stream closed at once
    assert len(codes.unique()) > 2  # more than the stream BOS/EOS and one code
    assert torch.equal(codes, reference), (codes, reference)
    assert not torch.equal(codes, base)


@pytest.mark.slow
def test_bf16_sharded_merge(run, tiny_model, tmp_path):
    out = merge(tiny_model, run / "adapter", tmp_path / "merged", "bf16", max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    model = load(out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = dict(load(run / "merged").named_parameters())
    for name, p in model.named_parameters():  # merged in fp32, rounded once
        assert p.dtype == torch.bfloat16 and torch.equal(p, fp32[name].to(torch.bfloat16)), name
    assert json.loads((out / MERGE_INFO).read_text())["dtype"] == "bf16"


@pytest.mark.slow
def test_failed_merge_leaves_nothing(run, tiny_model, tmp_path):
    adapter = shutil.copytree(run / "adapter", tmp_path / "adapter")
    weights = load_file(adapter / ADAPTER_WEIGHTS)
    renamed = {k.replace("layers.0.", "layers.9."): v for k, v in weights.items()}  # no such layer in the base
    save_file(renamed, str(adapter / ADAPTER_WEIGHTS))
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(CheckpointError, match="does not fit the base model"):
        merge(tiny_model, adapter, parent / "merged", "fp32")
    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        merge(tiny_model, adapter, parent / "merged", "fp32")
    assert list(parent.iterdir()) == []


@pytest.mark.slow
def test_output_dir_rules(run, tiny_model, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        merge(tiny_model, run / "adapter", foreign, "fp32")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # An earlier merge output is replaced (a re-run of a finished training run merges again).
    out = merge(tiny_model, run / "adapter", tmp_path / "merged", "bf16")
    merge(tiny_model, run / "adapter", out, "fp32")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "merged"]


def reference_merge(base: Path, adapter: Path, out: Path, dtype: str, max_shard_size: str) -> Path:
    """The merge before it streamed (ds_train/export.py until issue 15), kept as the reference: the base loaded in
    fp32, base_trainable.safetensors copied over it, peft's merge_and_unload(safe_merge=True), cast, save_pretrained,
    the base's other files copied."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.export import load_base_trainable, load_lora
    from ds_train.merge import copy_non_weight_files

    model = HiggsAudioModel.from_pretrained(str(base), torch_dtype=torch.float32)
    if (adapter / BASE_TRAINABLE).is_file():
        load_base_trainable(model, adapter / BASE_TRAINABLE)
    model = load_lora(model, adapter).merge_and_unload(safe_merge=True)
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(
        str(out), safe_serialization=True, max_shard_size=max_shard_size)
    copy_non_weight_files(base, out)
    return out


def assert_same_files(merged: Path, reference: Path) -> None:
    files = sorted(str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file())
    assert files == sorted([MERGE_INFO, *(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())])
    for f in files:
        if f != MERGE_INFO:
            assert (merged / f).read_bytes() == (reference / f).read_bytes(), f


@pytest.fixture(scope="module")
def sharded_tiny(tiny_model, tmp_path_factory) -> Path:
    """tiny_model with its weights in 300 KB shards and model.safetensors.index.json, as large bases ship."""
    from ds_train.merge import copy_non_weight_files

    out = tmp_path_factory.mktemp("sharded_tiny")
    load(tiny_model).save_pretrained(str(out), safe_serialization=True, max_shard_size="300KB")
    copy_non_weight_files(tiny_model, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype,max_shard_size,rslora,sharded", [
    ("fp32", "5GB", False, False), ("bf16", "5GB", False, False), ("bf16", "1MB", False, False),
    ("fp32", "5GB", True, False), ("bf16", "1MB", False, True)])
def test_streamed_merge_is_byte_for_byte_peft_merge(run, tiny_model, sharded_tiny, tmp_path, dtype, max_shard_size,
                                                    rslora, sharded):
    """Every file, weights and index and configs, equals what the fp32 peft merge + save_pretrained wrote. The
    adapter is the run's: LoRA on attention plus the fully trained audio_mlp (base_trainable.safetensors); the
    rslora case rescales the same LoRA by alpha / sqrt(r); the sharded case reads the base from several files."""
    if sharded:
        assert len(list(sharded_tiny.glob("model-*.safetensors"))) > 3
        tiny_model = sharded_tiny
    adapter = run / "adapter"
    if rslora:
        adapter = shutil.copytree(adapter, tmp_path / "adapter")
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    out = merge(tiny_model, adapter, tmp_path / "merged", dtype, max_shard_size=max_shard_size)
    reference = reference_merge(tiny_model, adapter, tmp_path / "reference", dtype, max_shard_size)
    assert (len(list(out.glob("*.safetensors"))) > 1) == (max_shard_size == "1MB")
    assert_same_files(out, reference)
    if rslora:  # the scaling matters: alpha / r would give other bytes
        plain = reference_merge(tiny_model, run / "adapter", tmp_path / "plain", dtype, max_shard_size)
        assert (plain / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_end_of_run_merge_is_byte_for_byte_peft_merge(run, tiny_model, tmp_path):
    """checkpoint.merge (rank 0, after the other ranks left) writes what the peft merge writes from the adapter."""
    assert_same_files(run / "merged", reference_merge(tiny_model, run / "adapter", tmp_path / "reference", "fp32",
                                                      "5GB"))


RSS_PROBE = """
import sys
from ds_train import cli
import boson_multimodal.model.higgs_audio, peft, safetensors.torch  # imported before the baseline

def vm(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

before = vm("VmRSS")
assert cli.main(["merge", *sys.argv[1:]]) == 0
print(vm("VmHWM") - before)
"""


@pytest.mark.slow
def test_merge_memory_is_one_shard_not_the_model(tmp_path):
    """`ds-train merge` of a 71M-parameter base (`make-arch --weights`: 142 MB of bf16 weights) with
    --max-shard-size 20MB: the process grows by less than the bf16 base, where loading it in fp32 took twice that
    (the merge before issue 15 grew 363 MB on this base). Peak RSS (VmHWM) against RSS after the imports."""
    from ds_train.arch import write_random_adapter

    base = tmp_path / "base"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "ds_train", "make-arch", str(REPO / "configs/arch/higgs-v2-3b.json"),
                    str(base), "--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4",
                    "--kv-heads", "2", "--weights"], env=env, check=True, capture_output=True)
    base_bytes = (base / "model.safetensors").stat().st_size  # one file: under the 5GB a shard holds
    assert base_bytes > 140e6
    adapter = write_random_adapter(base, tmp_path / "adapter", ["self_attn.q_proj", "self_attn.v_proj",
                                                                "audio_mlp.down_proj"])
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(base), str(adapter), str(tmp_path / "merged"),
                           "--max-shard-size", "20MB"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    assert growth < base_bytes, f"merge grew {growth / 1e6:.0f} MB for a {base_bytes / 1e6:.0f} MB base"
    # the 65 MB embedding and text head each alone (over 20MB), the other weights in one shard
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) == 3


PEER_PROBE = """
import time
import torch.distributed as td
from ds_train import dist

td.init_process_group("gloo")
dist.leave_peers()
print("alone", flush=True)  # rank 0 only: the peers have exited
time.sleep(5)  # rank 0's merge
print("done", time.time(), flush=True)
dist.leave(0)
"""


def test_peers_leave_before_rank_0_merges_alone():
    """dist.leave_peers, which train.finish calls before checkpoint.merge: rank 0 works 5 s alone after it; rank 1
    has exited 0 by then instead of waiting in a collective for rank 0 (NCCL's watchdog stops a rank that waits
    10 minutes), and rank 0 exits 0 through dist.leave. Two real gloo processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", PEER_PROBE], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out1, err1 = procs[1].communicate(timeout=60)
    rank1_gone = time.time()
    out0, err0 = procs[0].communicate(timeout=60)
    assert procs[1].returncode == 0 and out1 == "", err1[-2000:]
    assert procs[0].returncode == 0, err0[-2000:]
    lines = out0.split()
    assert lines[0] == "alone" and lines[1] == "done" and rank1_gone < float(lines[2]) - 3
