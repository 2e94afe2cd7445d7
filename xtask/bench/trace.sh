#!/usr/bin/env bash
# A CUPTI timeline of one program on the CUDA machine (which has CUPTI and a C compiler but no
# Nsight Systems): every kernel, copy, memset and driver call with its timestamps, then
# timeline.py's summary of one steady training step (where the device idles, and whether the
# host was late or the stream was waiting).
#
#   bash stage/bench/trace.sh NAME PROGRAM [ARGS...]
#   bash stage/bench/trace.sh t1b /tmp/fastlora-gpu/fastlora bench --device cuda \
#       --shape llama-3.2-1b --batch 4 --seq 2048 --phase-steps 0 --steps 3 --warmup 2
#
# The trace goes to ${OUT:-/tmp}/NAME.csv.xz.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="$1"
shift
OUT="${OUT:-/tmp}"
nvidia_libs="$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="$nvidia_libs:${LD_LIBRARY_PATH:-}"
header=$(find /usr/local /opt -name cupti_activity.h 2>/dev/null | head -1)
library=$(find /usr/local /opt -name "libcupti.so*" 2>/dev/null | head -1)
cuda_h=$(find /usr/local -name cuda.h 2>/dev/null | head -1)
if [ -z "$header" ] || [ -z "$library" ] || [ -z "$cuda_h" ]; then
  echo "trace.sh: CUPTI headers, libcupti or cuda.h not found" >&2
  exit 1
fi
# The activity records' struct names carry a version that changes with CUDA: the newest one.
newest() { grep -oE "\} $1[0-9]*;" "$header" | tr -d '}; ' | sort -V | tail -1; }
injection=/tmp/libcupti_trace.so
gcc -shared -fPIC -O2 "$here/cupti_trace.c" -I"$(dirname "$header")" -I"$(dirname "$cuda_h")" \
  -L"$(dirname "$library")" -lcupti -DKERNEL_T="$(newest CUpti_ActivityKernel)" \
  -DMEMCPY_T="$(newest CUpti_ActivityMemcpy)" -DMEMSET_T="$(newest CUpti_ActivityMemset)" \
  -o "$injection" || exit 1
export LD_LIBRARY_PATH="$(dirname "$library"):$LD_LIBRARY_PATH"
CUPTI_TRACE_OUT="/tmp/$name.csv" CUDA_INJECTION64_PATH="$injection" "$@"
python3 "$here/timeline.py" "/tmp/$name.csv" step adamw
xz -T4 -c "/tmp/$name.csv" > "$OUT/$name.csv.xz"
