#!/usr/bin/env bash
# Installs LiteLLM's proxy (`litellm[proxy]` from the Python package index)
# into a virtualenv under target/, for the keel-gateway benchmark
# (`cargo run --release -p keel-gateway --example bench`).
#
#   gateway/bench/litellm.sh            # creates target/litellm-venv
#   LITELLM_VERSION=1.110.2 gateway/bench/litellm.sh
#
# Prints the path of the `litellm` executable on its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${LITELLM_VENV:-$root/target/litellm-venv}"
spec="litellm[proxy]"
if [[ -n "${LITELLM_VERSION:-}" ]]; then
    spec="litellm[proxy]==${LITELLM_VERSION}"
fi

if [[ ! -x "$venv/bin/litellm" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$spec"
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print("litellm", m.version("litellm"))' >&2
echo "$venv/bin/litellm"
