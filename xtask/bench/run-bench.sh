#!/usr/bin/env bash
# Staged by `cargo xtask bench` into stage/bench/; runs on the CUDA machine (no Rust needed).
# For each workload row: `fastlora bench`, then the HF+PEFT peer (and Unsloth when its wheels
# were staged and install) on the same GPU in the same run. One JSON line per measurement.
#
#   bash stage/bench/run-bench.sh                 # every row
#   ROWS="smollm2-135m:8:2048:unsloth" bash stage/bench/run-bench.sh
#   PEERS="peft" bash stage/bench/run-bench.sh    # which peers: "peft unsloth" (default), "" for none
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rows="${ROWS:-smollm2-135m:8:2048:unsloth llama-3.2-1b:4:2048:unsloth llama-3.2-1b:4:2048:false llama-3.1-8b:2:2048:unsloth}"
peers="${PEERS-peft unsloth}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u +%FT%TZ

unsloth_ready=0
if [[ " $peers " == *" unsloth "* ]] && [ -d "$here/wheels" ]; then
  if python3 -m pip install -q --no-deps --no-index "$here"/wheels/*.whl >/dev/null 2>&1 \
     && tar xzf "$here/wheels/bnb.tgz" -C "$(python3 -c 'import site;print(site.getsitepackages()[0])')"; then
    unsloth_ready=1
  else
    echo '{"peer":"unsloth","error":"wheels did not install"}'
  fi
fi

status=0
for row in $rows; do
  IFS=: read -r shape batch seq ckpt <<<"$row"
  echo "### $shape b$batch x $seq ckpt=$ckpt"
  bash "$here/run.sh" bench --device cuda --shape "$shape" --batch "$batch" --seq "$seq" \
    --use-gradient-checkpointing "$ckpt" || status=1
  # peft_bench takes a bool; unsloth_bench passes its value to use_gradient_checkpointing.
  ck=True; [ "$ckpt" = "false" ] && ck=False
  case "$ckpt" in unsloth) ck_unsloth="'unsloth'" ;; true) ck_unsloth=True ;; *) ck_unsloth=False ;; esac
  # After each peer's own line (peak *allocated*, as torch reports it), one line with torch's
  # peak *reserved* memory over the same run (the scripts reset the peak stats at their start):
  # fastlora reports what CubeCL's pools reserve, so that is the like-for-like figure.
  reserved="import json, torch; print(json.dumps(dict(peer=NAME, peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))))"
  if [[ " $peers " == *" peft "* ]]; then
    (cd "$here/peers" && python3 -c "import peft_bench as p; p.run('$shape', $batch, $seq, $ck); ${reserved/NAME/\"peft\"}") || status=1
  fi
  if [ "$unsloth_ready" = 1 ]; then
    (cd "$here/peers" && python3 -c "import unsloth_bench as p; p.run('$shape', $batch, $seq, $ck_unsloth); ${reserved/NAME/\"unsloth\"}") || status=1
  fi
done
exit $status
