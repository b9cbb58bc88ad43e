#!/usr/bin/env bash
# The one command to run when a GPU is available (one H100/H200, no network; under 8 minutes):
#   scripts/gpu_check.sh [--out DIR] [--work WORK]   (DIR: runs/gpu_check; WORK, emptied first: runs/gpu_check/work)
#   scripts/gpu_check.sh --dry-run [--out DIR] [--work WORK] [--tiny-model DIR]   (CPU: tests/test_gpu_check.py)
# Stages, each with its own time limit inside one overall budget (GPU_CHECK_BUDGET_S, default 420 s: with
# the 30 s a timed-out stage may take to stop and the report, under 8 minutes); a stage that
# fails or runs out of time is recorded and the next one runs:
#   install      .venv from .whl/ (scripts/gpu_wheels.sh, carried to the machine), offline; an import check
#   demo         ./run.sh, the embedded demo (prepare + ZeRO-3 training + samples + merge) on the GPU
#   generate     ds-train generate with the demo's tiny model + adapter
#   make_arch    ds-train make-arch configs/arch/higgs-v2-3b.json: the released 5.8B architecture, no weights
#   bench_zero2  ./run.sh bench-train, model.init=random, 4096 positions, ds_configs/zero2.json, --baseline hf
#   bench_zero3  the same with ds_configs/zero3.json
#   bench_zero3_offload   the same with ds_configs/zero3_offload.json
# Writes DIR/gpu_check.json (every stage's status, seconds and numbers, bench-train's JSON inside), DIR/gpu_check.md
# (the table: tokens/s, MFU, peak device memory against `ds-train plan`) and DIR/gpu_check.log (each stage's log).
# On the device: `scripts/gpu_check.sh --out "$OUT"` with .whl carried; run scripts/gpu_wheels.sh 3.12 here first.
# --dry-run runs the same stages on CPU (2 ranks) with the tiny model, tiny positions and 1 timed step, in the
# existing .venv: the plumbing (arguments, JSON fields, table) is tested on every CI run so it cannot rot.
# Exit code: 0 when every stage passed, 1 otherwise (the report is written either way).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0 OUT_DIR="$ROOT/runs/gpu_check" WORK="" TINY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT_DIR="${2:?--out needs a directory}"; shift 2 ;;
    --work) WORK="${2:?--work needs a directory}"; shift 2 ;;
    --tiny-model) TINY="${2:?--tiny-model needs a make-tiny directory}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${WORK:-$ROOT/runs/gpu_check/work}"
rm -rf "$WORK"; mkdir -p "$WORK/logs"
WORK="$(cd "$WORK" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
# This checkout's ds_train, whatever the venv has installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAGES="$WORK/stages.jsonl"
: >"$STAGES"
START=$SECONDS
BROKEN=""
BUDGET="${GPU_CHECK_BUDGET_S:-$([[ $DRY == 1 ]] && echo 900 || echo 420)}"

log() { printf '[gpu_check] %s\n' "$*" >&2; }

# record NAME STATUS SECONDS KIND [key=value ...]: one line of $STAGES.
record() {
  python3 - "$@" >>"$STAGES" <<'EOF'
import json, sys
name, status, seconds, kind, *extra = sys.argv[1:]
row = {"stage": name, "status": status, "seconds": int(seconds), "kind": kind}
for item in extra:
    key, _, value = item.partition("=")
    row[key] = value.split("\x1f") if key == "overrides" else value
print(json.dumps(row))
EOF
}

