#!/usr/bin/env bash
# Put the results of a GPU call (studies/gpu/call.sh's res.tar.xz) into the study folders:
#     bash studies/gpu/unpack.sh <files_at>/res.tar.xz
# cs_tune -> studies/commonsense/results/tune, cs_main -> studies/commonsense/results/main, instruct ->
# studies/instruct/results/main, squad_main -> studies/glue/results/squad_main (new files only: the committed runs stay).
# Each call's tarball holds every result so far, so unpacking the last one is enough; unpacking each is harmless.
set -euo pipefail
cd "$(dirname "$0")/../.."
tarball=$(realpath "${1:?usage: studies/gpu/unpack.sh RES_TAR_XZ}")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xJf "$tarball" -C "$tmp"
copy() {  # $1: folder in the tarball, $2: study folder, $3: cp flag
  [ -d "$tmp/$1" ] || return 0
  mkdir -p "$2"
  local n; n=$(find "$tmp/$1" -maxdepth 1 -name '*.json' | wc -l)
  find "$tmp/$1" -maxdepth 1 -name '*.json' -exec cp ${3:-} {} "$2/" \;
  echo "$1: $n results -> $2"
}
copy cs_tune studies/commonsense/results/tune
copy cs_main studies/commonsense/results/main
copy instruct studies/instruct/results/main
copy squad_main studies/glue/results/squad_main -n
