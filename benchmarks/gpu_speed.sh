#!/usr/bin/env bash
# The GPU check of the speed work, one run under 8 minutes on one H100/H200 (results in $OUT):
#   1. the kernel tests on the GPU: interpreter and sm_90a tests, then every kernel on CUDA tensors and the
#      captured / compiled AR decode steps (tests/test_cuda_gpu.py);
#   2. bench_glm_image.py at 1024x1024, the pack (fused kernels, compiled + CUDA-graph decode step, regional
#      compile of the DiT) against transformers' static-cache generate and diffusers' pipeline, same run;
#   3. the step cache's seconds per step on the full-size DiT;
#   4. $OUT/performance_gpu.md: device, versions, date and the tables, for docs/performance.md.
# The reference needs the wheels of benchmarks/README.md in .whl/ (carry it). `--tiny` runs the same sequence
# on the CPU with tiny sizes (the smoke test of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--tiny" ]; then
    DEVICE=(--size tiny --device cpu --steps 2 --ar-tokens 4 --ar-batch 2 --prompt-tokens 16 --vae-repeats 1
            --pack-decode-steps compiled --pack-compile-blocks)
    STEP_CACHE=(--steps 4 --repeats 1 --height 128 --width 128)
    LIMIT=600
else
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    DEVICE=(--sizes 1024x1024 --ar-tokens 128 --decoder-steps-timed 5 --ar-batch 2 --reference-ar static
            --pack-decode-steps compiled --pack-compile-blocks)
    STEP_CACHE=(--size full --device cuda --height 1024 --width 1024 --steps 10 --repeats 1)
    LIMIT=330
fi
status=0
timeout 150 python3 -m pytest -q tests/test_cuda_kernels.py tests/test_cuda_gpu.py 2>&1 | tee "$OUT/kernel_tests.log" || status=1
timeout "$LIMIT" python3 benchmarks/bench_glm_image.py "${DEVICE[@]}" --stages ar,decoder --out "$OUT/bench.json" \
    2>&1 | tee "$OUT/bench.log" || status=1
timeout 90 python3 benchmarks/step_cache.py "${STEP_CACHE[@]}" --out "$OUT/step_cache.json" 2>&1 \
    | tee "$OUT/step_cache.log" || status=1
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
lines = ["## Measured on a GPU (benchmarks/gpu_speed.sh)", ""]
for name in ("bench.json", "step_cache.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        lines.append(f"{name}: missing (see the logs)")
        continue
    data = json.load(open(path))
    meta = data["meta"]
    lines.append(f"- {name}: {meta.get('device_name', meta.get('device'))}, torch {meta['torch']}, "
                 f"transformers {meta.get('transformers', '-')}, diffusers {meta.get('diffusers', '-')}, {meta['date']}")
    table = data.get("table")
    lines += [""] + (table if isinstance(table, list) else [str(table)] if table else []) + [""]
    if "rows" in data:
        lines += [f"| step_cache {r['threshold']:g} | {r['seconds_per_step']:.4f} s/step | "
                  f"{100 * r['steps_skipped']:.0f}% skipped | {r['time_vs_off']:.3f} x |" for r in data["rows"]]
open(os.path.join(out, "performance_gpu.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit $status
