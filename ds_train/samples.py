"""Audio samples during training: what the adapter sounds like at `eval.samples_every` steps and at the end.

Every rank generates every prompt, together: under ZeRO-3 the parameters are partitioned, and gathering them is
collective. How they are held for a round (eval.samples_gather; logged with each round):

  gathered once             the whole model is gathered on every rank for the round (DeepSpeed's
                            `unwrap_model_for_generation`: GatheredParameters around the round, ZeRO-3's per-module
                            hooks removed and registered again after it), so decoding runs no collective at all.
                            `auto` takes it when the model fits every rank's device next to what it holds now
                            (ds_train.plan.samples_gather_fits).
  gathered per decode step  the hooks gather module by module at every forward, as in training; transformers' ZeRO-3
                            switch is held (`HfDeepSpeedConfig`) so `generate` keeps the ranks stepping in lockstep
                            until all are done (`synced_gpus`).
  replicated                ZeRO-0/1/2: every rank holds the whole model already.

The serve engine's pieces (audio tokenizer, KV caches) are built for each round and freed after it, so training
steps never carry them (ds_train.plan counts them in the round, not the step). Rank 0 writes
OUTPUT_DIR/samples/step-NNNNNN/NAME.wav + NAME.json and logs the clips and these
metrics (against the prompt's target clip, when it has one):

  samples_eos_fraction   clips the model ended itself (stream EOS) rather than the length cap
  samples_length_ratio   generated / target frames, mean over clips with a target
  samples_code_match     positions of the first codebook equal to the target's, over target frames

and, with eval.asr_model / eval.speaker_model, samples_wer, samples_cer and samples_speaker_sim (ds_train.quality;
rank 0 computes them from the clips after generation - no ZeRO-3 parameter is involved).
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Optional

import torch

from ds_train import dist
from ds_train.config import Config
from ds_train.generate import Prompt, Sampling, Spoken, prompts_from_manifest, read_prompts, serve_engine, speak, \
    write_spoken

SAMPLES_DIR = "samples"
# The console line of a round of samples: metric -> format.
SHOWN = (("samples_eos_fraction", "stopped by EOS {:.0%}"), ("samples_length_ratio", "length {:.2f}x the target"),
         ("samples_code_match", "codebook 0 {:.0%} as the target"), ("samples_wer", "WER {:.3f}"),
         ("samples_cer", "CER {:.3f}"), ("samples_speaker_sim", "speaker similarity {:.3f}"))


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"step-{step:06d}"


class TrainingSamples:
    """Built once before the loop; `run` is called after every step and acts only when samples are due."""

    def __init__(self, cfg: Config, out_dir: Path, held_out: Optional[dict[str, set[str]]] = None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.prompts = load_prompts(cfg, held_out)
        self.sampling = Sampling(temperature=0.0, max_new_frames=cfg.eval.samples_max_frames)  # greedy: comparable
        self.text_tokenizer = None  # loaded at the first round; the serve engine is built for each round
        self.judges = None  # ds_train.quality.Judges on rank 0, with eval.asr_model / eval.speaker_model
        self.targets: dict[str, torch.Tensor] = {}

    def due(self, step: int, last_step: bool) -> bool:
        every = self.cfg.eval.samples_every
        return bool(self.prompts) and (last_step or (every > 0 and step % every == 0))

    def run(self, ds_engine, step: int, last_step: bool, logger) -> Optional[dict]:
        """On every rank: generate the prompts with the training model, write and log them (rank 0)."""
        if not self.due(step, last_step):
            return None
        t0 = time.perf_counter()
        spoken, params = self.generate(ds_engine)
        metrics = {"step": step, **sample_metrics(self.prompts, spoken, self.targets)}
        per_clip = [{} for _ in spoken]
        if self.judges is not None:  # rank 0 only
            t1 = time.perf_counter()
            judged, per_clip = self.judges.score([(p.text, p.ref_audio, s.wav, s.sampling_rate)
                                                  for p, s in zip(self.prompts, spoken)])
            metrics.update(judged, samples_judge_time_s=time.perf_counter() - t1)
        seconds = time.perf_counter() - t0
        metrics.update(samples_time_s=seconds, samples_params=params)  # text: in metrics.jsonl, not on dashboards
        if dist.is_main():
            folder = step_dir(self.out_dir, step)
            for prompt, clip, info in zip(self.prompts, spoken, per_clip):
                write_spoken(folder, prompt, clip, {"step": step, **info})
            shown = [fmt.format(metrics[key]) for key, fmt in SHOWN if key in metrics]
            dist.print0(f"step {step}: {len(spoken)} audio samples in {folder} ({seconds:.1f}s, parameters {params})"
                        " | " + ", ".join(shown))
        logger.log(metrics)
        # A zero-frame clip is on disk (its JSON says so) but is no audio for a dashboard.
        logger.audio(step, [(p.name, s.wav, s.sampling_rate, p.text) for p, s in zip(self.prompts, spoken)
                            if len(s.wav)])
        return metrics

    def generate(self, ds_engine) -> tuple[list[Spoken], str]:
        """On every rank: one clip per prompt from the training model, and how its parameters were held ("gathered
        once", "gathered per decode step" or "replicated"). The serve engine is built for the round and freed after
        it."""
        from ds_train.model import base_model

        module = base_model(ds_engine.module)  # LoRA layers sit inside
        engine = self._build(module)
        params = self._params_path(ds_engine)  # after the build: the engine's pieces count as held
        was_training = ds_engine.module.training
        ds_engine.eval()
        try:
            with _parameters_held(ds_engine, params):
                spoken = [speak(engine, p, self.sampling) for p in self.prompts]
        finally:
            if was_training:
                ds_engine.train()
            del engine
            gc.collect()  # now, not at some later collection: the next training step needs the memory
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return spoken, params

    def _params_path(self, ds_engine) -> str:
        if ds_engine.zero_optimization_stage() != 3:
            return "replicated"
        once = self.cfg.eval.samples_gather == "always"
        if self.cfg.eval.samples_gather == "auto":
            from ds_train.plan import GIB, device_usage_gib, local_ranks, samples_gather_fits

            model_gib = sum(p.ds_numel * p.element_size() for p in ds_engine.module.parameters()) / GIB
            fits = samples_gather_fits(model_gib, *device_usage_gib(local_ranks()))
            once = dist.all_reduce([float(fits)], op="min")[0] > 0  # every rank gathers, or none does
        return "gathered once" if once else "gathered per decode step"

    def _build(self, module):
        from ds_train.data.audio import encode, load_audio, load_audio_tokenizer
        from ds_train.preflight import load_text_tokenizer

        cfg = self.cfg.model
        audio_tokenizer = load_audio_tokenizer(cfg.audio_tokenizer_path, str(dist.device()), cfg.semantic_model_path)
        if self.text_tokenizer is None:
            self.text_tokenizer = load_text_tokenizer(self.cfg, module.config)
        engine = serve_engine(module, self.text_tokenizer, audio_tokenizer,
                              whisper_processor_path=cfg.whisper_processor_path)
        for p in self.prompts:  # target codes exactly as `prepare` encodes them, once
            if p.target_audio and p.name not in self.targets:
                wav = load_audio(p.target_audio, audio_tokenizer.sampling_rate)
                self.targets[p.name] = encode(audio_tokenizer, wav, self.cfg.data.loudness_normalize)
        ev = self.cfg.eval
        if self.judges is None and dist.is_main() and (ev.asr_model or ev.speaker_model):
            from ds_train.quality import Judges

            self.judges = Judges(ev.asr_model, ev.speaker_model, str(dist.device()))
        return engine


def load_prompts(cfg: Config, held_out: Optional[dict[str, set[str]]] = None) -> list[Prompt]:
    """eval.samples: a prompts JSONL, or the first N samples of the eval set: data.eval_file, the samples
    data.eval_split held out (`held_out`: {manifest: sources}), or else the first training manifest."""
    samples = cfg.eval.samples
    if samples is None:
        return []
    if isinstance(samples, str):
        return read_prompts(samples, cfg.data.system_prompt)
    d = cfg.data
    if d.eval_file or not held_out:
        return prompts_from_manifest(d.eval_file or d.manifests()[0][0], d.format, d.system_prompt, samples,
                                     columns=d.columns)
    prompts = []
    for manifest, sources in held_out.items():
        prompts += prompts_from_manifest(manifest, d.format, d.system_prompt, samples - len(prompts), only=sources,
                                         columns=d.columns)
        if len(prompts) == samples:
            break
    for k, p in enumerate(prompts):  # numbered across the files, as one manifest's prompts are
        p.name = f"{k:03d}-{Path(p.target_audio).stem}"
    return prompts


def sample_metrics(prompts: list[Prompt], spoken: list[Spoken], targets: dict[str, torch.Tensor]) -> dict:
    out = {"samples_eos_fraction": sum(s.stopped_by == "eos" for s in spoken) / max(len(spoken), 1)}
    ratios, matches = [], []
    for p, s in zip(prompts, spoken):
        target = targets.get(p.name)
        if target is None:
            continue
        n_target, n = target.shape[1], min(target.shape[1], s.codes.shape[1])
        ratios.append(s.codes.shape[1] / n_target)
        matches.append(float((s.codes[0, :n] == target[0, :n]).sum()) / n_target)
    if ratios:
        out["samples_length_ratio"] = sum(ratios) / len(ratios)
        out["samples_code_match"] = sum(matches) / len(matches)
    return out


@contextlib.contextmanager
def _parameters_held(ds_engine, params: str):
    """The round's parameters, held as `params` says (the module docstring)."""
    if params == "gathered once":
        from deepspeed.runtime.zero import unwrap_model_for_generation

        # Its hooks come back only when the round ends normally; an exception here ends the run anyway.
        with unwrap_model_for_generation(ds_engine):
            yield
    elif params == "gathered per decode step" and dist.world_size() > 1:
        from transformers.integrations import HfDeepSpeedConfig

        switch = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
        try:
            yield
        finally:
            del switch
    else:
        yield
