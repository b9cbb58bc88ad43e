"""ds_train/dpo.py and ds_train/data/pairs.py: the DPO loss against a brute-force computation in fp64 on the tiny
model, the pairs file's checks, a 2-rank DeepSpeed run that learns an oracle preference and gives the losses of a
1-rank run, and DPO from the memorised run that turns greedy generation through Boson's serve engine to the chosen
clip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ds_train.config import load_config
from ds_train.errors import ConfigError, DataError
from conftest import MEMO_LORA, base_config, launch, loss_records, write_config

IGNORE = -100
BETA = 0.5
BF16_REL = 1e-4  # a clip's log-likelihood (a sum of ~3000 terms) from the bf16 tiny model vs the fp64 one: <= 1.7e-5


def write_pairs(demo_data: Path, out: Path, shift: int = 1, prompts=range(8)) -> Path:
    """A pairs file over the demo's prompts (rows `prompts` of its 8, in that order): chosen is each prompt's own
    clip (A), rejected the clip of the prompt `shift` rows on (B); absolute audio paths except a relative chosen path
    for row 0 (resolved against the pairs file)."""
    rows = [json.loads(line) for line in (demo_data / "train.jsonl").read_text().splitlines()]
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "audio").symlink_to(demo_data / "audio")
    pairs = []
    for i in prompts:
        row = rows[i]
        prompt = {k: (str(demo_data / v) if k == "ref_audio" else v) for k, v in row.items() if k != "audio"}
        chosen = row["audio"] if i == 0 else str(demo_data / row["audio"])
        pairs.append({**prompt, "chosen": chosen, "rejected": str(demo_data / rows[(i + shift) % len(rows)]["audio"])})
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out


def dpo_overrides(model_dir: Path, pairs: Path, out: Path) -> list[str]:
    return [f"model.path={model_dir}", f"model.audio_tokenizer_path={model_dir}/audio_tokenizer",
            f"data.pairs_file={pairs}", "train.objective=dpo", f"train.output_dir={out}", f"loss.dpo_beta={BETA}"]


def test_config_rules(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    base = dpo_overrides(tiny_model, pairs, tmp_path / "out")
    cfg = load_config(None, base)
    assert cfg.train.objective == "dpo" and cfg.data.train_file is None
    assert cfg.data.manifests() == [(str(tmp_path / ".ds_train_cache" / "pairs.pairs.jsonl"), 1.0)]
    assert load_config(None, base[:2] + [f"data.train_file={pairs}", f"train.output_dir={tmp_path}"]) \
        .train.objective == "sft"
    # the reference policy is the model as built (ds_train.dpo.reference_table), whatever trains
    for extra in (["train.mode=full"], [f"lora.init_from={tmp_path}"],
                  ["lora.modules_to_save=[audio_decoder_proj.audio_lm_head]"]):
        assert load_config(None, base + extra).train.objective == "dpo"
    for extra, message in [([f"data.train_file={pairs}"], "unset data.train_file"),
                           (["data.eval_split=0.2"], "data.eval_split"),
                           (["data.format=hf"], "data.format=hf"),
                           (["loss.dpo_beta=0"], "loss.dpo_beta"),
                           (["train.objective=sft"], "set both or neither")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + extra)


def test_bad_pair_names_its_line(tiny_model, demo_data, tmp_path):
    from ds_train.data.pairs import write_pairs_manifest

    pairs = write_pairs(demo_data, tmp_path / "p" / "pairs.jsonl")
    lines = pairs.read_text().splitlines()
    good = json.loads(lines[1])
    lines[1] = json.dumps({**good, "rejected": good["chosen"]})
    lines[3] = json.dumps({k: v for k, v in good.items() if k != "rejected"})
    lines[4] = "{not json"
    pairs.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, dpo_overrides(tiny_model, pairs, tmp_path / "out"))
    with pytest.raises(DataError) as e:
        write_pairs_manifest(cfg)
    assert [b["source"] for b in e.value.bad] == ["pairs.jsonl:2", "pairs.jsonl:4", "pairs.jsonl:5"]
    assert "same clip" in e.value.bad[0]["reason"] and "'rejected'" in e.value.bad[1]["reason"]
    cfg = load_config(None, dpo_overrides(tiny_model, pairs, tmp_path / "out") + ["data.skip_bad=true"])
    rows = [json.loads(line) for line in write_pairs_manifest(cfg).read_text().splitlines()]
    assert [(r["pair"], r["role"]) for r in rows[:4]] == [("pairs.jsonl:1", "chosen"), ("pairs.jsonl:1", "rejected"),
                                                          ("pairs.jsonl:3", "chosen"), ("pairs.jsonl:3", "rejected")]
    assert rows[0]["audio"] == str(tmp_path / "p" / "audio" / "utt_0000.wav")  # relative: from the pairs file's dir


@pytest.mark.slow
def test_a_bad_pair_stops_every_rank(tiny_model, demo_data, tmp_path):
    """2 ranks: rank 0 alone reads the pairs file; its verdict on a bad record stops both with the file:line report
    (exit code 3, printed once), before any audio is encoded."""
    from ds_train.errors import EXIT_DATA

    pairs = write_pairs(demo_data, tmp_path / "p" / "pairs.jsonl", prompts=range(3))
    pairs.write_text(pairs.read_text() + "{not json\n")
    cfg = base_config(tiny_model, demo_data, tmp_path / "out", train={"objective": "dpo"},
                      data={"pairs_file": str(pairs), "cache_dir": str(tmp_path / "cache")})
    del cfg["data"]["train_file"]
    failed = launch(["prepare", str(write_config(tmp_path / "bad.yaml", cfg))], nprocs=2, check=False)
    logs = failed.stdout + failed.stderr
    assert failed.returncode == EXIT_DATA, logs[-3000:]
    assert logs.count(f"1 bad sample(s) in {pairs}:\n  pairs.jsonl:4: invalid JSON") == 1, logs[-3000:]
    assert not (tmp_path / "cache").exists()


def _sample_logp_brute(model, collate, sample) -> float:
    """log p(target audio | prompt) of one sample in its own forward: every audio-out segment on its own, position
    by position, label j + 1 scored by the logits at j, in fp64 (Boson's forward rounds audio logits to fp32)."""
    batch = collate([sample])
    with torch.no_grad():
        out = model(**batch.inputs)
    starts = batch.inputs["audio_out_ids_start"].tolist()
    ends = starts[1:] + [batch.label_audio_ids.shape[1]]
    total = 0.0
    for start, end in zip(starts, ends):
        for j in range(start, end - 1):
            for k in range(batch.label_audio_ids.shape[0]):
                target = int(batch.label_audio_ids[k, j + 1])
                if target != IGNORE:
                    total += torch.log_softmax(out.audio_logits[j, k].double(), -1)[target].item()
    return total


def test_dpo_loss_matches_brute_force(tiny_model, demo_data, tmp_path):
    """The batched DPO terms of two pairs (one micro-batch, padded, chosen/rejected interleaved) equal the formula
    evaluated on separate forwards of each clip, with the policy (LoRA, random non-zero B) and the reference (a
    freshly loaded base model, no LoRA). The reference pre-pass gives the brute-force log-likelihoods of the model it
    is handed: the base (a fresh LoRA's reference) or the LoRA model (lora.init_from's), saved and loaded back for
    that model only. A micro-batch whose forward trains other positions than the collator counted stops the DPO step
    as it stops the SFT one (train.check_counts). bf16 takes the same path: the pre-pass, fp64 sums and the step."""
    from types import SimpleNamespace

    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.data.cache import CachedDataset, cache_dirs
    from ds_train.data.collate import Collate, make_collator
    from ds_train.data.pairs import PairSampler, pair_indices
    from ds_train.data.prepare import prepare_all
    from ds_train.dpo import Dpo, pair_terms, reference_table, sample_logps
    from ds_train.loss import loss_sums
    from ds_train.model import apply_lora
    from ds_train.preflight import load_model_config, load_text_tokenizer
    from ds_train.train import train_step
    from test_train import _Engine

    pairs = write_pairs(demo_data, tmp_path / "p" / "pairs.jsonl", shift=3, prompts=range(3))
    cfg = load_config(None, dpo_overrides(tiny_model, pairs, tmp_path / "out"))
    mc = load_model_config(str(tiny_model))
    prepare_all(cfg, load_text_tokenizer(cfg, mc))
    ds = CachedDataset(cache_dirs(cfg)[0][0], mc)
    chosen, rejected, orphans = pair_indices(ds.record_numbers())
    assert (len(chosen), orphans) == (3, 0) and ds.source(int(rejected[2])) == "pairs.pairs.jsonl:6"
    indices = [int(i) for p in (1, 2) for i in (chosen[p], rejected[p])]
    collate = Collate(make_collator(mc), pairs=True)
    batch = collate([(i, ds[i]) for i in indices])  # fresh samples for every collate
    assert batch.indices.tolist() == indices

    torch.manual_seed(0)
    policy_model = apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)), cfg).double().eval()
    for name, p in policy_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    base = HiggsAudioModel.from_pretrained(str(tiny_model)).double().eval()

    with torch.no_grad():
        outputs = policy_model(**batch.inputs)
        policy = sample_logps(outputs, batch)
    data = SimpleNamespace(train_set=ds, sampler=PairSampler(chosen, rejected, ds.lengths, 0, 1, 1, seed=0),
                           loader=SimpleNamespace(collate_fn=collate))
    out = tmp_path / "out"
    out.mkdir()
    table = reference_table(base, data, cfg, out, "fp64")
    reference = table[batch.indices]
    terms = pair_terms(policy, reference, BETA)

    plain = Collate(make_collator(mc))
    brute_policy = [_sample_logp_brute(policy_model, plain, ds[i]) for i in indices]
    brute_ref = [_sample_logp_brute(base, plain, ds[i]) for i in indices]
    # fp32 cross-entropies (the logits' precision) summed in fp64: ~1e-5 absolute on sums of ~3000 terms
    assert reference.tolist() == pytest.approx(brute_ref, rel=1e-7)
    assert policy.tolist() == pytest.approx(brute_policy, rel=1e-7)
    assert abs(policy[0] - reference[0]) > 0.1  # the adapter changes the model: the test can fail
    for i in range(2):
        c = BETA * (brute_policy[2 * i] - brute_ref[2 * i])
        r = BETA * (brute_policy[2 * i + 1] - brute_ref[2 * i + 1])
        assert terms.chosen_reward[i].item() == pytest.approx(c, abs=1e-4)
        assert terms.rejected_reward[i].item() == pytest.approx(r, abs=1e-4)
        assert terms.loss[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(c - r)))), abs=1e-4)
    assert torch.equal(reference_table(None, data, cfg, out, "fp64"), table)  # saved and loaded: no engine needed
    # lora.init_from: the reference is the starting adapter's model (the saved table, the base's, is not taken).
    init_cfg = load_config(None, dpo_overrides(tiny_model, pairs, out) + [f"lora.init_from={tmp_path}"])
    started = reference_table(policy_model, data, init_cfg, out, "fp64")
    assert started[batch.indices].tolist() == pytest.approx(brute_policy, rel=1e-7)
    # The SFT term's labels and counts are the chosen clips': those of a batch of the chosen samples alone.
    from ds_train.data.collate import chosen_only

    alone = plain([ds[indices[0]], ds[indices[2]]])
    assert batch.counts.tolist() == alone.counts.tolist()
    assert loss_sums(outputs, chosen_only(batch.label_audio_ids, batch.audio_owner)).counts.tolist() == \
        alone.counts.tolist()
    # bf16 takes the same path (reference pre-pass, sums, train_step): the bf16 model's log-likelihoods come back in
    # fp64, within bf16's precision of the fp64 model's, and its DPO step's loss is pair_terms of those numbers.
    import copy

    low_model = copy.deepcopy(policy_model).to(torch.bfloat16).eval()
    with torch.no_grad():
        low = sample_logps(low_model(**batch.inputs), batch)
    (tmp_path / "out_bf16").mkdir()
    low_table = reference_table(low_model, data, init_cfg, tmp_path / "out_bf16", "bf16")
    assert low.dtype == low_table.dtype == torch.float64
    assert low.tolist() == pytest.approx(brute_policy, rel=BF16_REL)
    assert low_table[batch.indices].tolist() == pytest.approx(low.tolist(), rel=1e-9)
    low_engine = _Engine(low_model.eval())  # reference_table left it in train mode
    low_engine.train = lambda: None
    low_run = SimpleNamespace(cfg=init_cfg, engine=low_engine, state={"step": 6}, objective=Dpo(init_cfg, low_table))
    stepped = train_step(low_run, [batch]).loss
    low_terms = pair_terms(low, low_table[batch.indices], BETA)
    assert math.isfinite(stepped.dpo_loss) and stepped.dpo_loss == pytest.approx(low_terms.loss.mean().item(),
                                                                                 rel=1e-6)
    # The DPO step is train.train_step's: its counts are checked. One text label hidden after collation.
    engine = _Engine(policy_model.eval())  # reference_table left it in train mode
    engine.train = lambda: None  # stays in eval mode: no LoRA dropout, the forward above
    run = SimpleNamespace(cfg=cfg, engine=engine, state={"step": 6}, objective=Dpo(cfg, table))
    result = train_step(run, [batch])
    assert result.loss.dpo_loss == pytest.approx(terms.loss.mean().item(), rel=1e-6)
    labels = batch.inputs["label_ids"]
    labels[0, int((labels[0] != -100).nonzero()[-1])] = -100
    with pytest.raises(RuntimeError, match=r"step 7: the forward trained other positions than the collator counted "
                                           r"\(text: off by 1 of \d+\)"):
        train_step(run, [batch])


