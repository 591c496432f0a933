#!/usr/bin/env bash
# Run a zhjax command on every worker of a Cloud TPU VM slice (one process per worker host, jax.distributed
# auto-detected from the slice's metadata).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR_TYPE [--version RUNTIME] [--project PROJECT]
#                     [--spot] [--skip-install] [--log-dir gs://BUCKET/PATH] [--dry-run] -- ZHJAX_ARGS...
#
#   launch/tpu_pod.sh --name zh7b --zone us-west4-a --type v5litepod-16 --log-dir gs://my-bucket/zh7b/logs -- \
#       pretrain --config configs/pretrain/llama-7b-lora.yaml init_from=/data/llama-7b-zh49953 \
#       tokenizer=/data/llama-7b-zh49953 data.train_files=[/data/pt] output_dir=gs://my-bucket/zh7b
#
# 1. create-or-reuse: `gcloud compute tpus tpu-vm describe` the slice, `create` it when it does not exist;
# 2. install: this checkout's last commit (`git archive HEAD`: commit first) is copied to every worker and
#    `pip install -e .[tpu,gcs]`-ed (gcsfs for gs:// output and data; skip with --skip-install when the workers
#    already have this version);
# 3. run: `gcloud compute tpus tpu-vm ssh --worker=all` starts the same `zhjax ... --distributed` on all workers;
#    each worker's output goes to its terminal stream and, with --log-dir, to LOG_DIR/<hostname>.log.
# Data and base paths must exist on every worker (or be gs:// paths); output_dir may be gs:// (checkpoints are
# written there by every worker, process 0's files are uploaded at each save).
# --dry-run prints every gcloud command instead of running it.
set -euo pipefail

dry_run=0; name=""; zone=""; type=""; version=""; project=""; spot=0; install=1; log_dir=""
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-install) install=0; shift ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (zhjax arguments go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$type" ]] || { echo "tpu_pod.sh: --name, --zone and --type are required" >&2; usage 2; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no zhjax command given after --" >&2; usage 2; }
if [[ -z "$version" ]]; then  # the TPU VM runtime image of each generation
  case "$type" in
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi

run() {  # run a command, or print it with --dry-run (quoting only the words that need it)
  if [[ "$dry_run" == 0 ]]; then "$@"; return; fi
  local a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s ' "$a"; else printf '%s ' "${a@Q}"; fi
  done
  echo
}
where=(--zone "$zone"); [[ -n "$project" ]] && where+=(--project "$project")
tpu=(gcloud compute tpus tpu-vm)

# 1. create or reuse the slice
if [[ "$dry_run" == 1 ]]; then
  echo "# create the slice unless it exists:"
  run "${tpu[@]}" describe "$name" "${where[@]}"
fi
if [[ "$dry_run" == 1 ]] || ! "${tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version")
  [[ "$spot" == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. install this checkout (its last commit) on every worker
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$install" == 1 ]]; then
  archive="/tmp/zhjax-$(cd "$repo" && git rev-parse --short HEAD).tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run "${tpu[@]}" scp "$archive" "$name:zhjax.tar.gz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "rm -rf ~/zhjax && mkdir -p ~/zhjax && tar -xzf ~/zhjax.tar.gz -C ~/zhjax && python3 -m pip install -q -e \"\$HOME/zhjax[tpu,gcs]\""
fi

# 3. the same command on all workers
remote="cd ~/zhjax && python3 -m zhjax.cli $(printf '%q ' "$@")--distributed"
if [[ -n "$log_dir" ]]; then
  remote="set -o pipefail; $remote 2>&1 | tee /tmp/zhjax.log; s=\$?; gcloud storage cp /tmp/zhjax.log $log_dir/\$(hostname).log; exit \$s"
fi
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
