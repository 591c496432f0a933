#!/usr/bin/env bash
# Run a zhjax command on this machine: one process, or N processes forming one multi-host job, exactly as on a
# TPU pod or a GPU cluster (jax.distributed with a local coordinator; gloo collectives between CPU processes).
#
#   launch/local.sh [--dry-run] [--processes N] [--cpu-devices M] [--port P] [--log-dir DIR] -- ZHJAX_ARGS...
#
#   launch/local.sh -- pretrain --config configs/pretrain/tiny.yaml                     # one process
#   launch/local.sh --processes 2 --cpu-devices 2 -- pretrain --config configs/pretrain/tiny.yaml \
#       output_dir=outputs/tiny-2x2                                                      # 2 hosts x 2 devices
#   launch/local.sh --dry-run -- pretrain --config configs/pretrain/llama-7b-lora.yaml  # print, run nothing
#
# Process i gets --coordinator 127.0.0.1:P --num-processes N --process-id i. Process 0 prints to the terminal
# (and its log); every process logs to DIR/process-<i>.log. If one process fails the others are stopped.
# ZHJAX (default: zhjax) is the command that is run, e.g. ZHJAX="python -m zhjax.cli".
set -euo pipefail

dry_run=0; processes=1; cpu_devices=""; port=""; log_dir="outputs/launch"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (zhjax arguments go after --)" >&2; usage 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local.sh: no zhjax command given after --" >&2; usage 2; }
read -r -a zhjax <<< "${ZHJAX:-zhjax}"
port="${port:-$(( 20000 + RANDOM % 20000 ))}"

env_vars=()
if [[ -n "$cpu_devices" ]]; then env_vars+=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$cpu_devices"); fi

command_for() {  # the full command line of process $1
  local i="$1" cmd=(env "${env_vars[@]}" "${zhjax[@]}" "${@:2}")
  if [[ "$processes" -gt 1 ]]; then
    cmd+=(--coordinator "127.0.0.1:$port" --num-processes "$processes" --process-id "$i")
  fi
  printf '%q ' "${cmd[@]}"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    echo "$(command_for "$i" "$@")> $log_dir/process-$i.log 2>&1"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = processes - 1; i >= 1; i--)); do
  eval "$(command_for "$i" "$@")" > "$log_dir/process-$i.log" 2>&1 &
  pids+=($!)
done
status=0
eval "$(command_for 0 "$@")" 2>&1 | tee "$log_dir/process-0.log" || status=$?
[[ "$status" == 0 ]] || stop_all
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then status=1; echo "local.sh: process $pid failed; see $log_dir" >&2; fi
done
exit "$status"
