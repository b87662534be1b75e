#!/usr/bin/env bash
# One call on the GPU machine: validate the tree, then run what is asked. Everything lands in $OUT
# (logs packed into logs.tgz, JSON lines copied) so that a session's few device calls come back whole.
#
#   bash benchmarks/gpu_session.sh check                 # precompile, `pytest -m gpu` in 5 parallel runs
#   bash benchmarks/gpu_session.sh check attention step  # ... then the attention benchmark and step profile
# Steps: check, attention, step, sampled (sampler kernel on), kernels, tune, tune-e (the e* epilogue tiles
# against their plain twins), sampler, quantize (8B g128),
# quantize-no-gptq-kernel (the same with QSERVE_LITE_GPTQ_KERNEL=0), quantize-pc (per-channel), bench,
# ray-install (from build/wheels/b*: benchmarks/device_wheels.py's bundles, carried one per call), batch.
# LIMIT (seconds, default 570) bounds the whole call: a step starts only with enough time left.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD QSERVE_GIT_SHA=${QSERVE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/gpu_session}
LOGS=$OUT/logs
mkdir -p "$LOGS"
touch "$LOGS/.start"
T0=$(date +%s)
LIMIT=${LIMIT:-570}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
mark() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOGS/timeline.txt"; }
# run NAME NEEDED_SECONDS CMD...: runs CMD with the time that is left, if at least NEEDED_SECONDS
run() {
    local name=$1 need=$2; shift 2
    local l; l=$(left)
    if [ "$l" -lt "$need" ]; then mark "$name skipped ($l s left)"; return; fi
    timeout $(( l - 5 )) "$@" > "$LOGS/$name.log" 2>&1
    mark "$name rc=$?"
}
PT=(python -m pytest -q -p no:cacheprovider -o addopts= -m gpu -rfE --durations=5)

check() {
    run precompile-gemm 60 python benchmarks/kernels.py --precompile-only --workers 12
    run precompile-attn 40 python benchmarks/attention.py --precompile-only --workers 4
    local l; l=$(( $(left) - 10 ))
    [ "$l" -lt 120 ] && { mark "tests skipped"; return; }
    # the decode-attention file alone took 195 s of a 227 s run (H200, 2026-12-02): split in two
    timeout $l "${PT[@]}" tests/kernels/test_attention_gpu.py -k "quant_out or prefill" \
        > "$LOGS/tests-attn.log" 2>&1 & local a=$!
    timeout $l "${PT[@]}" tests/kernels/test_attention_gpu.py -k "not (quant_out or prefill)" \
        > "$LOGS/tests-attn2.log" 2>&1 & local e=$!
    timeout $l "${PT[@]}" tests/kernels/test_kernels_gpu.py tests/kernels/test_step_fusions_gpu.py \
        tests/kernels/test_gptq_gpu.py tests/kernels/test_sample_gpu.py > "$LOGS/tests-kernels.log" 2>&1 & local b=$!
    timeout $l "${PT[@]}" tests/kernels/test_attention_sm90_gpu.py > "$LOGS/tests-prefill.log" 2>&1 & local c=$!
    timeout $l "${PT[@]}" tests/engine tests/e2e tests/vlm tests/bench tests/server tests/quant \
        > "$LOGS/tests-rest.log" 2>&1 & local d=$!
    # explicit PIDs: a bare `wait` would also wait for any other child of this shell
    wait $a; mark "tests-attn rc=$?"; wait $b; mark "tests-kernels rc=$?"
    wait $c; mark "tests-prefill rc=$?"; wait $d; mark "tests-rest rc=$?"; wait $e; mark "tests-attn2 rc=$?"
    grep -h -E "passed|failed|error" "$LOGS"/tests-*.log | tail -n 10 | tee -a "$LOGS/timeline.txt"
}

for step in "$@"; do
    case $step in
        check) check ;;
        attention) run attention 90 python benchmarks/attention.py --quick --out "$OUT" ;;
        step) run step 150 python benchmarks/step_profile.py --modes overlap --fusions on,off --steps 20 \
                  --results-dir "$OUT" ;;
        sampled) QSERVE_LITE_SAMPLER_KERNEL=1 run sampled 120 python benchmarks/step_profile.py --modes overlap \
                     --steps 20 --sampled --prefill-tokens 0 --results-dir "$OUT/sampled-kernel" ;;
        kernels) run kernels 200 python benchmarks/kernels.py --quick --skip-rows --out "$OUT" ;;
        tune) run tune 300 python benchmarks/kernels.py --tune --ms 64,256,1024,4096 --skip-rows --out "$OUT" ;;
        tune-e) run tune-e 200 python benchmarks/kernels.py --tune --tune-only e,h128x256,b128x128,h64x256 \
                    --ms 256,1024,4096 --skip-rows --out "$OUT" ;;
        sampler) run sampler 60 python benchmarks/sampler.py ;;
        quantize) run quantize 480 python benchmarks/quantize_scale.py --dir build/scale --device gpu \
                      --group-sizes 128 ;;
        quantize-no-gptq-kernel) QSERVE_LITE_GPTQ_KERNEL=0 run quantize-no-gptq-kernel 600 \
                                     python benchmarks/quantize_scale.py --dir build/scale --device gpu --group-sizes 128 ;;
        quantize-pc) run quantize-pc 480 python benchmarks/quantize_scale.py --dir build/scale --device gpu \
                         --group-sizes -1 ;;
        bench) run bench 150 python -m qserve_lite.cli bench --model llama-3-8b --precision w4a8kv4 --batch 1024 \
                   --num-requests 1024 --device gpu --json-out "$OUT/bench.jsonl" ;;
        ray-install) run ray-install 60 bash -c 'python -m pip install --no-index $(printf -- "--find-links %s " build/wheels/b*) \
                         "ray[data]" && python -c "import ray, ray.data; print(ray.__version__)"' ;;
        batch) run batch 300 python benchmarks/batch_vs_generate.py ;;
        *) mark "unknown step $step" ;;
    esac
done
find benchmarks/results -name '*.jsonl' -newer "$LOGS/.start" -exec cp {} "$OUT"/ \;  # this call's lines
mark end
tar czf "$OUT/logs.tgz" -C "$OUT" logs && cp "$LOGS/timeline.txt" "$OUT/" && rm -rf "$LOGS"