def starting_adapter(tiny_model, out: Path) -> Path:
    """A LoRA adapter of base_config's shape with random non-zero B (the model it makes is not the base), for
    lora.init_from."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.adapter import export_adapter
    from ds_train.model import apply_lora

    torch.manual_seed(1)
    cfg = load_config(None, [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
                             "data.train_file=unused.jsonl", f"train.output_dir={out}", "lora.r=8", "lora.alpha=16"])
    model = apply_lora(HiggsAudioModel.from_pretrained(str(tiny_model)), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    export_adapter(model, out)
    return out


def _dpo_run(tiny_model, demo_data, pairs: Path, root: Path, nprocs: int, accum: int, resume: str = "none",
             init_from: Path = None) -> tuple[Path, str]:
    root.mkdir(parents=True, exist_ok=True)
    out = root / "run"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": STEPS, "epochs": 99, "objective": "dpo",
                                                         "grad_accum": accum, "resume": resume},
                      optim={"lr": LR, "warmup_steps": 0, "scheduler": "constant"},
                      loss={"dpo_beta": BETA, "dpo_sft_weight": 0.1},
                      checkpoint={"every_steps": 3, "keep_last": 5})
    cfg["data"] = {"pairs_file": str(pairs), "eval_file": str(demo_data / "eval.jsonl")}
    cfg["lora"]["init_from"] = str(init_from)
    proc = launch(["train", str(write_config(root / "run.yaml", cfg))], nprocs=nprocs)
    assert resume == "none" or f"resumed from {out / 'checkpoints' / 'step-000003'} at step 3" in proc.stdout
    return out, proc.stdout


STEPS, LR = 8, 0.005


@pytest.mark.slow
def test_dpo_learns_the_oracle_preference_the_same_on_1_and_2_ranks(tiny_model, demo_data, tmp_path):
    """From a lora.init_from adapter (not the identity), chosen = each prompt's own clip, rejected = another
    prompt's: DPO must come to prefer the chosen one (accuracy 1, a growing margin: log p(A) - log p(B) grows by
    margin / beta, the reference, the starting adapter's model, being fixed), the eval loss keeps being logged,
    1 rank x 2 accumulation steps gives the losses of 2 ranks, and a run resumed from step 3 (the middle of epoch 2:
    2 steps per epoch) gives the uninterrupted run's losses and adapter, with the reference log-likelihoods the first
    launch saved. A relaunch does not expand the pairs file again."""
    from conftest import assert_same_adapter
    from test_checkpoint import rewind

    # Two prompts, each pair twice (2 pairs a step): a preference the tiny model can learn in a few steps (its
    # clips are memorisable, not generalisable: different prompts at every step teach it nothing in 8 steps).
    pairs = write_pairs(demo_data, tmp_path / "data" / "pairs.jsonl", prompts=[0, 2, 0, 2])
    start = starting_adapter(tiny_model, tmp_path / "start")
    two, log = _dpo_run(tiny_model, demo_data, pairs, tmp_path / "two", nprocs=2, accum=1, init_from=start)
    assert f"pairs: expanded 4 pair(s) of {pairs}" in log
    assert "dpo: reference log-likelihoods of 4 pair(s) computed" in log and "(4 forward(s) over 2 rank(s))" in log
    one, log = _dpo_run(tiny_model, demo_data, pairs, tmp_path / "one", nprocs=1, accum=2, init_from=start)
    assert "(4 forward(s) over 1 rank(s))" in log
    rewind(two, tmp_path / "resumed" / "run", 3)
    resumed, again_log = _dpo_run(tiny_model, demo_data, pairs, tmp_path / "resumed", nprocs=2, accum=1,
                                  resume="auto", init_from=start)
    assert f"dpo: reference log-likelihoods of 4 pair(s) loaded from {resumed / 'dpo_reference.npz'}" in again_log
    for relaunch in (log, again_log):  # the pairs file is not read again: rank 0 trusts the manifest's stamp
        assert "pairs: expanded" not in relaunch and "(4 pair(s), 0 bad)" in relaunch
    records = loss_records(two)
    assert sorted(records) == list(range(1, STEPS + 1))
    first, last = records[1], records[STEPS]
    # the reference is the model as built, the starting adapter's: at step 1 policy = reference
    assert first["dpo_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["dpo_loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert last["dpo_accuracy"] == 1.0 and records[STEPS - 1]["dpo_accuracy"] == 1.0
    assert last["dpo_margin"] > 1.0 and last["dpo_margin"] > records[STEPS // 2]["dpo_margin"] > 0
    assert last["dpo_margin"] == pytest.approx(last["dpo_chosen_reward"] - last["dpo_rejected_reward"])
    assert last["loss"] == pytest.approx(last["dpo_loss"] + 0.1 * last["sft_loss"], rel=1e-6)
    assert any("eval_loss" in r for r in json.loads("[" + ",".join(
        (two / "metrics.jsonl").read_text().splitlines()) + "]"))
    assert (two / "adapter" / "adapter_config.json").is_file() and (two / "curves.png").is_file()
    ones, again = loss_records(one), loss_records(resumed)
    assert sorted(again) == sorted(records)
    for step in records:
        for key in ("loss", "dpo_loss", "dpo_margin", "dpo_accuracy", "sft_loss"):
            assert ones[step][key] == pytest.approx(records[step][key], rel=1e-5, abs=1e-7), (step, key)
            assert again[step][key] == pytest.approx(records[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert_same_adapter(resumed / "adapter", two / "adapter")


def test_report_record_and_console_line():
    from ds_train.dpo import DpoReport
    from ds_train.loss import report
    from ds_train.metrics import console_line

    sft = report([6.0, 8.0, 4.0], [3, 2, 2], 1.0, 1.0)  # text 2, codebooks 4 and 2: audio 3, loss 5
    record = {"step": 3, **DpoReport(0.9, 0.4, 1.5, -0.5, 0.75, sft).as_record()}
    assert record["dpo_margin"] == 2.0 and record["sft_loss"] == 5.0 and record["sft_codebook_losses"] == [4.0, 2.0]
    assert console_line(record, 10, None) == "step 3/10 | loss 0.9000 (dpo 0.4000) | margin 2.000 | accuracy 0.75"
    assert "sft_loss" not in DpoReport(0.4, 0.4, 1.5, -0.5, 0.75, None).as_record()


@pytest.mark.parametrize("mbs,max_tokens", [(2, 0), (1, 900)])
def test_pair_sampler_keeps_pairs_together(mbs, max_tokens):
    """Every rank's micro-batches hold whole pairs, chosen then rejected; over the ranks an epoch covers every complete
    pair once, and samples whose partner is missing (record 5's pair lost line 6) never."""
    import numpy as np

    from ds_train.data.pairs import PairSampler, pair_indices

    lines = np.array([1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])  # record 6 was skipped as bad
    chosen, rejected, orphans = pair_indices(lines)
    assert orphans == 1 and chosen.tolist() == [0, 2, 5, 7, 9, 11, 13, 15]
    lengths = np.arange(100, 100 + 10 * len(lines), 10)
    seen = []
    for rank in range(2):
        sampler = PairSampler(chosen, rejected, lengths, rank, 2, 2, seed=1, micro_batch_size=mbs,
                              max_tokens=max_tokens)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.steps_per_epoch() * 2
        for b in batches:
            assert len(b) % 2 == 0 and [lines[i] % 2 for i in b] == [1, 0] * (len(b) // 2)
            assert all(b[i + 1] == b[i] + 1 for i in range(0, len(b), 2))
            if max_tokens:
                assert max(lengths[b]) * len(b) <= max_tokens
            seen += b
    assert sorted(seen) == sorted(chosen.tolist() + rejected.tolist()) and sampler.dropped() == 0


# The oracle from the memorised run: 32 steps are the fewest measured to make greedy decoding regenerate A exactly
# (20, 24 and 28 give fragments of A or B; 32, 36, 40 and 48 give A); 1.5x that.
ORACLE_STEPS = 48


def _code_match(codes: torch.Tensor, target: torch.Tensor) -> float:
    """The fraction of equal codes, all codebooks, frame by frame over the longer clip (missing frames differ)."""
    n = min(codes.shape[1], target.shape[1])
    return (codes[:, :n] == target[:, :n]).sum().item() / (target.shape[0] * max(codes.shape[1], target.shape[1]))


@pytest.mark.slow
def test_dpo_moves_greedy_generation_from_the_rejected_clip_to_the_chosen(memorised_run, tiny_model, tmp_path):
    """The oracle on the tiny model: the memorised run greedily regenerates its clip B; pairs for the same prompt
    (text, reference audio and text) with chosen A = the same text in another voice and rejected B, DPO from the
    memorised adapter (lora.init_from: the reference is the memorised model), 2 ranks. Preference accuracy reaches 1,
    log p(A) - log p(B) grows, and greedy generation through Boson's serve engine from merged/ turns from B to A.
    With loss.dpo_sft_weight=1, and the DPO term saturates after one step (margin ~400 at beta 0.5, dpo_loss ~0 from
    step 2): the SFT term on A carries the move to A. Pure DPO (weight 0) was measured to move greedy decoding off B
    but not to A: A-match 0 and no EOS after 16 steps at lr 0.005, a B-like clip after 32 steps at lr 0.001."""
    import soundfile as sf

    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    from ds_train.data.cache import CachedDataset, default_cache_dir
    from ds_train.demo.data import RATE, SPEAKERS, synth
    from test_generate import boson_engine, boson_greedy, memo_prompts, target_codes

    data = memorised_run.parent / "data"
    row = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert row["speaker"] != "bass"
    chosen = tmp_path / "audio" / "utt_A.wav"
    chosen.parent.mkdir()
    sf.write(chosen, synth(row["text"], SPEAKERS["bass"]), RATE)
    prompt = {k: (str(data / v) if k == "ref_audio" else v) for k, v in row.items() if k != "audio"}
    pairs = tmp_path / "pairs.jsonl"
    pair = {**prompt, "chosen": str(chosen), "rejected": str(data / row["audio"])}
    pairs.write_text((json.dumps(pair) + "\n") * 2)  # one per rank
    out = tmp_path / "run"
    cfg = base_config(tiny_model, data, out, lora={**MEMO_LORA, "init_from": str(memorised_run / "adapter")},
                      train={"max_steps": ORACLE_STEPS, "epochs": 999, "objective": "dpo",
                             "deepspeed_config": str(memorised_run.parent / "zero3.json")},
                      optim={"lr": 0.005, "warmup_steps": 0, "scheduler": "constant"},
                      loss={"dpo_beta": BETA, "dpo_sft_weight": 1.0}, checkpoint={"keep_last": 1, "merge": True})
    cfg["data"] = {"pairs_file": str(pairs)}
    launch(["train", str(write_config(tmp_path / "run.yaml", cfg))])

    records = loss_records(out)
    assert sorted(records) == list(range(1, ORACLE_STEPS + 1))
    assert records[1]["dpo_margin"] == pytest.approx(0.0, abs=1e-6)  # the reference is the memorised model
    last = records[ORACLE_STEPS]
    assert last["dpo_accuracy"] == 1.0 and last["dpo_margin"] > records[2]["dpo_margin"] > 0

    mc = HiggsAudioConfig.from_pretrained(str(tiny_model))
    entries = CachedDataset(default_cache_dir(str(tmp_path / ".ds_train_cache" / "pairs.pairs.jsonl")), mc).entries
    a, b = (e["audio_codes"][:, int(e["audio_starts"][-1]):].long() for e in entries[:2])
    assert torch.equal(b, target_codes(data, tiny_model)[0])  # B is the memorised clip
    prompts = memo_prompts(data)
    match = {}
    for name, model_dir in (("before", memorised_run / "merged"), ("after", out / "merged")):
        (codes, stopped_by_eos), = boson_greedy(boson_engine(model_dir), prompts, a.shape[1] + 10)
        match[name] = {"A": _code_match(codes, a), "B": _code_match(codes, b), "frames": codes.shape[1],
                       "eos": stopped_by_eos}
    print(f"\noracle: steps {ORACLE_STEPS}, dpo_sft_weight 1, beta {BETA}, final margin {last['dpo_margin']:.1f}; "
          f"greedy code match (all codebooks) {match}")
    assert match["before"]["B"] == 1.0 and match["before"]["A"] < 0.1
    assert match["after"]["A"] >= 0.9 and match["after"]["A"] - match["before"]["A"] >= 0.8
    assert match["after"]["B"] < 0.1 and match["after"]["eos"]
