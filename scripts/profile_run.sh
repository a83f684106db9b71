#!/usr/bin/env bash
# A profile's whole pipeline (profiles/NAME.yaml over params.yaml), then its results kept in
# results/profiles/NAME/ and the workspace back to the default profile:
#   scripts/profile_run.sh full          (what `make repro PROFILE=full` runs)
# The profile's data and models live in their own folders (its data.corpus_dir, evalset.dir,
# features.dir, pipeline.models), so the default profile's stay as they are.  Its wall time
# goes to results/profiles/NAME/run.json and its log to results/profiles/NAME/repro.log.
set -euo pipefail
name="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="$root/.venv/bin/python"; [ -x "$python" ] || python="$(command -v python3 || true)"
dvc="$root/.venv/bin/dvc"; [ -x "$dvc" ] || dvc="$(command -v dvc || true)"
if [ -z "$python" ] || [ -z "$dvc" ]; then
    echo "profile_run: no .venv/bin/python and dvc here and none on PATH; run \`make setup\` first" >&2
    exit 2
fi
# The run rewrites these and puts them back as committed: they must hold nothing uncommitted.
if ! git diff --quiet -- params.yaml dvc.lock results README.md docs; then
    echo "profile_run: params.yaml, dvc.lock, results/, README.md or docs/ have uncommitted changes;" \
         "commit or restore them first (the run puts them back as committed)" >&2
    exit 2
fi
keep="$(mktemp -d)"
own=""   # the profile's own data and model folders, once they have stepped aside (below)
put_back_own() {
    for dir in $own; do
        if [ -e "$keep/own/$dir" ]; then rm -rf "$dir"; mkdir -p "$(dirname "$dir")"; mv "$keep/own/$dir" "$dir"; fi
    done
}
trap 'put_back_own; git checkout -- params.yaml dvc.lock; rm -rf "$keep"' EXIT
"$python" -m mtl.params write "profiles/$name.yaml" --out params.yaml
start=$(date +%s)
"$dvc" repro 2>&1 | tee "$keep/repro.log"
end=$(date +%s)
"$python" -m mtl.scale_report save-profile "$name"
cp -r "results/profiles/$name" "$keep/saved"
cp "$keep/repro.log" "$keep/saved/repro.log"
printf '{"profile": "%s", "wall_seconds": %s, "date": "%s", "commit": "%s"}\n' \
    "$name" "$((end - start))" "$(date +%Y-%m-%d)" "$(git rev-parse --short HEAD)" > "$keep/saved/run.json"
# The profile's own data and models (its folders in params.yaml) step aside while the default
# profile's outputs are checked out again, so that nothing of the profile is lost there.
own="$("$python" -c 'import yaml; p = yaml.safe_load(open("params.yaml")); print(" ".join([p["data"]["corpus_dir"],
    p["evalset"]["dir"], p["features"]["dir"], p["pipeline"]["models"]]))')"
mkdir -p "$keep/own"
for dir in $own; do
    if [ -e "$dir" ]; then mkdir -p "$keep/own/$(dirname "$dir")"; mv "$dir" "$keep/own/$dir"; fi
done
# Back to the default: its parameters, lock and committed results; the profile's saved ones.
git checkout -- params.yaml dvc.lock results README.md docs
rm -rf "results/profiles/$name" && cp -r "$keep/saved" "results/profiles/$name"
"$dvc" checkout --quiet || true
put_back_own
echo "profile $name: $((end - start)) s; results in results/profiles/$name/ (workspace back to the default profile)"
