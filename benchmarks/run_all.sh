#!/usr/bin/env bash
# Regenerate every benchmark result on the current machine, then the tables in docs/PERFORMANCE.md.
#
#   benchmarks/run_all.sh            # auto: CUDA if torch sees a GPU, else CPU; all stages
#   benchmarks/run_all.sh cpu        # CPU numbers (about 25 minutes on 2 cores)
#   benchmarks/run_all.sh cuda       # GPU numbers (about 7 minutes on one H100)
#   benchmarks/run_all.sh cpu quick  # smoke run of every script (about 5 minutes), results in benchmarks/runs/quick
#
# Stages can be chosen with STAGES="train ops compile ensemble malloc table" (default: all; "ops": operators dispatched
# per step and, on CUDA, host syncs; "compile" is CUDA only: training steps under torch.compile; "malloc" is CPU only:
# page faults per call of the cases where one large batched pass lost to sequential passes, with glibc's default
# allocator settings and with mmap-backed allocations off); OUTDIR overrides the result folder; PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DEVICE=${1:-auto}
MODE=${2:-full}
STAGES=${STAGES:-"train ops compile ensemble malloc table"}
if [[ "$DEVICE" == auto ]]; then
    DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
QUICK=()
SEQ_MINILM=(--seq-len 128 512 --batch 8 2)
SEQ_LLAMA=(--seq-len 128 512 --batch 4 1)
ROUNDS=(--repeats 5)
OUTDIR=${OUTDIR:-benchmarks/results}
if [[ "$MODE" == quick ]]; then
    # smoke run: one short sequence per model, fewer steps and rounds, results outside the tracked folder
    QUICK=(--quick)
    SEQ_MINILM=(--seq-len 64 --batch 4)
    SEQ_LLAMA=(--seq-len 64 --batch 2)
    ROUNDS=()
    OUTDIR=benchmarks/runs/quick
fi
mkdir -p "$OUTDIR"
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
run() { echo "+ $*"; "$@"; }

if [[ "$DEVICE" == cpu ]]; then
    if has train; then
        run $PY benchmarks/train_step.py --device cpu --model minilm "${SEQ_MINILM[@]}" "${QUICK[@]}" \
            --out "$OUTDIR/train_step_cpu_minilm.json"
        run $PY benchmarks/train_step.py --device cpu --model llama "${SEQ_LLAMA[@]}" "${QUICK[@]}" \
            --out "$OUTDIR/train_step_cpu_llama.json"
    fi
    if has ops; then
        run $PY benchmarks/op_count.py --device cpu --model minilm llama --seq-len 128 --batch 2 \
            --out "$OUTDIR/op_count_cpu.json"
    fi
    if has ensemble; then
        # 5 rounds: a shared 2-core machine sees bursts of other load; medians over 5 interleaved rounds absorb them
        run $PY benchmarks/ensemble.py --device cpu "${ROUNDS[@]}" "${QUICK[@]}" --out "$OUTDIR/ensemble_cpu.json"
    fi
    if has malloc && [[ "$MODE" != quick ]]; then
        # page faults per call of the CPU cases where one large batched pass lost to sequential passes
        run $PY benchmarks/cpu_page_faults.py --out "$OUTDIR/cpu_page_faults.json"
    fi
else
    if has train; then
        run $PY benchmarks/train_step.py --device cuda --model minilm llama --seq-len 128 128 512 --batch 2 8 8 \
            "${QUICK[@]}" --out "$OUTDIR/train_step_cuda.json"
    fi
    if has ops; then
        run $PY benchmarks/op_count.py --device cuda --model minilm llama --llama-size base --seq-len 128 --batch 2 \
            --out "$OUTDIR/op_count_cuda.json"
    fi
    if has compile; then
        # torch.compile (inductor): the compile-friendly path measured where host overhead decides
        run $PY benchmarks/train_step.py --device cuda --compile --model llama --seq-len 128 --batch 2 \
            --configs peft_lora,peft_dropout,ab_s1_batch,ab_s4_batched "${QUICK[@]}" \
            --out "$OUTDIR/train_step_cuda_compiled.json"
    fi
    if has ensemble; then
        run $PY benchmarks/ensemble.py --device cuda "${QUICK[@]}" --out "$OUTDIR/ensemble_cuda.json"
    fi
fi
if has table && [[ "$MODE" != quick ]]; then
    run $PY benchmarks/make_table.py --results benchmarks/results --write docs/PERFORMANCE.md
fi
