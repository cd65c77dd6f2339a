#!/usr/bin/env bash
# Put the results of a GPU call (studies/gpu/call.sh's res.tar.xz) into the study folders, after `tree.sh back`:
#     bash studies/gpu/unpack.sh <saved copy of res.tar.xz>
# cs_tune -> studies/commonsense/results/tune, cs_main -> studies/commonsense/results/main, instruct ->
# studies/instruct/results/main. Existing files are never replaced, and
# failed runs (*.failed.json) are listed, not copied (a stale one would make select_from refuse its task later).
# Each call's tarball holds every result of its machine so far; after a fresh machine, unpack each machine's last one.
# It ends with what the commonsense plans have left to run (their `--dry-run --laplace`).
set -euo pipefail
cd "$(dirname "$0")/../.."
tarball=$(realpath "${1:?usage: studies/gpu/unpack.sh RES_TAR_XZ}")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xJf "$tarball" -C "$tmp"
copy() {  # $1: folder in the tarball, $2: study folder
  [ -d "$tmp/res/$1" ] || return 0
  mkdir -p "$2"
  local new=0 kept=0 f
  for f in "$tmp/res/$1"/*.json; do
    [ -e "$f" ] || continue
    case "$f" in *.failed.json) echo "  failed: $1/$(basename "$f")"; continue ;; esac
    if [ -e "$2/$(basename "$f")" ]; then kept=$((kept + 1)); else cp "$f" "$2/"; new=$((new + 1)); fi
  done
  echo "$1 -> $2: $new new, $kept already there"
}
copy cs_tune studies/commonsense/results/tune
copy cs_main studies/commonsense/results/main
copy instruct studies/instruct/results/main
# what is left, and the LoRA runs whose Laplace fit was lost with their machine where the report needs it (delete
# those results before make_carry.sh, so the next machine trains them again with their fits)
PY=${PYTHON:-.venv/bin/python}
for plan in studies/commonsense/tune.yaml studies/commonsense/main.yaml; do
  { "$PY" -m loradrop sweep "$plan" --dry-run --laplace --settled-only 2>&1 || true; } | grep -E '^(laplace: |waiting |[0-9]+ to run|loradrop)' \
    | sed "s|^|$(basename "$plan"): |"
done
