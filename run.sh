#!/usr/bin/env bash
# ds_train front door.
#   ./run.sh                      set up .venv if missing, then run the embedded tiny demo (runs/demo/)
#   ./run.sh test [pytest args]   the whole test suite (TEST_WORKERS=2 files at a time; -n 0: one process)
#   ./run.sh train CONFIG.yaml [key=value ...] [--hostfile FILE] [--master_port N]
#   ./run.sh prepare CONFIG.yaml [key=value ...] [--hostfile FILE]
#   ./run.sh make-pairs CONFIG.yaml --prompts JSONL --candidates K --out DIR   (DPO pairs; all local devices)
#   ./run.sh bench-train CONFIG.yaml [key=value ...] [--synthetic 512] [--baseline hf]   (all local devices)
#   ./run.sh <any other ds-train subcommand> ...   (consolidate, merge, make-tiny, bench-data, ...)
#
# Preemption: SIGTERM, SIGUSR1 or Ctrl-C to run.sh (or to any rank) makes every rank save a checkpoint at the next
# step boundary and exit with code 75 (before the launch: exit 75 at once, no rank started).
# Exit codes: 0 done, 1 unexpected error, 2 config, 3 data/checkpoint, 4 diverged, 75 preempted; a rank killed by a
# signal N gives 256-N (247: SIGKILL). run.sh explains a failing code in one line. Under SLURM: scripts/train.sbatch
# (--signal=B:USR1@120 relayed to run.sh; on 75 the job requeues itself, train.resume=auto_or_fresh). Several
# nodes start over ssh (pdsh), or with srun (one run.sh per node) when ssh to a node fails or DS_LAUNCHER=srun.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

log() { printf '[run.sh] %s\n' "$*" >&2; }

# A preemption signal (SLURM's warning, scancel --signal) that arrives before the ranks are started is kept:
# run_launcher then exits 75 without starting them, and a batch script requeues. (Untrapped, USR1 would end run.sh
# with 138 and the job would not requeue.)
# From here on, output is captured with backquotes, not $( ): bash 5.2 (5.2.15, Debian 12) parses a trap's command
# wrongly when the signal arrives while it expands a $( ) ("trap: line 2: unexpected EOF while looking for matching
# `)'") and, under set -e, exits 2 instead of running it; backquotes are not affected.
EARLY_SIGNAL=""
trap 'EARLY_SIGNAL=USR1' USR1
trap 'EARLY_SIGNAL=TERM' TERM

install_project() {
  # The pip config on some machines names missing local indexes; their warnings are noise here.
  "$PY" -m pip install --quiet -e "${ROOT}[test]" 2>&1 | grep -v "^WARNING: Location" || true
}

ensure_venv() {
  if [[ -x "$VENV/bin/ds-train" && -f "$VENV/.ds_train_installed" ]]; then return; fi
  log "creating $VENV and installing ds_train (first run only; several GB of wheels)"
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  install_project
  "$PY" -c "import ds_train, deepspeed, peft, boson_multimodal, torchaudio" \
    || { log "install failed: see the pip output above"; exit 1; }
  touch "$VENV/.ds_train_installed"
}

local_procs() {
  # One process per GPU; two on a machine without GPUs (enough to exercise ZeRO-3 partitioning).
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=`nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true`; fi
  if [[ "$n" -gt 0 ]]; then echo "$n"; else echo 2; fi
}

set_env_defaults() {
  local procs="$1"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  local cores; cores=`nproc`
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}"
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
}

slurm_hostfile() {
  # Inside a SLURM allocation: one line per node, slots = GPUs per node; without GPUs (a CPU partition) the
  # allocation's tasks per node, else what local_procs finds.
  local file="$1" slots="${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-`local_procs`}}"
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${slots}/" >"$file"
  log "wrote $file from SLURM_JOB_NODELIST (`wc -l <"$file"` nodes x $slots slots)"
}

# How forward_preemption reaches ranks that are not our descendants (set by launch).
PDSH_HOSTS=""
RANK_PATTERN=""
SRUN_LAUNCH=0
OTHER_LAUNCHER=0
LAUNCHED=""   # the subcommand the ranks run: `train` ranks catch USR1 (ds_train/resilience.py), the others do not
UNDELIVERED=""  # a preemption signal that found no rank ready for it yet: run_launcher tries again

hostfile_hosts() { grep -v '^\s*\(#\|$\)' "$1" | awk '{print $1}'; }

