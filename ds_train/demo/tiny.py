"""`ds-train make-tiny OUT_DIR`: a tiny but real-format Higgs Audio checkpoint for tests and the demo.

OUT_DIR/                     loads with HiggsAudioModel.from_pretrained + AutoTokenizer.from_pretrained
  config.json                HiggsAudioConfig: DualFFN on some layers, delay pattern, 8 codebooks x 1024
  model.safetensors
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  audio_tokenizer/           loads with boson's load_higgs_audio_tokenizer (see ds_train.data.audio)
    config.json, model.pth, semantic_model/ (tiny HuBERT standing in for the hub's bosonai/hubert_base)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torchaudio

# Byte-level vocabulary (256) followed by the specials; ids are what config.json names.
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|recipient|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|AUDIO|>",
    "<|AUDIO_OUT|>",
]
SPECIAL_ID = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
VOCAB_SIZE = 272  # 256 bytes + 12 specials, rounded up

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                 vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
TINY_AUDIO_TOKENIZER = dict(n_filters=8, D=8, ratios=[8, 5, 4, 2], sample_rate=16000, bins=1024, n_q=8,
                            codebook_dim=8, semantic_techer="hubert_base_general")


def build_text_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Token id == byte value, so ids are deterministic.
    symbols = _bytes_to_unicode()
    byte_vocab = {symbols[b]: b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>", model_max_length=4096,
    )
    for t, i in SPECIAL_ID.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte->printable-char table that ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_model_config(use_delay_pattern: bool = True):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    return HiggsAudioConfig(
        text_config={"model_type": "llama", **TINY_TEXT},
        audio_adapter_type="dual_ffn",
        audio_dual_ffn_layers=[0, 1],  # layer 2 stays a plain Llama layer: `mlp` only, no `audio_mlp`
        audio_ffn_hidden_size=TINY_TEXT["hidden_size"],
        audio_ffn_intermediate_size=TINY_TEXT["intermediate_size"],
        skip_audio_tower=True,
        encode_whisper_embed=False,
        encode_audio_in_tokens=False,
        use_delay_pattern=use_delay_pattern,
        audio_num_codebooks=8,
        audio_codebook_size=1024,
        audio_stream_bos_id=1024,
        audio_stream_eos_id=1025,
        audio_in_token_idx=SPECIAL_ID["<|AUDIO|>"],
        audio_out_token_idx=SPECIAL_ID["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=SPECIAL_ID["<|audio_out_bos|>"],
        audio_eos_token_id=SPECIAL_ID["<|audio_eos|>"],
        pad_token_id=SPECIAL_ID["<|end_of_text|>"],
    )


def build_audio_tokenizer(out_dir: Path) -> None:
    """A tiny boson HiggsAudioTokenizer at 16 kHz / 50 Hz, 8 codebooks x 1024, with a bundled tiny HuBERT."""
    from transformers import HubertConfig, HubertModel

    from ds_train.data.audio import _local_semantic_teacher
    import boson_multimodal.audio_processing.higgs_audio_tokenizer as hat

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    # hidden_size stays 768: boson hard-codes the teacher's width; everything else is as small as it goes.
    hubert = HubertModel(HubertConfig(
        hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64, conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
    ))
    hubert.save_pretrained(out_dir / "semantic_model", safe_serialization=True)
    (out_dir / "config.json").write_text(json.dumps(TINY_AUDIO_TOKENIZER, indent=2))
    torch.manual_seed(2)
    with _local_semantic_teacher(str(out_dir / "semantic_model")):
        tok = hat.HiggsAudioTokenizer(**TINY_AUDIO_TOKENIZER, device="cpu")
    # boson's codebooks start empty and are k-means-initialised on the first batch encoded (with an all_gather when
    # a process group exists). A shipped tokenizer is already initialised: do it here, once, on seeded synthetic
    # speech, so later encodes are deterministic and never issue a collective.
    from ds_train.data.audio import encode
    from ds_train.demo.data import RATE, SPEAKERS, synth

    primer = np.concatenate([synth("the quick brown fox jumps over a lazy dog " * 2, f0) for f0 in SPEAKERS.values()])
    primer = torchaudio.functional.resample(torch.from_numpy(primer), RATE, tok.sample_rate).numpy()
    torch.manual_seed(3)
    encode(tok.eval(), primer)
    assert all(bool(b.all()) for n, b in tok.named_buffers() if n.endswith(".inited"))
    torch.save(tok.state_dict(), out_dir / "model.pth")


def make_tiny(out_dir: str, use_delay_pattern: bool = True) -> Path:
    """Write the tiny checkpoint to `out_dir` (deterministic: same bytes for the same library versions)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_text_tokenizer().save_pretrained(out)
    torch.manual_seed(0)
    model = HiggsAudioModel(build_model_config(use_delay_pattern))
    model.save_pretrained(out, safe_serialization=True)
    build_audio_tokenizer(out / "audio_tokenizer")
    return out
