#!/usr/bin/env bash
# Issue #17 on the GPU machine: benchmarks/sharded_step.py under DDP / FSDP2 / ZeRO-3 (2 GPUs, accelerate launch with
# the committed configs) and the k-ranks == one-rank tests on GPUs (NCCL). Run from the repository root:
#     OUT=/some/folder bash benchmarks/multi_gpu.sh
# Needs .carry/site.tar.xz (transformers, peft, datasets) and ${WHEELS:-.carry-x2/whl} (deepspeed 0.19.8 pure-python wheel +
# the deps the image lacks). No `set -e`: one failing step does not stop the others; a summary is printed at the end.
# Knobs (environment): BENCH_TIMEOUT (s per strategy, default 170; all stop by 540 s), PYTEST_TIMEOUT (default 300
# alongside, 200 before), PARALLEL_PYTEST (auto: with >= 4 GPUs the tests run on GPUs 2,3 while the benchmarks run
# on 0,1; 0, or 2 GPUs: the tests first, on 0,1),
# STRATEGIES (default "ddp fsdp2 zero3"), CONFIGS, STEPS, WARMUP, SEQ_LEN, PRESET, LAUNCH_ARGS (extra
# accelerate launch flags, e.g. "--mixed_precision no" for a CPU dry run).
T0=$(date +%s)
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - T0 )); }
declare -A STATUS

# ---- environment (NVLS / multicast off: mandatory on these machines)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH=/tmp/site:/tmp/dssite:$PWD/src
python3 -c "import tarfile; tarfile.open('.carry/site.tar.xz').extractall('/tmp', filter='data')" \
  && STATUS[site]=ok || STATUS[site]=FAIL
