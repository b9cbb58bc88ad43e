"""`deepspeed --num_gpus N --module ds_train.bench.samples CONFIG [key=value ...]`: a round of in-training samples
with the parameters gathered per decode step vs gathered once (ZeRO-3), on the same weights.

Every rank builds the run as `train` does (ds_train.train.setup), takes BENCH_SAMPLES_STEPS optimizer steps
(default 1: LoRA leaves its zero init, so the adapter shapes the clips), then generates eval.samples with
eval.samples_gather=never and =always, alternating, BENCH_SAMPLES_ROUNDS times each (default 1).
Per round: its seconds, the model's forwards (decode steps, the prefill included), seconds per decode step (first
forward's start to last forward's end, over the forwards), the collectives issued in that span (calls into
deepspeed.comm and torch.distributed, counted by wrapping them), the serve-engine objects (KV caches, audio
tokenizers) still alive after the round, and the clips (codes and WAV bytes); then BENCH_SAMPLES_AFTER more steps
(default 1), and every step's loss. Rank 0 prints one line per round and
writes OUTPUT_DIR/bench_samples.json. A measurement: it asserts nothing (tests/test_generate.py reads the JSON).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import sys
import time

PATHS = ("never", "always")  # eval.samples_gather: per decode step, then once
COLLECTIVES = {"deepspeed.comm": ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
                                  "reduce_scatter_fn"),
               "torch.distributed": ("all_reduce", "all_gather", "broadcast")}  # transformers' synced_gpus flag


class Counter:
    """Collective calls, and the span of the model's forwards during one round."""

    def __init__(self):
        self.calls, self.forwards, self.first, self.last = 0, 0, None, None

    def reset(self):
        self.forwards, self.first, self.last = 0, None, None

    def pre_forward(self, module, args, kwargs):
        if self.first is None:
            self.first = (time.perf_counter(), self.calls)
        self.forwards += 1

    def post_forward(self, module, args, kwargs, output):
        self.last = (time.perf_counter(), self.calls)

    def wrap(self, fn):
        @functools.wraps(fn)
        def counted(*a, **k):
            self.calls += 1
            return fn(*a, **k)
        return counted


def alive_engine_pieces() -> int:
    """KV caches and audio tokenizers still referenced anywhere in this process."""
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer
    from transformers.cache_utils import StaticCache

    gc.collect()
    return sum(issubclass(type(o), (StaticCache, HiggsAudioTokenizer)) for o in gc.get_objects())  # weakproxies too


def main(words: list[str]) -> None:
    import importlib

    from ds_train import dist
    from ds_train.cli import translate_args
    from ds_train.config import load_config
    from ds_train.model import base_model
    from ds_train.samples import TrainingSamples
    from ds_train.train import setup, train_step

    yaml_path, dotlist = translate_args(words)
    cfg = load_config(yaml_path, dotlist)
    run = setup(cfg)
    steps, after = (int(os.environ.get(k, 1)) for k in ("BENCH_SAMPLES_STEPS", "BENCH_SAMPLES_AFTER"))
    losses = [train_step(run, run.steps.next()).loss.loss for _ in range(steps)]
    counter = Counter()
    for module_name, names in COLLECTIVES.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, counter.wrap(getattr(module, name)))
    model = base_model(run.engine.module)
    model.register_forward_pre_hook(counter.pre_forward, with_kwargs=True)
    model.register_forward_hook(counter.post_forward, with_kwargs=True)

    rounds = []
    for k in range(int(os.environ.get("BENCH_SAMPLES_ROUNDS", 1))):
        for gather in PATHS:
            cfg.eval.samples_gather = gather
            samples = TrainingSamples(cfg, run.out, run.data.held_out)
            counter.reset()
            t0 = time.perf_counter()
            spoken, params = samples.generate(run.engine)
            seconds = time.perf_counter() - t0
            decode_s = counter.last[0] - counter.first[0]
            r = {"round": k, "samples_gather": gather, "params": params, "seconds": seconds,
                 "decode_steps": counter.forwards, "decode_s": decode_s, "s_per_step": decode_s / counter.forwards,
                 "decoding_collectives": counter.last[1] - counter.first[1],
                 "engine_pieces_alive": alive_engine_pieces(),
                 "codes": [s.codes.tolist() for s in spoken],
                 "wav_sha1": [hashlib.sha1(s.wav.tobytes()).hexdigest() for s in spoken]}
            rounds.append(r)
            dist.print0(f"round {k} samples_gather={gather} ({params}): {seconds:.2f}s, {counter.forwards} decode "
                        f"steps, {r['s_per_step']:.4f} s/step, {r['decoding_collectives']} collectives while "
                        f"decoding, {r['engine_pieces_alive']} engine pieces alive after")
    # Training goes on after the rounds (ZeRO-3's hooks are back after a round gathered once).
    losses += [train_step(run, run.steps.next()).loss.loss for _ in range(after)]
    if dist.is_main():
        (run.out / "bench_samples.json").write_text(json.dumps({"world": dist.world_size(), "rounds": rounds,
                                                                "losses": losses}) + "\n")
    dist.leave(0)


if __name__ == "__main__":
    main(sys.argv[1:])
