"""`ds-train` / `python -m ds_train`: one subcommand per job. Training and prepare run under the `deepspeed`
launcher (see run.sh); the others are single-process tools that need no GPU."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

from typing import List, Optional

from ds_train.config import DataConfig, load_config
from ds_train.errors import (EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, CheckpointError, ConfigError,
                             DataError)
from ds_train.lean_imports import collect_garbage_as_usual, collect_garbage_rarely

USAGE = """ds-train <command> ...

  train CONFIG.yaml [key=value ...] [--old_trainer_flag value ...]   fine-tune (run under `deepspeed`)
  prepare CONFIG.yaml [key=value ...]        check the data and encode audio once into the cache
  consolidate CHECKPOINT_DIR OUT_DIR [--tag TAG]   ZeRO shards -> PEFT adapter, offline, no GPU; train.mode=full:
              [--base DIR] [--dtype bf16|fp32] [--max-shard-size 5GB]   -> a model dir
  merge BASE_MODEL_DIR ADAPTER_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]
                                             adapter -> drop-in HiggsAudioModel dir, one shard in memory
  generate MODEL_DIR [--adapter DIR] (--text TEXT [--ref-audio WAV --ref-text TEXT] | --prompts JSONL) --out DIR
                                             speak with base + adapter (or a merged dir): WAV + JSON per prompt
  make-pairs CONFIG.yaml --prompts JSONL --candidates K --out DIR [--min-margin M] [key=value ...]
              [--temperature T --top-p P --top-k K --max-new-frames N] [--w-wer --w-cer --w-sim --w-eos --w-length W]
                                             DPO pairs: K sampled clips per prompt (all ranks), ranked by the judges
  plot OUTPUT_DIR                            OUTPUT_DIR/curves.png from its metrics.jsonl (losses, quality, lr, tokens/s)
  make-tiny OUT_DIR                          tiny real-format Higgs Audio checkpoint (tests, demo)
  make-demo-data OUT_DIR [--n N] [--voice held]   small synthetic voice-cloning data set (TTS manifest)
  make-arch ARCH.json OUT_DIR [--layers N --hidden H --intermediate I --heads A --kv-heads K] [--weights]
                                             model dir (config + real-id tokenizer) for model.init=random;
                                             --weights: with random bf16 weights on disk (sharded safetensors)
  plan CONFIG.yaml [key=value ...] [--hostfile F] [--gpu-memory GB]   predicted memory per device, fits or not
  bench-train CONFIG.yaml [key=value ...] [--synthetic ...] [--baseline hf] [--fp32-matmul]   step throughput, MFU
  bench-data CONFIG.yaml [key=value ...]     cache vs on-the-fly loader throughput, padding efficiency;
                                            --scale N[,N...] [--ranks 2]: launch path at N synthetic clips
  show-config CONFIG.yaml [key=value ...]    print the resolved config