# stage NAME CAP_S KIND [key=value ...] -- COMMAND...: run COMMAND under min(CAP_S, time left), log to
# logs/NAME.log, record ok / failed (exit N) / timeout / skipped. Never stops the script.
stage() {
  local name="$1" cap="$2" kind="$3"; shift 3
  local meta=()
  while [[ "$1" != "--" ]]; do meta+=("$1"); shift; done
  shift
  if [[ -n "$BROKEN" ]]; then
    log "$name: skipped ($BROKEN)"
    record "$name" skipped 0 "$kind" "${meta[@]}" "note=$BROKEN"
    return 0
  fi
  local left=$(( BUDGET - (SECONDS - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    log "$name: skipped (${left}s of the ${BUDGET}s budget left)"
    record "$name" skipped 0 "$kind" "${meta[@]}" "note=budget"
    return 0
  fi
  log "$name: $* (limit ${limit}s)"
  local t0=$SECONDS rc=0
  # TERM first: run.sh relays it to the ranks; KILL 30 s later if anything is still running.
  timeout --kill-after=30 "$limit" bash -euo pipefail -c '"$@"' "$name" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status="failed (exit $rc)"; fi
  log "$name: $status in $(( SECONDS - t0 ))s"
  [[ $status == ok ]] || tail -n 25 "$WORK/logs/$name.log" | sed "s/^/[gpu_check] $name | /" >&2
  record "$name" "$status" $(( SECONDS - t0 )) "$kind" "${meta[@]}" "log=logs/$name.log"
  # Without a working .venv nothing else can run (and run.sh would try to install from the network).
  if [[ $name == install && $status != ok ]]; then BROKEN="install $status"; fi
}

install_venv() {
  if [[ $DRY == 1 ]]; then
    echo "dry run: the existing $VENV"
  elif [[ ! -f "$VENV/.ds_train_installed" ]]; then
    if [[ ! -d .whl ]]; then
      echo "no .whl/ here: run scripts/gpu_wheels.sh 3.12 on a machine with PyPI, and carry .whl along"
      return 2
    fi
    # The device's python3 is itself a venv (torch, CUDA); a venv's --system-site-packages would see the base
    # interpreter's packages, not that venv's: a .pth appends the parent's site-packages after ours, so the wheels
    # (transformers 4.46.3, accelerate 1.1.1, ...) win over the image's newer versions.
    python3 -m venv --without-pip "$VENV"
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    python3 -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
      >"$site/_gpu_check_parent.pth"
    # --ignore-installed: the wheels go into .venv even where the image has the same version (its console
    # scripts, e.g. bin/deepspeed, must be in .venv for run.sh).
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --ignore-installed .whl/*.whl
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
  fi
  # Everything the stages import (a missing wheel shows here, named, not minutes later in a rank's traceback).
  "$PY" - "$DRY" <<'EOF'
import importlib, sys
missing = []
for name in ("ds_train.cli", "ds_train.train", "ds_train.generate", "ds_train.bench.train", "ds_train.plot",
             "deepspeed", "peft", "accelerate", "transformers", "boson_multimodal.serve.serve_engine",
             "boson_multimodal.audio_processing.higgs_audio_tokenizer", "torchaudio", "librosa", "soxr", "soundfile",
             "matplotlib.pyplot"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name}: {type(e).__name__}: {e}")
import torch, transformers, deepspeed, accelerate
print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, "
      f"accelerate {accelerate.__version__}, cuda {torch.cuda.is_available()}")
if missing:
    sys.exit("import failures (add the wheels to scripts/gpu_wheels.sh):\n  " + "\n  ".join(missing))
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: run with --dry-run on a machine without a GPU")
EOF
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
  [[ $DRY == 1 ]] || touch "$VENV/.ds_train_installed"
}

# The demo: ./run.sh itself on the GPU. Dry run: its config through the same launcher, 2 steps, on a small data set.
demo() {
  if [[ $DRY == 0 ]]; then
    ./run.sh
    return
  fi
  local t0=$SECONDS
  "$VENV/bin/ds-train" make-demo-data "$WORK/demo/voice" --n 4 --n-eval 2 --voice held
  ./run.sh train configs/demo.yaml "model.path=$TINY" "model.audio_tokenizer_path=$TINY/audio_tokenizer" \
    "data.train_file=$WORK/demo/voice/train.jsonl" "data.eval_file=$WORK/demo/voice/eval.jsonl" \
    "train.output_dir=$DEMO_OUT" train.max_steps=2 train.eval_every=2 eval.samples=1 eval.samples_max_frames=4 \
    checkpoint.every_steps=2
  "$PY" -m ds_train.demo.summary "$DEMO_OUT" $(( SECONDS - t0 ))
}

if [[ $DRY == 1 ]]; then
  [[ -x "$PY" ]] || { log "--dry-run needs the project's .venv (./run.sh creates it)"; exit 2; }
  if [[ -z "$TINY" ]]; then TINY="$WORK/tiny-model"; fi
  DEMO_OUT="$WORK/demo/out"
  ARCH_SCALE=(--layers 2 --hidden 64 --intermediate 128 --heads 2 --kv-heads 1)
  BENCH=(--synthetic 64 --warmup 1 --steps 1)
  GEN_FRAMES=8
  CAP_INSTALL=120 CAP_DEMO=300 CAP_GEN=120 CAP_ARCH=120 CAP_BENCH=240 CAP_OFFLOAD=360
else
  TINY="$ROOT/runs/demo/tiny-model"  # what ./run.sh builds
  DEMO_OUT="$ROOT/runs/demo/out"
  ARCH_SCALE=()
  BENCH=(--synthetic 4096 --warmup 1 --steps 3)
  GEN_FRAMES=50
  CAP_INSTALL=150 CAP_DEMO=200 CAP_GEN=90 CAP_ARCH=60 CAP_BENCH=150 CAP_OFFLOAD=240
fi
ARCH="$WORK/arch"
# The stages run in child shells (under `timeout`): they see these functions and variables.
export DRY ROOT VENV PY WORK TINY DEMO_OUT
export -f install_venv demo

log "$([[ $DRY == 1 ]] && echo "dry run on CPU" || echo "GPU check"): budget ${BUDGET}s, reports in $OUT_DIR," \
  "work in $WORK"
stage install "$CAP_INSTALL" setup "config=.whl/ -> .venv (offline)" -- install_venv
if [[ $DRY == 1 && ! -f "$TINY/config.json" ]]; then
  stage make_tiny "$CAP_ARCH" setup "config=ds-train make-tiny" -- "$VENV/bin/ds-train" make-tiny "$TINY"
fi
stage demo "$CAP_DEMO" demo "config=configs/demo.yaml" "output_dir=$DEMO_OUT" -- demo
stage generate "$CAP_GEN" generate "config=tiny model + demo adapter, greedy, $GEN_FRAMES frames" \
  "output_dir=$WORK/generate" -- \
  "$VENV/bin/ds-train" generate "$TINY" --adapter "$DEMO_OUT/adapter" --text "the voice check" \
  --temperature 0 --max-new-frames "$GEN_FRAMES" --out "$WORK/generate"
stage make_arch "$CAP_ARCH" setup "config=configs/arch/higgs-v2-3b.json ${ARCH_SCALE[*]:-}" -- \
  "$VENV/bin/ds-train" make-arch configs/arch/higgs-v2-3b.json "$ARCH" "${ARCH_SCALE[@]}"

# bench NAME CAP DS_JSON [bench-train flags]: model.init=random on the architecture, one micro-batch of 1 sample.
bench() {
  local name="$1" cap="$2" ds_json="$3"; shift 3
  local overrides=("model.path=$ARCH" model.init=random "train.deepspeed_config=ds_configs/$ds_json"
                   "train.output_dir=$WORK/$name" train.micro_batch_size=1 train.grad_accum=1)
  local joined flags; joined=$(IFS=$'\x1f'; echo "${overrides[*]}"); flags="${BENCH[*]} $*"
  stage "$name" "$cap" bench "config=$ds_json" "overrides=$joined" "bench_flags=${flags% }" \
    "output_dir=$WORK/$name" -- ./run.sh bench-train "${overrides[@]}" "${BENCH[@]}" "$@"
}
bench bench_zero2 "$CAP_BENCH" zero2.json --baseline hf
bench bench_zero3 "$CAP_BENCH" zero3.json
bench bench_zero3_offload "$CAP_OFFLOAD" zero3_offload.json

rc=0
[[ -x "$PY" ]] || PY=python3  # the install stage failed before creating .venv
"$PY" "$ROOT/scripts/gpu_check_report.py" "$WORK" "$OUT_DIR" "$([[ $DRY == 1 ]] && echo dry-run || echo gpu)" \
  $(( SECONDS - START )) "$BUDGET" || rc=$?
exit "$rc"
