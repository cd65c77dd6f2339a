#!/usr/bin/env bash
# Slim the working tree for a GPU call, and restore it. A call carries the whole working tree (25 MB, 19 MB of it the
# committed GLUE results) plus the named .carry folder, at most 64 MiB together; the calls of studies/gpu/README.md
# need none of those results except squad_tune (squad_main.yaml's select_from) and squad_main (so its finished runs
# are not rerun). They are committed, so `back` restores them from git.
#     bash studies/gpu/tree.sh out     # before the calls: moves them to /tmp/loradrop-slim
#     bash studies/gpu/tree.sh back    # after: git restores them exactly
set -euo pipefail
cd "$(dirname "$0")/../.."
big="studies/glue/results/tune studies/glue/results/main studies/glue/results/ablations studies/glue/results/squad"
case "${1:-}" in
  out)
    git diff --quiet -- studies/glue/results || { echo "tree.sh: studies/glue/results has uncommitted changes" >&2; exit 2; }
    rm -rf /tmp/loradrop-slim && mkdir -p /tmp/loradrop-slim
    for d in $big; do mv "$d" /tmp/loradrop-slim/; done
    size=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 du -cb 2>/dev/null || true; } | tail -1)
    echo "the tree a call carries now: ${size%%[[:space:]]*} bytes (a call: 67,108,864 with its carry)" ;;
  back)
    git checkout -- studies/glue/results && git status --short studies/glue/results ;;
  *) echo "usage: studies/gpu/tree.sh out|back" >&2; exit 2 ;;
esac
