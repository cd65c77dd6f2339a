#!/usr/bin/env bash
# Slim the working tree for a GPU call, and restore it. A call carries the whole working tree (25 MB, 19 MB of it the
# committed GLUE results) plus the named .carry folders, at most 64 MiB together; the calls of studies/gpu/README.md
# need none of those results (the SQuAD runs they also made are done, so squad_tune and squad_main leave too), nor the
# commonsense results and logs (the committed LLM results travel in .carry/resume), the report plots or the benchmark
# results. Everything moved is committed, so `back` restores it from git.
#     bash studies/gpu/tree.sh out     # before the calls: moves them to /tmp/loradrop-slim
#     bash studies/gpu/tree.sh back    # after: git restores them exactly
#     bash studies/gpu/tree.sh size    # the bytes the slimmed tree will carry (make_carry.sh), moving nothing
# While the tree is slimmed, do not `git commit -a` / `git add -A`: that would commit the deletions.
set -euo pipefail
cd "$(dirname "$0")/../.."
big=()
for d in studies/glue/results/tune studies/glue/results/main studies/glue/results/ablations studies/glue/results/squad \
         studies/glue/results/squad_tune studies/glue/results/squad_main \
         studies/commonsense/results studies/instruct/results/main docs/REPORT_GLUE_plots \
         docs/REPORT_COMMONSENSE_plots docs/results benchmarks/results; do
  [ -n "$(git ls-files -- "$d" | head -1)" ] && big+=("$d")
done
carried() {  # the bytes of the tree a call carries: tracked and untracked-not-ignored files, less the folders above
  git ls-files -z --cached --others --exclude-standard | grep -zv -E "^($(IFS='|'; echo "${big[*]}"))/" \
    | { xargs -0 du -cb 2>/dev/null || true; } | tail -1 | cut -f1
}
case "${1:-}" in
  out)
    if [ -n "$(git status --porcelain --untracked-files=all -- "${big[@]}")" ]; then
      echo "tree.sh: uncommitted changes or new files under ${big[*]}: commit them first (out would move them away)" >&2
      exit 2
    fi
    rm -rf /tmp/loradrop-slim && mkdir -p /tmp/loradrop-slim
    for d in "${big[@]}"; do mkdir -p "/tmp/loradrop-slim/$(dirname "$d")" && mv "$d" "/tmp/loradrop-slim/$d"; done
    echo "the tree a call carries now: $(carried) bytes (a call: 67,108,864 with its carry)" ;;
  size)
    carried ;;
  back)
    git checkout -- "${big[@]}" && git status --short -- "${big[@]}" ;;
  *) echo "usage: studies/gpu/tree.sh out|back|size" >&2; exit 2 ;;
esac
