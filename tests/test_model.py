"""ds_train/model.py and ds_train/demo/tiny.py on the real boson classes (no DeepSpeed here; see test_train.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ds_train.config import load_config
from ds_train.errors import ConfigError
from ds_train.model import apply_lora, enable_activation_checkpointing
from ds_train.preflight import check_audio_tokenizer, load_model_config, load_text_tokenizer


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.path={model_dir}", f"model.audio_tokenizer_path={model_dir}/audio_tokenizer",
                              "data.train_file=unused.jsonl", "train.output_dir=unused", *extra])


def _lora_modules(model) -> set[str]:
    return {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in model.named_modules()
            if n.endswith(".lora_A")}


def test_default_targets_attention_and_audio_mlp_not_text_mlp(tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model = apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)), _cfg(tiny_model))
    got = _lora_modules(model)
    attn = {f"layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    audio = {f"layers.{i}.audio_mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    assert got == attn | audio  # layer 2 has no audio_mlp (not a DualFFN layer); text mlp untouched


def test_text_mlp_target_does_not_catch_audio_mlp(tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model = apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)),
                       _cfg(tiny_model, "lora.target_modules=[mlp.up_proj]"))
    assert _lora_modules(model) == {f"layers.{i}.mlp.up_proj" for i in range(3)}


def test_unmatched_target_is_an_error(tiny_model):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    with pytest.raises(ConfigError, match=r"\['audio_mlp.w1'\] match no module; available: .*audio_mlp.up_proj"):
        apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)),
                   _cfg(tiny_model, "lora.target_modules=[audio_mlp.w1]"))


def _forward_backward(model_dir, batch_inputs, label_audio_ids, checkpointing: bool):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.loss import compute_loss

    torch.manual_seed(0)
    model = apply_lora(HiggsAudioModel.from_pretrained(str(model_dir)), _cfg(model_dir))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter so gradients flow through both paths
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    if checkpointing:
        enable_activation_checkpointing(model.get_base_model().layers)
    model.train()
    loss = compute_loss(model(**batch_inputs), label_audio_ids)
    loss.total.backward()
    return loss.total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_same_loss_and_grads(tiny_model, demo_data, tmp_path):
    from ds_train.data.cache import CachedDataset
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.prepare import prepare

    cfg = _cfg(tiny_model, f"data.train_file={demo_data}/train.jsonl")
    mc = load_model_config(str(tiny_model))
    tok = load_text_tokenizer(cfg, mc)
    prepare(cfg, cfg.data.train_file, tok, str(tmp_path / "cache"))
    ds = CachedDataset(tmp_path / "cache", mc)
    batch = Collate(make_collator(mc))([ds[0], ds[1]])

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    loss_plain, grads_plain = _forward_backward(tiny_model, batch.inputs, batch.label_audio_ids, False)
    torch.utils.checkpoint.checkpoint, saved = spy, torch.utils.checkpoint.checkpoint
    import ds_train.model as m
    m.checkpoint, saved_m = spy, m.checkpoint
    try:
        loss_ckpt, grads_ckpt = _forward_backward(tiny_model, batch.inputs, batch.label_audio_ids, True)
    finally:
        torch.utils.checkpoint.checkpoint, m.checkpoint = saved, saved_m
    assert len(calls) == 3  # one checkpointed region per decoder layer
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == 36  # A and B of the 18 default targets
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert [n for n, g in grads_plain.items() if not g.abs().sum() > 0] == []  # every adapter gets a gradient


def test_tiny_checkpoint_round_trip(tiny_model, tmp_path):
    """make-tiny writes what the real loaders read, deterministically."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.data.audio import load_audio_tokenizer
    from ds_train.demo.tiny import make_tiny

    mc = load_model_config(str(tiny_model))
    assert mc.audio_adapter_type == "dual_ffn" and mc.audio_dual_ffn_layers == [0, 1]
    assert mc.text_config.num_hidden_layers == 3 and mc.use_delay_pattern and mc.audio_num_codebooks == 8
    assert (mc.audio_codebook_size, mc.audio_stream_bos_id, mc.audio_stream_eos_id) == (1024, 1024, 1025)
    tok = load_text_tokenizer(_cfg(tiny_model), mc)  # checks the Higgs specials sit at the config's ids
    ids = tok.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and len(ids) == 3 + len("user")  # byte-level
    model = HiggsAudioModel.from_pretrained(str(tiny_model))
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    audio_tok = load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))
    assert audio_tok.num_codebooks == 8 and audio_tok.sampling_rate == 16000
    codes = audio_tok.encode(torch.randn(16000).numpy() * 0.1, sr=16000)
    assert codes.shape == (8, 50) and int(codes.max()) < 1024

    again = make_tiny(str(tmp_path / "again"))
    for f in ("model.safetensors", "tokenizer.json", "config.json", "audio_tokenizer/model.pth"):
        assert (again / f).read_bytes() == (tiny_model / f).read_bytes(), f