# launch SUBCOMMAND ARGS...: run `ds-train SUBCOMMAND` on every rank through the deepspeed launcher.
launch() {
  local sub="$1"; shift
  LAUNCHED="$sub"
  local hostfile="" port="${MASTER_PORT:-}" args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
      --hostfile=*) hostfile="${1#*=}"; shift ;;
      --master_port) port="${2:?}"; shift 2 ;;
      --master_port=*) port="${1#*=}"; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  if [[ -z "$hostfile" && -n "${SLURM_JOB_NODELIST:-}" && "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]]; then
    hostfile="$ROOT/hostfiles/slurm-${SLURM_JOB_ID:-job}"
    slurm_hostfile "$hostfile"
  fi
  if [[ -z "$port" ]]; then
    # Several nodes: the conventional 29500, the same on every host. One node: a free port, so two jobs (or two
    # users) on one machine never collide on the rendezvous port.
    if [[ -n "$hostfile" && `hostfile_hosts "$hostfile" 2>/dev/null | wc -l` -gt 1 ]]; then port=29500
    else port=`"$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'`
    fi
  fi
  # --log_level warning: the launchers' per-launch INFO lines (world info, spawned pids) are noise in a run's log.
  local launcher=("$VENV/bin/deepspeed" --master_port "$port" --no_local_rank --log_level warning)
  if [[ -n "$hostfile" ]]; then
    [[ -f "$hostfile" ]] || { log "hostfile not found: $hostfile"; return 2; }
    "$PY" -m ds_train.launch check-hostfile "$hostfile" || return 2
    local hosts; hosts=`hostfile_hosts "$hostfile" | wc -l`
    if [[ "$hosts" -eq 1 ]]; then
      # One node: no ssh needed.
      launcher+=(--hostfile "$hostfile" --no_ssh --node_rank 0 --master_addr 127.0.0.1)
      set_env_defaults "`grep -v '^\s*\(#\|$\)' "$hostfile" | sed -n 's/.*slots=\([0-9]*\).*/\1/p' | head -1`"
    elif [[ -n "${DS_TRAIN_NODE_RANK:-}" ]]; then
      # One node's share of an srun launch (below): this node's ranks, rendezvous at the first host.
      launcher+=(--hostfile "$hostfile" --no_ssh --node_rank "$DS_TRAIN_NODE_RANK"
                 --master_addr "`hostfile_hosts "$hostfile" | head -1`")
      set_env_defaults "`local_procs`"
    elif use_srun "$hostfile"; then
      # Every node runs this script once (srun, no ssh), which starts that node's ranks; SLURM_NODEID orders the
      # nodes as the hostfile (written from the same node list) does.
      local nodes; nodes=`hostfile_hosts "$hostfile" | wc -l`
      log "srun --nodes $nodes --ntasks-per-node 1: one run.sh per node, each starts its node's ranks"
      # Not --kill-on-bad-exit: the first node to exit 75 (preempted, checkpoint saved) would get the others
      # killed mid-exit (143). --wait: once one node has exited, the rest get 60 s (a crashed node's peers fail in
      # their next collective anyway).
      # shellcheck disable=SC2016  # $SLURM_NODEID expands in each task
      launcher=(srun --nodes "$nodes" --ntasks "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=0 --wait=60
                bash -c 'DS_TRAIN_NODE_RANK=$SLURM_NODEID exec "$0" "$@"' "$ROOT/run.sh" "$sub" "${args[@]}"
                --hostfile "$hostfile" --master_port "$port")
      log "${launcher[*]}"
      SRUN_LAUNCH=1
      run_launcher "${launcher[@]}"
      return
    else
      launcher+=(--hostfile "$hostfile" --launcher "${DS_LAUNCHER:-pdsh}")
      set_env_defaults "`local_procs`"
      # Ranks on other hosts inherit these through DeepSpeed's .deepspeed_env mechanism.
      "$PY" -m ds_train.launch write-env || return 2
      if [[ "${DS_LAUNCHER:-pdsh}" == pdsh ]]; then
        # A preemption signal goes to the ranks on every host (forward_preemption).
        PDSH_HOSTS=`hostfile_hosts "$hostfile" | paste -sd,`
        RANK_PATTERN="-m ds_train $sub ${args[0]:-}"
      else
        OTHER_LAUNCHER=1
      fi
    fi
  else
    local n; n=`local_procs`
    set_env_defaults "$n"
    launcher+=(--num_gpus "$n")
    if [[ "$n" -gt 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then export LOCAL_SIZE="$n"; fi
  fi
  log "${launcher[*]} --module ds_train $sub ${args[*]:-}"
  run_launcher "${launcher[@]}" --module ds_train "$sub" "${args[@]}"
}

# Several nodes in a SLURM allocation: srun instead of ssh when DS_LAUNCHER=srun, or when DS_LAUNCHER is unset and
# ssh (what pdsh would use) cannot reach every host.
use_srun() {
  [[ "${DS_LAUNCHER:-}" == srun ]] && return 0
  [[ -z "${DS_LAUNCHER:-}" && -n "${SLURM_JOB_ID:-}" ]] || return 1
  local host
  for host in `hostfile_hosts "$1"`; do
    if ! ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" true </dev/null >/dev/null 2>&1; then
      log "ssh to $host failed: launching with srun (DS_LAUNCHER=pdsh forces ssh)"
      return 0
    fi
  done
  return 1
}

# run_launcher CMD...: run the launcher, relaying preemption signals, and return its exit code.
run_launcher() {
  if [[ -n "$EARLY_SIGNAL" && -z "${DS_TRAIN_NODE_RANK:-}" ]]; then
    # Nothing trained since the last checkpoint: starting the ranks only to save it again would waste the warning's
    # time. (One node's share of an srun launch starts its ranks regardless: the other nodes' ranks wait for them.)
    log "preemption signal ($EARLY_SIGNAL) before the ranks started: not starting them"
    explain_exit 75
    return 75
  fi
  # Its own session: a Ctrl-C in the terminal reaches run.sh alone (DeepSpeed's launcher would kill the ranks
  # before they save); run.sh turns it into the preemption signal below.
  if [[ -n "${DS_TRAIN_NODE_RANK:-}" ]]; then
    # srun passes a signal to every process of the step: DeepSpeed's launchers would die of USR1 (exit 138) while
    # the ranks save. They ignore it; the ranks set their own handler.
    ( trap '' USR1; exec setsid "$@" ) &
  else
    setsid "$@" &
  fi
  local child=$! rc=0
  # shellcheck disable=SC2064  # expand $child now
  trap "forward_preemption $child" TERM USR1 INT HUP
  # A signal between the check above and this trap: pass it on (each rank keeps one from its first ~0.1 s).
  if [[ -n "$EARLY_SIGNAL" ]]; then forward_preemption "$child"; fi
  while true; do
    rc=0
    if [[ -n "$UNDELIVERED" ]] && kill -0 "$child" 2>/dev/null; then
      sleep 0.5 || true  # the ranks are still starting: again until they are up (a Ctrl-C ends the sleep)
      forward_preemption "$child" again
      continue
    fi
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # still running: wait was interrupted by a trapped signal
  done
  trap - TERM USR1 INT HUP
  explain_exit "$rc"
  return "$rc"
}

# What a ds-train exit code means (ds_train/errors.py; README "Exit codes"), said once after the launcher's own
# "[ERROR] ... return code = N" line.
explain_exit() {
  case "$1" in
    0) ;;
    1) log "exit 1: a rank failed with an unexpected error (its traceback is above): please report it" ;;
    2) log "exit 2: configuration error (above): fix the setting or the inputs it names, then relaunch" ;;
    3) log "exit 3: data or checkpoint error (above): fix what it names, or see data.skip_bad" ;;
    4) log "exit 4: training diverged; the last good state is saved: lower optim.lr, then train.resume=auto" ;;
    75) log "exit 75: preempted or interrupted; a checkpoint is saved: relaunch with train.resume=auto" ;;
    *) if [[ "$1" -gt 128 ]]; then
         # DeepSpeed's launcher exits 256 - N for a rank killed by signal N (247: SIGKILL); a shell reports 128 + N.
         local sig=$(( $1 >= 192 ? 256 - $1 : $1 - 128 ))
         log "exit $1: a rank was killed by signal $sig`[[ "$sig" == 9 ]] && echo ' (SIGKILL: often the out-of-memory killer)'`; train.resume=auto continues from the last checkpoint"
       else
         log "exit $1: the launcher failed (see above)"
       fi ;;
  esac
}

