#!/usr/bin/env bash
# The GPU checks of the weighting engine, in one go for a lent device session:
#   1. tests/test_cuda.py (every weighting in bf16 + channels_last on CUDA, solvers on device);
#   2. the step benchmark in fp32, then bf16 autocast + channels_last (T = 2, 10, 40);
#   3. peak memory at T = 40: G staged and from J, with and without chunking;
#   4. every architecture's step time and peak memory against hard sharing (ResNet-18, T = 2, 10, 40);
#   5. the pretrained trunks' step: fine-tuning, probing, probing from the feature cache.
# Results (tables as .txt, rows as .json) go to $OUT (default: bench_out/).
#   bash mtl/bench/device_check.sh
# Each part runs even if an earlier one fails; the exit status is that of the last failure.
set -u
out="${OUT:-bench_out}"
mkdir -p "$out"
status=0
run() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=$rc
}
run test_cuda python -m pytest -q tests/test_cuda.py
run step_fp32 python -m mtl.bench.step --device cuda --warmup 2 --repeats 5 --out "$out/step_fp32.json"
run step_bf16 python -m mtl.bench.step --device cuda --dtype bf16 --channels-last --warmup 2 --repeats 5 --out "$out/step_bf16.json"
for chunk in 0 4; do
    run "memory_t40_chunk$chunk" python -m mtl.bench.step --device cuda --tasks 40 --chunk "$chunk" --gramian both \
        --methods upgrad pcgrad mgda naive --warmup 1 --repeats 3 --out "$out/memory_t40_chunk$chunk.json"
done
run architectures python -m mtl.bench.architectures --device cuda --trunk resnet18 --tasks 2 10 40 --loop
run trunks python -m mtl.bench.trunks --device cuda --rounds 5 --out "$out/trunks.json"
exit $status
