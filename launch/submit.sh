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
# Token authentication (Ray 2.60): the job server says whether it wants a token (GET
# /api/authentication_mode, which needs none). If it does, the `ray job submit` call gets
# RAY_AUTH_MODE=token and Ray reads the token from where it always looks: RAY_AUTH_TOKEN, else the file
# RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (the file a head on this machine uses). The token is checked
# against the server first; when none is found or it is refused, this stops before calling Ray and says
# what to set. The token is never printed or put on a command line.
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

fail() {  # the first line prefixed with this script's name, the others indented
  printf 'launch/submit.sh: %s\n' "$1" >&2
  shift
  printf '  %s\n' "$@" >&2
  exit 1
}

# Where Ray (src/ray/rpc/authentication/authentication_token_loader) takes the token from, in its order.
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  token_source="RAY_AUTH_TOKEN"
  token_file=""
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  token_source="RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  token_file="$RAY_AUTH_TOKEN_PATH"
else
  token_source="${HOME:-}/.ray/auth_token"
  token_file="${HOME:-}/.ray/auth_token"
fi

# Asks the job server (http or https only) for its authentication mode and, when it is "token", tries the
# token found here on an endpoint that needs one. Prints one word: disabled, accepted, refused, missing,
# or unknown (no answer, another kind of address, no Python here: `ray job submit` reports such cases).
probe_auth() {
  case "$address" in http://* | https://*) ;; *) echo unknown; return 0 ;; esac
  local probe_python
  probe_python="$(command -v python3 || command -v python || true)"
  if [[ -z "$probe_python" ]]; then
    echo unknown
    return 0
  fi
  CPPO_TOKEN_FILE="$token_file" "$probe_python" - "${address%/}" <<'PY' 2>/dev/null || echo unknown
import json
import os
import sys
import urllib.error
import urllib.request

base = sys.argv[1]
try:
    with urllib.request.urlopen(base + "/api/authentication_mode", timeout=10) as response:
        mode = json.load(response).get("authentication_mode")
except Exception:
    print("unknown")
    sys.exit(0)
if mode != "token":
    print("disabled" if mode == "disabled" else "unknown")
    sys.exit(0)
token = os.environ.get("RAY_AUTH_TOKEN", "")
if not token and os.environ["CPPO_TOKEN_FILE"]:
    try:
        with open(os.environ["CPPO_TOKEN_FILE"]) as handle:
            token = handle.read()
    except OSError:
        pass
token = token.strip()
if not token:
    print("missing")
    sys.exit(0)
request = urllib.request.Request(base + "/api/version", headers={"Authorization": "Bearer " + token})
try:
    urllib.request.urlopen(request, timeout=10).close()
    print("accepted")
except urllib.error.HTTPError as error:
    print("refused" if error.code in (401, 403) else "unknown")
except Exception:
    print("unknown")
PY
}

auth_env=()
case "$(probe_auth)" in
  accepted) auth_env=(RAY_AUTH_MODE=token) ;;
  missing)
    fail "the Ray cluster at $address requires token authentication (Ray 2.60's default once a token exists)," \
      "but no token was found here: RAY_AUTH_TOKEN is unset and $token_source is missing or empty." \
      "The token is on the head node, in ~/.ray/auth_token of the user who ran \`ray start --head\` (or in the" \
      "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH that head was started with). Copy that file here and set" \
      "RAY_AUTH_TOKEN_PATH=/path/to/the/copy (or put it at ~/.ray/auth_token), then run this again;" \
      "RAY_AUTH_MODE=token is set for the submission." ;;
  refused)
    fail "the Ray cluster at $address refused the token from $token_source: it is not the cluster's token." \
      "The cluster's token is on the head node, in ~/.ray/auth_token of the user who ran \`ray start --head\`" \
      "(or in the RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH that head was started with). Copy that file here and set" \
      "RAY_AUTH_TOKEN_PATH=/path/to/the/copy, then run this again." ;;
  *) ;;
esac

# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of options
exec env ${auth_env[@]+"${auth_env[@]}"} ray job submit --address "$address" --working-dir "$repo" --runtime-env-json "$env_vars" \
  ${SUBMIT_ARGS:-} -- "$python" -m cppo_rl.train cluster=existing "trainer.output_dir=$output_dir" "$@"
