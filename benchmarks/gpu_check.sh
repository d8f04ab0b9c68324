#!/usr/bin/env bash
# One-shot GPU check, at most about 8 minutes on one H100/H200. From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default benchmarks/gpu_out
#
# 1. the kernel and layer tests on CUDA (tests/test_kernels.py, tests/test_lora.py with every
#    tensor the tests make placed on the GPU: the real Triton kernels, no interpreter);
# 2. bench_lora.py at the design shape (tokens 8192, in = out = 4096, r 16, bf16, dropout 0.1)
#    and at 4096 / 2048 / 1024 tokens (where `auto` should switch paths): base GEMMs vs our
#    fused Triton kernels vs cuBLAS + Triton dropout kernels vs our torch path vs PEFT's layer,
#    with each row's per-kernel times (--profile);
# 3. bench_train.py on a random Llama-3.2-1B-shaped model (1.2B parameters, bf16): our `fit`
#    (`auto`: the torch path at these 450-700-token batches; packed batches, and padded ones)
#    vs transformers' Trainer + PEFT, training tokens/s.
#
# Each step has its own time limit and a failing step does not stop the next; logs, JSON and
# the tables (in benchmarks/RESULTS.md format) land in OUT_DIR. Needs torch, triton,
# transformers, peft, lightning, jsonargparse[signatures] and pytest (pytest-xdist if present).
set -u
OUT_DIR="${1:-benchmarks/gpu_out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-tests bench_lora bench_train}"  # a subset reruns only those
status=0

step() {  # step NAME SECONDS COMMAND...: run, log, time, remember failure
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "$OUT_DIR/$name.log"
    [ $rc -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv 2>&1
    "$PY" - <<'EOF'
import platform, torch, triton, transformers, lightning
try:
    import peft; pv = peft.__version__
except ImportError:
    pv = "missing"
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} "
      f"transformers {transformers.__version__} lightning {lightning.__version__} peft {pv}")
print(f"device {torch.cuda.get_device_name()} SMs "
      f"{torch.cuda.get_device_properties(0).multi_processor_count}")
EOF
} | tee "$OUT_DIR/machine.txt"

# parallel workers compile the autotuned kernels side by side; a stuck test fails on its own
EXTRA=()
"$PY" -c "import xdist" 2>/dev/null && EXTRA+=(-n 8 -p no:benchmark)
"$PY" -c "import pytest_timeout" 2>/dev/null && EXTRA+=(--timeout 90)
step tests 180 env LORA_LIGHTNING_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    "${EXTRA[@]}" --tb=short -rfE tests/test_kernels.py tests/test_lora.py
step bench_lora 150 "$PY" benchmarks/bench_lora.py --dtype bf16 --dropout 0.1 --profile \
    --shapes 8192x4096x4096x16 4096x4096x4096x16 2048x4096x4096x16 1024x4096x4096x16 \
    --out "$OUT_DIR/bench_lora.json"
step bench_train 150 "$PY" benchmarks/bench_train.py --models llama-1b --device cuda \
    --n_unknown 150 --batch_size 16 --epochs 4 --repeats 1 \
    --variant "padded=--data.packing=false" --out "$OUT_DIR/bench_train.json"
exit $status