"""


# Flags of the user's old torchrun trainer -> our keys. Flags without a value are booleans.
ALIASES = {
    "--model_path": "model.path",
    "--audio_tokenizer_path": "model.audio_tokenizer_path",
    "--train_data_file": "data.train_file",
    "--eval_data_file": "data.eval_file",
    "--output_dir": "train.output_dir",
    "--save_steps": "checkpoint.every_steps",
    "--per_device_train_batch_size": "train.micro_batch_size",
    "--gradient_accumulation_steps": "train.grad_accum",
    "--learning_rate": "optim.lr",
    "--num_train_epochs": "train.epochs",
    "--logging_steps": "train.log_every",
    "--warmup_steps": "optim.warmup_steps",
}
FLAG_ALIASES = {
    "--disable_evaluation": ["data.eval_file=null", "train.eval_every=0"],
    "--bf16": ["model.dtype=bf16"],
    "--use_lora": ["train.mode=lora"],
}


def translate_args(args: List[str]) -> tuple[Optional[str], List[str]]:
    """Split CLI words into (yaml path or None, dotlist), turning old-trainer flags into dotlist entries."""
    yaml_path, dotlist, i = None, [], 0
    while i < len(args):
        a = args[i]
        flag, _, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if flag in FLAG_ALIASES:
            dotlist += FLAG_ALIASES[flag]
        elif flag in ALIASES:
            if inline:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{flag} needs a value")
            dotlist.append(f"{ALIASES[flag]}={value}")
        elif a.startswith("-"):
            known = ", ".join(sorted([*ALIASES, *FLAG_ALIASES]))
            raise ConfigError(f"unknown flag {a!r}; use key=value overrides or one of: {known}")
        elif "=" in a:
            dotlist.append(a)
        elif yaml_path is None and a.endswith((".yaml", ".yml")):
            yaml_path = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: expected CONFIG.yaml, key=value or --flag")
        i += 1
    return yaml_path, dotlist


def _config(words):
    yaml_path, dotlist = translate_args(words)
    return load_config(yaml_path, dotlist)


def cmd_train(words):
    from ds_train.train import train

    from ds_train import dist
    from ds_train.metrics import final_summary

    summary = train(_config(words))
    dist.print0(final_summary(summary))
    dist.print0(json.dumps(summary))


def cmd_prepare(words):
    from ds_train import dist
    from ds_train.data.prepare import prepare_all, write_report
    from ds_train.preflight import preflight

    cfg = _config(words)
    pre = preflight(cfg, for_prepare=True)
    if "WORLD_SIZE" in os.environ:  # launched with several ranks: they share the shards
        dist.init_distributed()
    results = prepare_all(cfg, pre.text_tokenizer)
    if dist.is_main():
        write_report(pre.out_dir, results)
        for r in results:
            print(f"prepared {r.cache_dir}: {r.num_samples} samples, {len(r.bad)} skipped as bad, "
                  f"{r.encoded_shards} shard(s) encoded in {r.seconds:.1f}s")


def cmd_consolidate(words):
    p = argparse.ArgumentParser(prog="ds-train consolidate")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", default=None)
    full = "train.mode=full checkpoints (a model dir): "
    p.add_argument("--base", default=None, help=full + "base model dir for the frozen weights and non-weight files "
                   "(default: the run's model.path)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help=full + "weight dtype")
    p.add_argument("--max-shard-size", default="5GB", help=full + "largest weight file written")
    a = p.parse_args(words)
    from ds_train.export import consolidate

    print(consolidate(a.checkpoint_dir, a.out_dir, a.tag, a.base, a.dtype, a.max_shard_size))


def cmd_merge(words):
    p = argparse.ArgumentParser(prog="ds-train merge")
    p.add_argument("base_model_dir")
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest weight file written (peak memory is about one); save_pretrained's default")
    a = p.parse_args(words)
    from ds_train.merge import merge

    print(merge(a.base_model_dir, a.adapter_dir, a.out_dir, a.dtype, a.max_shard_size))


def cmd_generate(words):
    from ds_train.generate import Sampling

    p = argparse.ArgumentParser(prog="ds-train generate")
    p.add_argument("model_dir", help="base model dir (with --adapter) or a merged model dir")
    p.add_argument("--adapter", help="adapter dir (OUTPUT_DIR/adapter or a checkpoint's adapter/); no merge needed")
    p.add_argument("--text", help="one text to speak")
    p.add_argument("--ref-audio", help="reference clip to clone the voice of (with --text)")
    p.add_argument("--ref-text", help="transcript of --ref-audio")
    p.add_argument("--prompts", help="JSONL: text, optional ref_audio + ref_text, optional out (file stem)")
    p.add_argument("--out", required=True, help="output dir: NAME.wav + NAME.json per prompt")
    p.add_argument("--system-prompt", default=DataConfig.system_prompt, help="as data.system_prompt in training")
    p.add_argument("--temperature", type=float, default=Sampling.temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=Sampling.top_k)
    p.add_argument("--top-p", type=float, default=Sampling.top_p)
    p.add_argument("--seed", type=int, default=Sampling.seed)
    p.add_argument("--max-new-frames", type=int, default=Sampling.max_new_frames)
    p.add_argument("--audio-tokenizer", help="default: MODEL_DIR/audio_tokenizer")
    p.add_argument("--semantic-model", help="local copy of the audio tokenizer's semantic teacher (offline)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    a = p.parse_args(words)
    if (a.text is None) == (a.prompts is None):
        p.error("give exactly one of --text and --prompts")
    if (a.ref_audio is None) != (a.ref_text is None) or (a.ref_audio and a.prompts):
        p.error("--ref-audio and --ref-text go together, with --text")
    from pathlib import Path

    from boson_multimodal.data_types import ChatMLSample

    from ds_train.generate import Prompt, generate_files, load_engine, read_prompts
    from ds_train.data.manifest import voice_cloning_prompt

    if a.prompts:
        prompts = read_prompts(a.prompts, a.system_prompt)
    else:
        if a.ref_audio and not os.path.isfile(a.ref_audio):
            raise FileNotFoundError(f"reference audio not found: {a.ref_audio}")
        messages = voice_cloning_prompt(a.text, a.system_prompt, a.ref_text, a.ref_audio)
        prompts = [Prompt(ChatMLSample(messages=messages), "000", a.text)]
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed, a.max_new_frames)
    engine = load_engine(a.model_dir, a.adapter, a.audio_tokenizer, semantic_model_path=a.semantic_model,
                         device=a.device, dtype=a.dtype)
    for info in generate_files(engine, prompts, sampling, Path(a.out)):
        print(json.dumps(info))


MAKE_PAIRS_FLAGS = {"--prompts": str, "--candidates": int, "--out": str, "--min-margin": float, "--temperature": float,
                    "--top-p": float, "--top-k": int, "--max-new-frames": int, "--w-wer": float, "--w-cer": float,
                    "--w-sim": float, "--w-eos": float, "--w-length": float}


MAKE_PAIRS_HELP = """ds-train make-pairs CONFIG.yaml --prompts JSONL --candidates K --out DIR [--min-margin M] [key=value ...]

