#!/usr/bin/env bash
# The default `make repro` timed on a fresh clone, as a new user runs it: clone the
# committed tree, `make setup` (not timed: it installs), then `make repro`, timed from the
# command's own start to its end.  Writes results/timing/fresh_clone.json here (the report
# shows it under the stage times) and keeps the clone's log beside it.
#   scripts/time_fresh_clone.sh [WORK_DIR]      (default: a new folder under /tmp)
# A WORK_DIR whose clone/ exists (set up earlier, nothing run in it) is brought to this
# checkout's commit and set up again (idempotent) instead of cloned: set-up is not timed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/mtl-fresh-XXXXXX)}"
if [ -d "$work/clone/.git" ]; then
    if [ -n "$(ls -A "$work/clone/data" 2>/dev/null)" ]; then
        echo "time_fresh_clone: $work/clone has run the pipeline already; give a new WORK_DIR" >&2
        exit 2
    fi
    git -C "$work/clone" fetch --quiet "$here" HEAD
    git -C "$work/clone" checkout --quiet --detach FETCH_HEAD
else
    git clone --quiet "$here" "$work/clone"
fi
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