if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dssite ${WHEELS:-.carry-x2/whl}/*.whl \
     > "$OUT/pip.log" 2>&1; then STATUS[wheels]=ok
else  # wheels are zip archives: unpacking them is what --target does for these (no compiled scripts needed)
  python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/dssite') for w in glob.glob('${WHEELS:-.carry-x2/whl}/*.whl')]" \
    && STATUS[wheels]="pip failed (see pip.log), unzipped" || STATUS[wheels]=FAIL
fi
echo "setup: $(elapsed) s (site ${STATUS[site]}, wheels ${STATUS[wheels]})"

# ---- what ran where
{
  echo "date: $(date -u +%FT%TZ)"; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvidia-smi topo -m 2>/dev/null | head -12
  echo "cpus: $(nproc --all)"; python3 --version
  python3 - <<'EOF'
import importlib
for name in ("torch", "accelerate", "transformers", "peft", "datasets", "deepspeed", "pydantic", "loradrop"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {m.__file__}")
    except Exception as error:  # noqa: BLE001 - record whatever failed
        print(f"{name} IMPORT FAILED: {type(error).__name__}: {error}")
import torch
print("cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
try:
    print("nccl", torch.cuda.nccl.version())
    from deepspeed.accelerator import get_accelerator
    print("deepspeed accelerator", get_accelerator()._name)
except Exception as error:  # noqa: BLE001
    print(f"FAILED: {type(error).__name__}: {error}")
EOF
} > "$OUT/env.txt" 2>&1
NGPU=$(nvidia-smi -L | grep -c '^GPU')
cat "$OUT/env.txt"

# ---- the k-ranks == one-rank tests on GPUs (NCCL); test_distributed_trainer is FSDP2 through the Trainer there
run_pytest() {  # $1: CUDA_VISIBLE_DEVICES
  local s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$1 LORADROP_DISTRIBUTED_DEVICE=cuda timeout -k 15 "${PYTEST_TIMEOUT:-300}" \
    python3 -m pytest -q -rfEs --durations=8 -p no:cacheprovider \
    tests/test_distributed.py tests/test_distributed_trainer.py tests/test_distributed_zero.py > "$OUT/pytest.txt" 2>&1
  local rc=$?
  echo "pytest on GPUs $1: rc=$rc, $(( $(date +%s) - s )) s" >> "$OUT/pytest.txt"
  return $rc
}
PARALLEL=${PARALLEL_PYTEST:-auto}
PYTEST_PID=
if [ "$PARALLEL" = auto ] && [ "$NGPU" -ge 4 ]; then
  run_pytest 2,3 & PYTEST_PID=$!
  echo "pytest started on GPUs 2,3 (pid $PYTEST_PID) while the benchmarks run on GPUs 0,1"
else  # 2 GPUs: the tests first (bounded), so slow benchmarks cannot crowd them out
  PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-200}
  run_pytest 0,1; STATUS[pytest]="rc=$? (GPUs 0,1, before the benchmarks)"
  echo "pytest: ${STATUS[pytest]}"; tail -3 "$OUT/pytest.txt"
fi

# ---- sharded_step: plain LoRA vs LoRA Dropout, step time and peak memory per GPU, 2 GPUs
CONFIGS=${CONFIGS:-lora,loradrop_s1,loradrop_s4,loradrop_s4_chunk1}
for cfg in ${STRATEGIES:-ddp fsdp2 zero3}; do
  left=$(( 540 - $(elapsed) ))
  limit=${BENCH_TIMEOUT:-170}; [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 60 ]; then STATUS[bench_$cfg]="skipped (only ${left} s left)"; continue; fi
  s=$(date +%s)
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 15 "$limit" python3 -m accelerate.commands.launch \
    --config_file "configs/accelerate/$cfg.yaml" --num_processes 2 --main_process_port 29511 $LAUNCH_ARGS \
    benchmarks/sharded_step.py --preset "${PRESET:-3b}" --seq-len "${SEQ_LEN:-4096}" --batch 1 \
    --steps "${STEPS:-8}" --warmup "${WARMUP:-2}" --configs "$CONFIGS" \
    --out "$OUT/sharded_step_${cfg}_cuda.json" > "$OUT/sharded_step_${cfg}.log" 2>&1
  rc=$?
  STATUS[bench_$cfg]="rc=$rc, $(( $(date +%s) - s )) s (limit $limit s)"
  echo "sharded_step $cfg: ${STATUS[bench_$cfg]}"; grep -E "median step|wrote|Error|error:" "$OUT/sharded_step_${cfg}.log" | tail -8
done

if [ -n "$PYTEST_PID" ]; then
  wait "$PYTEST_PID"; STATUS[pytest]="rc=$? (GPUs 2,3, alongside the benchmarks)"
fi

# ---- summary
echo "================ summary (total $(elapsed) s)"
for k in site wheels bench_ddp bench_fsdp2 bench_zero3 pytest; do echo "$k: ${STATUS[$k]:-not run}"; done
tail -4 "$OUT/pytest.txt" 2>/dev/null
python3 - "$OUT" <<'EOF'
import json, math, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("sharded_step_*_cuda.json")):
    data = json.loads(path.read_text())
    print(f"{path.name}: {data['distributed_type']}, zero {data['deepspeed_zero_stage']}, fsdp {data['fsdp_version']}")
    for r in data["results"]:
        mem = max((x["memory"].get("max_allocated_gib", math.nan) for x in r["ranks"]), default=math.nan)
        oom = " OOM" if any("oom" in x for x in r["ranks"]) else ""
        print(f"  {r['name']:20s} step {r['median_step_s_max_over_ranks']:.3f} s  x{r.get('step_time_vs_lora', math.nan):.2f}"
              f"  peak alloc {mem:.1f} GiB{oom}")
EOF

# ---- one archive: the device tool returns at most 8 files from $OUT (on 2026-11-28 the JSONs were lost that way)
tar -C "$OUT" -czf "$OUT/multi_gpu_results.tar.gz" $(cd "$OUT" && ls sharded_step_* env.txt pytest.txt pip.log 2>/dev/null) \
  && (cd "$OUT" && rm -f sharded_step_* pip.log)