Run it through the launcher (`./run.sh make-pairs ...`: every local GPU) or alone. The model is the config's
(model.path, plus lora.init_from when set); the judges are eval.asr_model and eval.speaker_model.
  --prompts JSONL        text, optional ref_audio + ref_text, optional out (as `ds-train generate --prompts`)
  --candidates K         sampled clips per prompt (>= 2); seeds from train.seed, the prompt and the candidate index
  --out DIR              DIR/candidates/<prompt>/<k>.wav + .json, DIR/pairs.jsonl, DIR/make_pairs_report.json
  --min-margin M         keep a pair when best - worst score >= M (default 0.05)
  --temperature T --top-p P --top-k K   sampling (defaults 0.7, 0.95, none)
  --max-new-frames N     length cap per clip (default eval.samples_max_frames)
  --w-wer --w-cer --w-sim --w-eos --w-length W   weights of the combined score (default 1 each; README)
"""


def cmd_make_pairs(words):
    from ds_train.generate import Sampling
    from ds_train.make_pairs import DEFAULT_MIN_MARGIN, Options, Weights, make_pairs

    if {"-h", "--help"} & set(words):
        print(MAKE_PAIRS_HELP, end="")
        return
    words, f = _split_flags(words, MAKE_PAIRS_FLAGS)
    missing = [flag for flag in ("--prompts", "--candidates", "--out") if flag.lstrip("-") not in f]
    if missing:
        raise ConfigError(f"make-pairs needs {', '.join(missing)}")
    yaml_path, dotlist = translate_args(words)
    # The judges' keys (eval.asr_model, eval.speaker_model) are only valid with eval.samples: here the prompts are
    # what they judge. The user's own eval.samples override still comes later and wins.
    cfg = load_config(yaml_path, [f"eval.samples={f['prompts']}", *dotlist])
    try:
        sampling = Sampling(f.get("temperature", Sampling.temperature), f.get("top_k", Sampling.top_k),
                            f.get("top_p", Sampling.top_p), 0, f.get("max_new_frames", cfg.eval.samples_max_frames))
    except ValueError as e:
        raise ConfigError(f"make-pairs: {e}") from None
    weights = Weights(**{k[2:]: v for k, v in f.items() if k.startswith("w_")})
    report = make_pairs(cfg, Options(f["prompts"], f["candidates"], f["out"], f.get("min_margin", DEFAULT_MIN_MARGIN),
                                     sampling, weights))
    if report is not None:
        print(f"{report['pairs']} pair(s) of {report['prompts']} prompt(s) in {f['out']}/pairs.jsonl "
              f"({report['ties']} tied, {report['below_margin']} below --min-margin {report['min_margin']}; "
              f"judges {report['judge_seconds_per_prompt']:.2f}s per prompt)")
        print(json.dumps(report))


def cmd_plot(words):
    p = argparse.ArgumentParser(prog="ds-train plot")
    p.add_argument("output_dir")
    a = p.parse_args(words)
    from ds_train.plot import plot_curves

    print(plot_curves(a.output_dir))


def cmd_make_tiny(words):
    p = argparse.ArgumentParser(prog="ds-train make-tiny")
    p.add_argument("out_dir")
    p.add_argument("--no-delay-pattern", action="store_true")
    a = p.parse_args(words)
    from ds_train.demo.tiny import make_tiny

    print(make_tiny(a.out_dir, use_delay_pattern=not a.no_delay_pattern))


def cmd_make_demo_data(words):
    p = argparse.ArgumentParser(prog="ds-train make-demo-data")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--skewed", action="store_true", help="length-skewed clips (for bench-data)")
    p.add_argument("--voice", choices=["chars", "held"], default="chars",
                   help="chars: a tone per character; held: a held tone per word, a voice the tiny model can learn")
    a = p.parse_args(words)
    from ds_train.demo.data import make_demo_data

    print(make_demo_data(a.out_dir, a.n, a.n_eval, skewed=a.skewed, voice=a.voice))


def cmd_make_arch(words):
    p = argparse.ArgumentParser(prog="ds-train make-arch")
    p.add_argument("arch_file")
    p.add_argument("out_dir")
    for flag in ("--layers", "--hidden", "--intermediate", "--heads", "--kv-heads"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--weights", action="store_true",
                   help="also write random bf16 weights (sharded safetensors), e.g. to measure `merge` at real size")
    a = p.parse_args(words)
    scale = {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads,
             "kv_heads": a.kv_heads}
    if any(v is not None for v in scale.values()) and not all(v is not None for v in scale.values()):
        raise ConfigError("make-arch: give all of --layers --hidden --intermediate --heads --kv-heads, or none")
    from ds_train.arch import make_arch_dir, write_random_weights

    out = make_arch_dir(a.arch_file, a.out_dir, scale if a.layers is not None else None)
    if a.weights:
        write_random_weights(out)
    print(out)


def _split_flags(words, flags: dict) -> tuple[list, dict]:
    """Pull `--flag value` / `--flag=value` for the given flags (name -> type; bool: a switch) out of `words`."""
    rest, found, i = [], {}, 0
    while i < len(words):
        flag, eq, inline = words[i].partition("=")
        if flags.get(flag) is bool and not eq:
            found[flag.lstrip("-").replace("-", "_")] = True
        elif flag in flags:
            if not eq:
                if i + 1 >= len(words):
                    raise ConfigError(f"{flag} needs a value")
                i += 1
                inline = words[i]
            found[flag.lstrip("-").replace("-", "_")] = flags[flag](inline)
        else:
            rest.append(words[i])
        i += 1
    return rest, found


BENCH_FLAGS = {"--warmup": int, "--steps": int, "--synthetic": str, "--audio-fraction": float, "--baseline": str,
               "--peak-tflops": float, "--fp32-matmul": bool}


# Synthetic batches need neither a manifest nor an audio tokenizer (whichever data keys the YAML sets).
SYNTHETIC_DATA = ["data.train_file=synthetic", "data.train_files=null", "model.audio_tokenizer_path=unused"]


def cmd_bench_train(words):
    from ds_train.bench.train import BenchOptions, bench_train

    words, flags = _split_flags(words, BENCH_FLAGS)
    if flags.get("baseline") not in (None, "hf"):
        raise ConfigError(f"--baseline must be hf, got {flags['baseline']!r}")
    yaml_path, dotlist = translate_args(words)
    if flags.get("synthetic"):
        dotlist = [*SYNTHETIC_DATA, *dotlist]  # the user's overrides still win
    bench_train(load_config(yaml_path, dotlist), BenchOptions(**flags))


def cmd_plan(words):
    from ds_train.plan import plan_command

    words, flags = _split_flags(words, {"--hostfile": str, "--gpu-memory": float, "--positions": int})
    plan_command(_config(words), **flags)


def cmd_bench_data(words):
    words, flags = _split_flags(words, {"--scale": str, "--ranks": int, "--keep": bool})
    if "scale" in flags:  # the launch path at N synthetic clips (bench/data_scale.py)
        from ds_train.bench.data_scale import bench_data_scale

        scales = [int(float(x)) for x in flags.pop("scale").split(",")]
        bench_data_scale(_config(words), scales, **flags)
        return
    from ds_train.bench.data import bench_data

    bench_data(_config(words))


def cmd_show_config(words):
    from ds_train.config import to_yaml

    print(to_yaml(_config(words)), end="")


COMMANDS = {
    "train": cmd_train, "prepare": cmd_prepare, "consolidate": cmd_consolidate, "merge": cmd_merge,
    "make-tiny": cmd_make_tiny, "make-demo-data": cmd_make_demo_data, "make-arch": cmd_make_arch, "bench-data": cmd_bench_data,
    "generate": cmd_generate, "make-pairs": cmd_make_pairs, "plot": cmd_plot,
    "bench-train": cmd_bench_train, "plan": cmd_plan,
    "show-config": cmd_show_config,
}


LAUNCHED_HELP = """ds-train {cmd} CONFIG.yaml [key=value ...] [--old_trainer_flag value ...]

