#!/usr/bin/env bash
# The default `make repro` timed on a fresh clone, as a new user runs it: clone the
# committed tree, `make setup` (not timed: it installs), then `make repro`, timed from the
# command's own start to its end.  Writes results/timing/fresh_clone.json here (the report
# shows it under the stage times) and keeps the clone's log beside it.
#   scripts/time_fresh_clone.sh [WORK_DIR]      (default: a new folder under /tmp)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/mtl-fresh-XXXXXX)}"
git clone --quiet "$here" "$work/clone"
cd "$work/clone"
make setup > "$work/setup.log" 2>&1
start=$(date +%s.%N)
make repro > "$work/repro.log" 2>&1
end=$(date +%s.%N)
wall=$(python3 -c "print(round($end - $start, 1))")
mkdir -p "$here/results/timing"
cat > "$here/results/timing/fresh_clone.json" <<JSON
{"wall_seconds": $wall, "date": "$(date +%Y-%m-%d)", "commit": "$(git rev-parse --short HEAD)", "cores": $(nproc), "log": "$work/repro.log"}
JSON
echo "make repro on a fresh clone: $wall s (log: $work/repro.log)"
