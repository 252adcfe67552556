#!/usr/bin/env bash
# Two commits through the shared harness, runs interleaved (A B A B ...), one JSON line per run:
#
#   benchmarks/ab.sh OUT COMMIT_A COMMIT_B [REPEAT]      e.g. RATE=2000 benchmarks/ab.sh /tmp/ab.jsonl HEAD~1 HEAD 3
#
# Each run checks the commit out in a worktree of its own (WORKTREE, default /tmp/gateway-ab) and runs
# ../shared/bench/gateway/run.sh there, which builds a venv per commit; the harness's knobs (FOLLOWERS, EVENTS,
# RATE, ...) pass through. OUT gets "COMMIT {json}" per run. The machine drifts: compare only runs of one call.
set -euo pipefail
out=$1; a=$2; b=$3; repeat=${4:-3}
repo=$(git rev-parse --show-toplevel)
bench=$(cd "$repo/../shared/bench" && pwd)
wt=${WORKTREE:-/tmp/gateway-ab}
[ -d "$wt" ] || git -C "$repo" worktree add -q --detach "$wt" "$a"
a=$(git -C "$repo" rev-parse --short "$a"); b=$(git -C "$repo" rev-parse --short "$b")
for _ in $(seq 1 "$repeat"); do
  for c in "$a" "$b"; do
    git -C "$wt" checkout -q "$c"
    line=$(cd "$wt" && bash "$bench/gateway/run.sh" 2>>"$out.log" | tail -1)
    echo "$c $line" >> "$out"
  done
done
