#!/usr/bin/env bash
# Build the side folder that benchmarks/qlora_step.py needs on a GPU machine without peft/bitsandbytes:
# benchmarks/runs/qlora_site (git-ignored) with peft and bitsandbytes installed --no-deps, and of bitsandbytes' native
# libraries only the CUDA one the GPU machine's torch loads (plus the CPU one), so it fits a 64 MiB carry.
#
#   benchmarks/qlora_gpu_site.sh 130      # torch.version.cuda 13.0 -> libbitsandbytes_cuda130.so
#
# Wheels: $WHEELS (default /tmp/qlora_wheels) is filled with `pip download` when they are not there yet.
set -euo pipefail
tag=${1:?usage: benchmarks/qlora_gpu_site.sh CUDA_TAG (e.g. 130 for torch.version.cuda 13.0, 128 for 12.8)}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
wheels=${WHEELS:-/tmp/qlora_wheels}
peft_version=$("$python" -c "from importlib.metadata import version; print(version('peft'))")
mkdir -p "$wheels"
ls "$wheels"/peft-"$peft_version"-*.whl >/dev/null 2>&1 \
    || "$python" -m pip download "peft==$peft_version" --no-deps --only-binary :all: -d "$wheels"
ls "$wheels"/bitsandbytes-0.50.2-*.whl >/dev/null 2>&1 \
    || "$python" -m pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: -d "$wheels"
site=benchmarks/runs/qlora_site
rm -rf "$site"
"$python" -m pip install --quiet --no-deps --no-compile --target "$site" \
    "$wheels"/peft-"$peft_version"-*.whl "$wheels"/bitsandbytes-0.50.2-*.whl
test -f "$site/bitsandbytes/libbitsandbytes_cuda$tag.so" || { echo "no libbitsandbytes_cuda$tag.so in the wheel"; exit 1; }
find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$tag.so" \
    ! -name libbitsandbytes_cpu.so -delete
rm -rf "$site/bin"
du -sh "$site"
