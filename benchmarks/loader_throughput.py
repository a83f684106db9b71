"""Is decoding/augmenting the training data the bottleneck?

Times the same training step (MTLNet, K x V batch, AdamW) fed three ways:
  synthetic   random tensors already in memory (the model's own ceiling),
  real        make_stage_batches() over real originals (decode, copy transformation,
              crop, normalize, in DataLoader workers), caches warm (epochs >= 2),
  loader      the batches alone, no model (how fast the data side could go).
and prints images/s and the ratio real / synthetic (1.0 = the loader costs nothing).

Real data: data/corpus/manifest.csv when it exists, else a small corpus cut from the
photos shipped with scikit-image / scikit-learn (written to a temporary folder).

    python benchmarks/loader_throughput.py [--stage frozen|finetune] [--batches 12]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtl.data.batches import make_stage_batches

DEFAULT_MANIFEST = Path("data/corpus/manifest.csv")


def write_sample_corpus(root: Path, count: int = 96, side: int = 320) -> Path:
    """`count` random crops (<= `side` px) of the scikit-image / scikit-learn sample photos."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *load_sample_images().images]
    rng = np.random.default_rng(0)
    rows = []
    for n in range(count):
        photo = photos[n % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = min(h, side), min(w, side)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        name = f"s{n:04d}.jpg"
        Image.fromarray(photo[y:y + ch, x:x + cw]).save(root / name, quality=90)
        rows.append({"id": name[:-4], "path": name, "class": ("scene", "clipart")[n % 2], "source": "sample",
                     "group": str(n), "split": "train", "hash": str(n), "width": cw, "height": ch})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def build_model(stage: str, image_size: int):
    from mtl.model import ModelConfig, MTLNet

    model = MTLNet(ModelConfig(pretrained=False), load_pretrained=False)
    model.freeze_backbone(stage == "frozen")
    model.train()
    return model.to(memory_format=torch.channels_last)


def train_step(model, optimizer, images: torch.Tensor, instances: torch.Tensor, classes: torch.Tensor) -> None:
    """A stand-in for the multi-task loss: same forward/backward cost, no dependency on mtl.loss."""
    out = model(images.contiguous(memory_format=torch.channels_last))
    same = (instances[:, None] == instances[None, :]).float()
    similarity = out.embedding @ out.embedding.T
    loss = F.cross_entropy(out.logits, classes) + ((similarity - same) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def images_per_second(batches, step, limit: int) -> float:
    count, started = 0, time.perf_counter()
    for i, (images, instances, classes) in enumerate(batches):
        if i >= limit:
            break
        step(images, instances, classes)
        count += len(images)
    return count / (time.perf_counter() - started)


def cycle_epochs(make, first_epoch: int):
    epoch = first_epoch
    while True:
        yield from make(epoch)
        epoch += 1


def measure(manifest: Path, args: argparse.Namespace, workers: int, model, step) -> dict[str, float]:
    """Rounds of one synthetic block then one real block of `args.batches` steps each; each
    real block starts a fresh epoch, so no batch was prepared for free during the synthetic
    block.  Other processes' load hits both halves of a round alike: we report the median
    of the per-round ratios."""
    make = make_stage_batches(manifest, manifest.parent, "train", args.instances, args.views, args.image_size,
                              model.normalization, seed=0, num_workers=workers)
    batch_size = args.instances * args.views
    # Epoch 0 decodes every original into the cache (at most one epoch, as in a real run).
    cold = images_per_second(make(0), lambda *b: None, len(make(0)))
    loader = images_per_second(cycle_epochs(make, 1), lambda *b: None, args.batches)
    synthetic_batch = (torch.randn(batch_size, 3, args.image_size, args.image_size),
                       torch.arange(args.instances).repeat_interleave(args.views),
                       torch.randint(0, 2, (batch_size,)))
    synthetic, real = [], []
    for round_ in range(args.rounds):
        synthetic.append(images_per_second([synthetic_batch] * args.batches, step, args.batches))
        real.append(images_per_second(cycle_epochs(make, 1 + round_), step, args.batches))
    ratios = [r / s for r, s in zip(real, synthetic)]
    return {"cold": cold, "loader": loader, "synthetic": float(np.median(synthetic)), "real": float(np.median(real)),
            "ratio": float(np.median(ratios)), "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--stage", choices=["frozen", "finetune"], default="frozen")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers to compare")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating synthetic/real rounds (median)")
    args = parser.parse_args(argv)

    tmp = None
    manifest = args.manifest
    if not manifest.is_file():
        tmp = tempfile.TemporaryDirectory()
        manifest = write_sample_corpus(Path(tmp.name))
        print(f"{args.manifest} not found: using {manifest} (sample photos)")
    model = build_model(args.stage, args.image_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = lambda *batch: train_step(model, optimizer, *batch)  # noqa: E731
    batch_size = args.instances * args.views
    for _ in range(2):  # warm-up: allocator, oneDNN kernels
        step(torch.randn(batch_size, 3, args.image_size, args.image_size),
             torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.long))
    print(f"batch {args.instances}x{args.views}={batch_size}, {args.image_size} px, stage {args.stage}, "
          f"torch threads {torch.get_num_threads()}")
    for workers in args.workers:
        r = measure(manifest, args, workers, model, step)
        print(f"\n{workers} DataLoader worker(s):")
        print(f"  loader alone, first epoch (decoding): {r['cold']:8.1f} img/s")
        print(f"  loader alone, cache warm:             {r['loader']:8.1f} img/s")
        print(f"  train step, synthetic tensors:        {r['synthetic']:8.1f} img/s")
        print(f"  train step, real data:                {r['real']:8.1f} img/s")
        print(f"  ratio real / synthetic: {r['ratio']:.2f} (median of rounds: "
              f"{', '.join(f'{x:.2f}' for x in r['ratios'])})")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