def test_startup_checks(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="model.path=/no/such/model does not exist"):
        load_model_config("/no/such/model")
    mc = load_model_config(str(tiny_model))

    # A tokenizer without the Higgs audio specials (a plain Llama-style byte tokenizer).
    plain = tmp_path / "plain_tok"
    from ds_train.demo.tiny import build_text_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(plain)
    with pytest.raises(ConfigError, match=r"lacks the Higgs audio special tokens \['<\|AUDIO\|>'"):
        load_text_tokenizer(_cfg(tiny_model, f"model.tokenizer_path={plain}"), mc)
    assert build_text_tokenizer().convert_tokens_to_ids("<|AUDIO_OUT|>") == mc.audio_out_token_idx

    # An audio tokenizer with a different number of codebooks than the model.
    other = tmp_path / "audio_tok_12"
    shutil.copytree(tiny_model / "audio_tokenizer", other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "n_q": 12}))
    with pytest.raises(ConfigError, match="has 12 codebooks but the model has 8"):
        check_audio_tokenizer(_cfg(tiny_model, f"model.audio_tokenizer_path={other}"), mc)
    with pytest.raises(ConfigError, match="does not exist"):
        check_audio_tokenizer(_cfg(tiny_model, "model.audio_tokenizer_path=./missing/tok"), mc)


# ---- lora.modules_to_save: checked at start (the 2-rank run that trains them is in test_adapter.py) ----

def _with_saved(model_dir, *saved, extra=()):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    cfg = _cfg(model_dir, f"lora.modules_to_save=[{','.join(saved)}]", *extra)
    return apply_lora(HiggsAudioModel.from_pretrained(str(model_dir)), cfg)


def test_modules_to_save_train_whole_in_place_beside_lora(tiny_model):
    model = _with_saved(tiny_model, "audio_lm_head", "audio_codebook_embeddings")
    saved = ["audio_codebook_embeddings", "audio_decoder_proj.audio_lm_head"]  # suffixes resolved, sorted
    assert model.peft_config["default"].modules_to_save == saved
    trained = {n.removeprefix("base_model.model.") for n, p in model.named_parameters()
               if p.requires_grad and "lora_" not in n}
    assert trained == {f"{s}.weight" for s in saved}  # in place: no peft wrapper, no copy, names unchanged


@pytest.mark.parametrize("saved, extra, message", [
    (["audio_head"], (), r"'audio_head' matches no module; .*\['audio_codebook_embeddings', "
                         r"'audio_decoder_proj.audio_lm_head', 'audio_decoder_proj.text_lm_head'"),
    (["audio_lm_head"], ("lora.target_modules=[self_attn.q_proj,audio_lm_head]",),
     r"overlaps .*audio_decoder_proj.audio_lm_head / audio_decoder_proj.audio_lm_head"),
    (["audio_decoder_proj"], ("lora.target_modules=[self_attn.q_proj,text_lm_head]",),
     r"overlaps .*audio_decoder_proj / audio_decoder_proj.text_lm_head"),
    (["layers.0.audio_mlp.up_proj"], ("lora.target_modules=[self_attn.q_proj]", "model.train_audio_mlp=true"),
     r"overlaps .*layers.0.audio_mlp.up_proj / layers.0.audio_mlp"),
])
def test_modules_to_save_bad_entries_are_config_errors(tiny_model, saved, extra, message):
    with pytest.raises(ConfigError, match=message):
        _with_saved(tiny_model, *saved, extra=extra)


HEADS = ["embed_tokens", "audio_decoder_proj.text_lm_head", "audio_codebook_embeddings",
         "audio_decoder_proj.audio_lm_head"]


def test_boson_ties_no_head_and_a_tied_module_to_save_is_refused(tiny_model):
    """HiggsAudioConfig says tie_word_embeddings=True, but HiggsAudioModel (boson 0.1.1) has no
    get_output_embeddings, so transformers ties nothing: the four vocab-sized matrices are separate tensors. A
    base that did tie one (here tied by hand) must not be trained as a module to save: that would train both,
    and peft's saved copy would untie them."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    base = HiggsAudioModel.from_pretrained(str(tiny_model))
    assert base.config.tie_word_embeddings
    assert len(list(base.named_parameters(remove_duplicate=False))) == len(list(base.named_parameters()))
    pointers = [base.get_submodule(h).weight.data_ptr() for h in HEADS]
    assert len(set(pointers)) == len(HEADS)
    base.audio_decoder_proj.audio_lm_head.weight = base.audio_codebook_embeddings.weight  # same shape
    with pytest.raises(ConfigError, match=r"'audio_decoder_proj.audio_lm_head': its weight is tied to "
                                          r"audio_codebook_embeddings.weight"):
        apply_lora(base, _cfg(tiny_model, "lora.modules_to_save=[audio_lm_head]"))