Run it through the launcher: `./run.sh {cmd} CONFIG.yaml ...` (every local GPU, or --hostfile FILE).
key=value overrides win over the YAML; `ds-train show-config CONFIG.yaml key=value` prints the result, and the
README's configuration reference lists every key. Old-trainer flags: {flags}.

Exit codes: 0 done; 1 unexpected error (a bug: the failing rank's traceback is printed); 2 config error;
3 data or checkpoint error; 4 diverged (last good state saved); 75 preempted or Ctrl-C (checkpoint saved: relaunch
with train.resume=auto). A rank killed by a signal makes the launcher exit 256 - signal (247: SIGKILL, often the
out-of-memory killer).
"""


PEER_EXIT_DELAY_S = 3.0


def main(argv=None) -> int:
    collect_garbage_rarely()  # while torch and the libraries load (train and bench-train: until set up)
    try:
        return _main(argv)
    finally:
        collect_garbage_as_usual()


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] not in COMMANDS:
        print(f"ds-train: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    cmd = argv[0]
    if cmd == "train":
        from ds_train.resilience import preemption_flag

        preemption_flag()  # before torch loads: a preemption signal from here on is kept for the first step boundary
    # peft imports bitsandbytes whenever it is installed (QLoRA): on a CPU with AVX512-BF16 its CPU backend warns that
    # an optional `kernels` package is missing, in every LoRA run, although it falls back to its own CPU kernels.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if cmd in ("train", "prepare", "bench-data", "show-config") and ({"-h", "--help"} & set(argv[1:])):
        print(LAUNCHED_HELP.format(cmd=cmd, flags=", ".join(sorted([*ALIASES, *FLAG_ALIASES]))), end="")
        return 0
    from ds_train import dist
    from ds_train.lean_imports import skip_vision_and_detection
    from ds_train.resilience import Diverged, Preempted

    skip_vision_and_detection()
    if cmd not in ("train", "bench-train"):  # those two return to Python's thresholds once they have set up
        collect_garbage_as_usual()  # the rest go to their work now (e.g. prepare's loop over a corpus)
    try:
        COMMANDS[cmd](argv[1:])
        code = EXIT_OK
    except Preempted as e:
        code = e.code
    except Diverged as e:
        _report(cmd, f"stopped: {e}", e)
        code = EXIT_DIVERGED
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        code = EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_DATA
        _report(cmd, f"config error: {e}" if code == EXIT_CONFIG else str(e), e)
        dist.abort(code)
        return code
    except Exception as e:
        if not dist.in_process_group():
            raise
        if _lost_a_peer(e):  # the rank that failed has said why; one line here, not a second traceback
            print(f"ds-train {cmd} (rank {dist.rank()}): stopped: another rank failed (its error is above)",
                  file=sys.stderr)
            # DeepSpeed's launcher exits with the first failed rank's code it sees (it polls once a second):
            # let that be the rank that failed, not this one's generic 1.
            time.sleep(PEER_EXIT_DELAY_S)
        else:
            _traceback_once(cmd)
        dist.abort(EXIT_ERROR)
    # Success, or a stop every rank agreed on: the ranks leave the process group together. (After any other
    # failure the peers may never reach the barrier.)
    dist.leave(code)
    return code


def _report(cmd: str, message: str, e: Exception) -> None:
    """One message per failure: rank 0 reports what every rank found; a rank's own failure names the rank."""
    from ds_train import dist

    if getattr(e, "on_this_rank", False):
        print(f"ds-train {cmd} (rank {dist.rank()}): {message}", file=sys.stderr, flush=True)
    elif dist.is_main():
        print(f"ds-train {cmd}: {message}", file=sys.stderr, flush=True)


def _traceback_once(cmd: str) -> None:
    """An unexpected error: its traceback once per node, however many of the node's ranks hit it; the others say
    which rank they are in one line. The ranks of a node share the launcher process (their parent): the first to
    create the marker named by (launcher, traceback) prints."""
    import hashlib
    import tempfile

    from ds_train import dist

    text = traceback.format_exc()
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    marker = os.path.join(tempfile.gettempdir(), f"ds_train-error-{os.getppid()}-{digest}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"ds-train {cmd} (rank {dist.rank()}): failed with the same error (traceback above)", file=sys.stderr,
              flush=True)
        return
    print(f"ds-train {cmd} (rank {dist.rank()}): unexpected error", file=sys.stderr, flush=True)
    sys.stderr.write(text)
    sys.stderr.flush()


def _lost_a_peer(e: Exception) -> bool:
    import torch.distributed

    text = str(e)
    return isinstance(e, torch.distributed.DistBackendError) or "Connection closed by peer" in text \
        or "Connection reset by peer" in text


if __name__ == "__main__":
    sys.exit(main())
