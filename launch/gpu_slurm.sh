#!/usr/bin/env bash
# Submit a zhjax command as a SLURM job on GPU nodes: one task per node, each task driving all the node's GPUs,
# jax.distributed initialised from the SLURM variables (coordinator = first node, process id = SLURM_PROCID).
#
#   launch/gpu_slurm.sh --nodes N [--gpus-per-node G] [--partition P] [--account A] [--time HH:MM:SS]
#                       [--job-name NAME] [--venv DIR] [--log-dir DIR] [--dry-run] -- ZHJAX_ARGS...
#
#   launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --partition a100 --venv ~/zhjax/.venv -- \
#       pretrain --config configs/pretrain/llama-7b-lora.yaml init_from=/data/llama-7b-zh49953 \
#       tokenizer=/data/llama-7b-zh49953 data.train_files=[/data/pt] output_dir=/shared/zh7b mesh.fsdp=-1
#
# The batch script (printed by --dry-run instead of submitted) runs `srun --kill-on-bad-exit=1` so that SLURM
# stops every task when one fails; jax.distributed's heartbeat covers a task that hangs. Paths must be visible
# from every node (a shared filesystem or gs:// output_dir). Logs: LOG_DIR/<job name>-<job id>.out.
set -euo pipefail

dry_run=0; nodes=""; gpus=8; partition=""; account=""; time_limit="24:00:00"; job_name="zhjax"; venv=""
log_dir="outputs/slurm"
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "gpu_slurm.sh: unknown option $1 (zhjax arguments go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$nodes" ]] || { echo "gpu_slurm.sh: --nodes is required" >&2; usage 2; }
[[ $# -gt 0 ]] || { echo "gpu_slurm.sh: no zhjax command given after --" >&2; usage 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"

script="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$time_limit
#SBATCH --output=$log_dir/%x-%j.out
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}set -euo pipefail
cd $(printf '%q' "$repo")
${venv:+source $(printf '%q' "$venv")/bin/activate
}# one task per node drives all of the node's GPUs (JAX would give it only GPU \$SLURM_LOCALID otherwise)
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
srun --kill-on-bad-exit=1 python -m zhjax.cli $(printf '%q ' "$@")--distributed
"

if [[ "$dry_run" == 1 ]]; then
  echo "# sbatch would submit this script:"
  printf '%s' "$script"
  echo "# with: mkdir -p $log_dir && sbatch <script>"
  exit 0
fi
mkdir -p "$log_dir"
printf '%s' "$script" | sbatch
