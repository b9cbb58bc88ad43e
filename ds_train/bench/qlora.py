"""How far the 4-bit training forward of a qlora adapter is from the model it is merged into (bf16 base + adapter).

`logits_gap` trains the LoRA adapters of a train.mode=qlora model for a few steps (plain torch AdamW, no DeepSpeed:
what is measured is the forward, not the optimizer), writes them as a PEFT adapter, merges that into the bf16 base
with `ds-train merge`'s own function, and compares the logits of the same batch:
- qlora_vs_merged: the 4-bit training forward vs the merged bf16 model (what a user of the merged model gets);
- bf16_lora_vs_merged: the same adapter on the unquantized bf16 base vs the merged model (the merge's own rounding),
so the rest of the first gap is the NF4 quantization of the base.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ds_train.adapter import write_adapter
from ds_train.config import Config
from ds_train.loss import compute_loss

NO_ZERO = {"zero_optimization": {"stage": 0}}


def logits_gap(cfg: Config, batch, work_dir: Path, train_steps: int = 5, lr: float = 1e-3) -> dict:
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.merge import merge
    from ds_train.model import build_model

    dtype = torch.bfloat16
    # full text logits in both models: the merged model has no trained-positions-only head
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, full_text_logits=True))
    torch.manual_seed(cfg.train.seed)
    qlora = build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="qlora")), NO_ZERO, dtype)
    trainable = {n: p for n, p in qlora.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=lr)
    qlora.train()
    losses = []
    for _ in range(train_steps):
        loss = compute_loss(qlora(**batch.inputs), batch.label_audio_ids).total
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    adapter = work_dir / "adapter"
    write_adapter(qlora, {n: p.detach().float() for n, p in trainable.items()}, adapter)
    merged_dir = merge(cfg.model.path, adapter, work_dir / "merged", dtype="bf16")

    logits = {"qlora": _logits(qlora, batch)}
    del qlora
    bf16 = build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="lora"),
                                           lora=dataclasses.replace(cfg.lora, init_from=str(adapter))),
                       NO_ZERO, dtype)
    logits["bf16_lora"] = _logits(bf16, batch)
    del bf16
    logits["merged"] = _logits(HiggsAudioModel.from_pretrained(str(merged_dir), torch_dtype=dtype), batch)
    out = {"train_losses": losses}
    for name in ("qlora", "bf16_lora"):
        for head in ("text", "audio"):
            d = (logits[name][head] - logits["merged"][head]).abs()
            out[f"{name}_vs_merged_{head}"] = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}
    out["logit_scale"] = {h: logits["merged"][h].abs().mean().item() for h in ("text", "audio")}
    return out


@torch.no_grad()
def _logits(model, batch) -> dict:
    model.eval()
    out = model(**batch.inputs)
    return {"text": out.logits.float(), "audio": out.audio_logits.float()}