# The ranks of a local launch: descendants of the launcher running `-m ds_train` (not DeepSpeed's own launcher).
# `train` ranks only once they catch USR1 (their first ~0.1 s): before that the signal would kill them.
rank_pids() {
  local pid args mask
  for pid in `pgrep -P "$1" || true`; do
    args=`ps -o args= -p "$pid" 2>/dev/null || true`
    if [[ "$args" == *"-m ds_train"* && "$args" != *deepspeed.launcher* ]]; then
      mask=`awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true`
      if [[ "$LAUNCHED" != train ]] || (( ${mask:+16#$mask >> 9 & 1} )); then echo "$pid"; fi
    fi
    rank_pids "$pid"
  done
}

# SIGTERM/SIGUSR1 to run.sh: every rank checkpoints at the next step boundary and exits 75. A signal that comes
# while the ranks are starting (DeepSpeed's launcher takes seconds to spawn them) is kept in UNDELIVERED and sent
# again every 0.5 s by run_launcher ($2 = again: quietly) until a rank has it.
forward_preemption() {
  local ranks say=log
  [[ "${2:-}" == again ]] && say=:
  UNDELIVERED=""
  ranks=`rank_pids "$1"`
  if [[ -n "$ranks" ]]; then
    log "preemption signal: asking ranks `echo $ranks` to checkpoint and stop"
    # shellcheck disable=SC2086
    kill -USR1 $ranks 2>/dev/null || true
  elif [[ -n "$PDSH_HOSTS" ]]; then
    # Multi-node over ssh: the ranks are not our descendants. DeepSpeed's runner must not get the signal: it
    # kills pdsh and every host's launcher at once (exit 1, no checkpoint). Signal the ranks where they run; pkill
    # fails on a host with no rank yet.
    $say "preemption signal: USR1 to the ranks on $PDSH_HOSTS"
    pdsh -S -R ssh -w "$PDSH_HOSTS" "pkill -USR1 -u `id -u` -f -- `printf '%q' "$RANK_PATTERN"`" >/dev/null 2>&1 \
      || UNDELIVERED=1
  elif [[ "$SRUN_LAUNCH" == 1 ]]; then
    # srun passes USR1 to every process of each node's step, the ranks included (each node's run.sh passes it on
    # to ranks that were not up yet).
    log "preemption signal: USR1 to srun"
    kill -USR1 "$1" 2>/dev/null || true
  elif [[ "$OTHER_LAUNCHER" == 1 ]]; then
    # Another DS_LAUNCHER (mpich, impi; untested): its runner relays SIGTERM as it can.
    log "preemption signal: relaying SIGTERM to the DeepSpeed runner"
    kill -TERM "$1" 2>/dev/null || true
  elif [[ "$LAUNCHED" == train ]]; then
    # This node's ranks (a local launch, or this node's share of an srun launch) are still starting.
    $say "preemption signal: no rank is up yet; passing it on once one is"
    UNDELIVERED=1
  elif [[ -z "${DS_TRAIN_NODE_RANK:-}" ]]; then
    log "preemption signal: no rank is up yet; stopping the launcher"
    kill -TERM "$1" 2>/dev/null || true
  fi
}

demo() {
  local demo_dir="runs/demo"
  local t0=$SECONDS
  rm -rf "$demo_dir/out"
  [[ -f "$demo_dir/tiny-model/config.json" ]] || "$VENV/bin/ds-train" make-tiny "$demo_dir/tiny-model"
  [[ -f "$demo_dir/voice/train.jsonl" ]] || "$VENV/bin/ds-train" make-demo-data "$demo_dir/voice" --n 24 --n-eval 4 \
    --voice held
  ( launch prepare configs/demo.yaml )
  ( launch train configs/demo.yaml )
  "$PY" -m ds_train.demo.summary "$demo_dir/out" "$(( SECONDS - t0 ))"
}

cmd="${1:-demo}"
[[ $# -gt 0 ]] && shift
ensure_venv
case "$cmd" in
  demo) demo ;;
  test)
    export PATH="$VENV/bin:$PATH"
    # A venv made before the suite ran in parallel lacks pytest-xdist.
    "$PY" -c "import xdist" 2>/dev/null || install_project
    # Most of a test's time waits on launched ranks' start-up; two files at a time keep 2 cores busy (a file's tests
    # stay on one worker, sharing its fixtures' runs). Later pytest arguments win: -n 0 runs in this process.
    exec "$PY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  train|prepare|bench-train|make-pairs)
    for a in "$@"; do  # help needs no ranks
      if [[ "$a" == "-h" || "$a" == "--help" ]]; then exec "$VENV/bin/ds-train" "$cmd" --help; fi
    done
    rc=0; launch "$cmd" "$@" || rc=$?; exit "$rc" ;;
  *) exec "$VENV/bin/ds-train" "$cmd" "$@" ;;
esac
