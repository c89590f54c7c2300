#!/usr/bin/env bash
# Submit a cppo_rl training run to a Ray cluster as a Ray job; every argument is a Hydra override,
# passed through unchanged:
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh experiment=qwen3_8b_base trainer.run_name=cppo-8b trainer.resume=auto
#
# RAY_ADDRESS      the cluster's job server (default http://127.0.0.1:8265, a head on this machine)
# CPPO_PYTHON      the Python of the cluster's environment (default: python)
# CPPO_OUTPUT_DIR  where runs go (default /tmp/cppo_rl/runs; use a filesystem every node shares)
# CPPO_DATA_DIR    where the datasets are, for data=dapo_math (default ../shared/data)
# SUBMIT_ARGS      extra `ray job submit` options, e.g. "--no-wait"
#
# The working directory shipped with the job is this repository (Ray leaves out what .gitignore lists:
# .venv, .cache, runs). Secrets are not put in the job's runtime environment, where anyone who can
# list jobs would see them: give the cluster's nodes WANDB_API_KEY in their own environment.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
python="${CPPO_PYTHON:-python}"
output_dir="${CPPO_OUTPUT_DIR:-/tmp/cppo_rl/runs}"
env_vars=$(printf '{"env_vars": {"CPPO_DATA_DIR": "%s", "HF_HUB_OFFLINE": "%s"}}' \
  "${CPPO_DATA_DIR:-../shared/data}" "${HF_HUB_OFFLINE:-0}")
# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of options
exec ray job submit --address "$address" --working-dir "$repo" --runtime-env-json "$env_vars" ${SUBMIT_ARGS:-} \
  -- "$python" -m cppo_rl.train cluster=existing "trainer.output_dir=$output_dir" "$@"
