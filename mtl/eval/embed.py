"""Embed images with any method of the evaluation: one path for all of them.

    mtl embed --method CKPT|backbone_gap1280:CKPT|phash|dhash
              (--folder DIR | --list FILE | --evalset data/eval/test)
              --out x.npz [--image-size S] [--gap-out gap.npz] [--shard i/n]
    mtl embed --merge --out x.npz                   (join the parts written with --shard)
    torchrun --nproc-per-node N -m mtl.cli embed ...  (N processes: a part each, rank 0 joins them)

Methods
    CKPT                    an MTLNet checkpoint: the 320-d embedding, and the class
                            probabilities (softmax of the class branch)
    backbone_gap1280:CKPT   the pooled 1280-d output of that checkpoint's backbone,
                            L2-normalized (the paper's baseline)
    phash, dhash            64-bit perceptual hashes as ±1/8 vectors (mtl.eval.baselines)

One backbone pass gives both the MTL embedding and the 1280-d descriptor, so
`embed_many(checkpoint, ...)` returns both (`--gap-out` on the command line).  A
checkpoint embeds at the input size it was trained at unless `--image-size` says
otherwise.  Every model embeds through one loop, :func:`describe_batches`.

Images are decoded by DataLoader workers while the network runs (mtl.eval.images);
unreadable files are listed in `failed` with a reason and skipped, never a crash.  The
output is an embeddings file (mtl.eval.embeddings).

Sharding: part i of n is a contiguous run of whole batches of the image list, written
to `x.part-i-of-n.npz`; joined in order, the parts are the single-process file (same ids,
order and vectors: every image is embedded in the very batch one process would put it in).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtl import distributed
from mtl.data.batches import to_model_input
from mtl.eval.baselines import HASH_BITS, HASH_METHODS, hash_vector
from mtl.eval.embeddings import EmbeddingResult, Provenance, merge_parts, npz_path, part_path, save_npz
from mtl.eval.images import (ImageList, failures, image_batches, images_in_evalset, images_in_folder, images_in_list,
                             shard_images)
from mtl.io import UserError, file_digest, overlaps
from mtl.model import MTLNet, load_checkpoint, trained_image_size
from mtl.runtime import resolve_device

GAP_PREFIX = "backbone_gap1280:"


# --------------------------------------------------------------------------- methods

def parse_method(method: str) -> tuple[str, Path | None]:
    """('mtl', ckpt) | ('gap1280', ckpt) | ('phash', None) | ('dhash', None)."""
    if method in HASH_METHODS:
        return method, None
    if method.startswith(GAP_PREFIX):
        return "gap1280", Path(method[len(GAP_PREFIX):])
    path = Path(method)
    if path.suffix in {".pt", ".pth", ".ckpt"} or path.is_file():
        return "mtl", path
    raise ValueError(f"unknown method {method!r}: give a checkpoint path, {GAP_PREFIX}CKPT, "
                     f"or one of {', '.join(HASH_METHODS)}")


def embed_hashes(kind: str, images: ImageList, batch_size: int = 256, num_workers: int = 1) -> EmbeddingResult:
    """pHash or dHash of every readable image (computed in the decoding worker)."""
    vectors, kept, bad_all = [], [], []
    start = time.perf_counter()
    prepare = functools.partial(hash_vector, method=kind)
    for indices, batch, bad in image_batches(images.paths, prepare, batch_size, num_workers, f"embed {kind}"):
        if batch is not None:
            vectors.append(batch)
            kept += indices
        bad_all += bad
    seconds = time.perf_counter() - start
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, HASH_BITS), np.float32)
    return _result(images, kept, bad_all, embeddings, kind, seconds, Provenance(kind, HASH_BITS))


def _result(images: ImageList, kept: list[int], bad: list[tuple[int, str]], embeddings: np.ndarray,
            method: str, seconds: float, provenance: Provenance, class_probs: np.ndarray | None = None,
            class_names: Sequence[str] | None = None) -> EmbeddingResult:
    failed, reasons = failures(images, bad)
    roles = None if images.roles is None else np.array([images.roles[i] for i in kept], dtype=str)
    return EmbeddingResult(
        ids=np.array([images.ids[i] for i in kept], dtype=str), embeddings=embeddings.astype(np.float32),
        method=method, images_per_second=len(kept) / seconds if seconds > 0 else float("nan"),
        class_probs=class_probs, failed=failed, failed_reasons=reasons, roles=roles,
        class_names=None if class_names is None else np.array(class_names, dtype=str),
        provenance=replace(provenance, dim=int(embeddings.shape[1])))


def embed_many(checkpoint: str | Path, images: ImageList, image_size: int | None = None, batch_size: int = 128,
               device: str = "auto", num_workers: int = 1, allow_empty: bool = False) -> dict[str, EmbeddingResult]:
    """{"mtl": embedding + class probs, "gap1280": the backbone's 1280-d} from one pass, at
    `image_size` (default: the size the checkpoint was trained at).  No readable image is
    an error unless `allow_empty` (a part of a sharded list)."""
    dev = resolve_device(device)
    if image_size is None:
        image_size = trained_image_size(load_checkpoint(checkpoint))
        if image_size is None:
            raise UserError(f"{checkpoint} records no training image size: give the input size (--image-size)")
    model = MTLNet.from_checkpoint(checkpoint, map_location=dev)
    many = describe_images(model, images, str(checkpoint), image_size, batch_size, dev, num_workers,
                           checkpoint_digest=file_digest(checkpoint))
    if not len(many["mtl"].ids) and not allow_empty:
        first = many["mtl"].failed_reasons[0] if len(many["mtl"].failed_reasons) else "no images"
        raise ValueError(f"none of the {len(images.paths)} images could be read (first reason: {first})")
    return many


def describe_batches(model: MTLNet, batches: Iterable[torch.Tensor], device: torch.device
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The model-embedding loop: (unit embeddings, class probabilities, unit 1280-d
    backbone descriptors) of each batch of model inputs, from one backbone pass each, in
    channels_last (1.2-1.5x faster convolutions on CPU here, and on tensor cores) and, on
    CUDA, float16."""
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    for batch in batches:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = model.describe(batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            described = (F.normalize(out.embedding.float(), dim=1).cpu().numpy(),
                         out.logits.float().softmax(dim=1).cpu().numpy(),
                         F.normalize(out.gap.float(), dim=1).cpu().numpy())
        yield described


def describe_images(model: MTLNet, images: ImageList, name: str, image_size: int, batch_size: int = 128,
                    device: str | torch.device = "auto", num_workers: int = 1, checkpoint_digest: str | None = None
                    ) -> dict[str, EmbeddingResult]:
    """embed_many for a model already in memory (a checkpoint, or the untrained ImageNet
    backbone of `mtl dedup --method imagenet`).  `name` becomes the results' method and
    `checkpoint_digest` (the file's, or None) their provenance.  Unlike embed_many, a
    list with no readable image gives empty results, not an error: a folder's new files
    may all be broken."""
    dev = resolve_device(device) if isinstance(device, str) else device
    mean, std = model.normalization
    prepare = functools.partial(to_model_input, image_size=image_size, mean=mean, std=std)
    kept, bad_all = [], []

    def readable_batches() -> Iterator[torch.Tensor]:
        for indices, batch, bad in image_batches(images.paths, prepare, batch_size, num_workers,
                                                 f"embed {Path(name).name}", pin_memory=dev.type == "cuda"):
            bad_all.extend(bad)
            if batch is not None:
                kept.extend(indices)
                yield batch

    start = time.perf_counter()
    parts = list(describe_batches(model, readable_batches(), dev))
    seconds = time.perf_counter() - start
    config = model.config

    def stacked(column: int, width: int) -> np.ndarray:
        return np.concatenate([part[column] for part in parts]) if parts else np.zeros((0, width), np.float32)

    made = Provenance("mtl", 0, checkpoint_digest, image_size, tuple(mean), tuple(std))
    return {
        "mtl": _result(images, kept, bad_all, stacked(0, config.embed_dim), name, seconds, made,
                       stacked(1, config.num_classes), list(config.class_names)),
        "gap1280": _result(images, kept, bad_all, stacked(2, model.spec.head_channels), GAP_PREFIX + name,
                           seconds, replace(made, kind="gap1280")),
    }


def embed_pictures(model: MTLNet, pictures: Sequence[Image.Image], image_size: int, batch_size: int = 64,
                   device: torch.device | None = None) -> np.ndarray:
    """Unit embeddings of pictures in memory (the evaluation's preprocessing), on the
    model's device unless told."""
    mean, std = model.normalization
    device = device or next(model.parameters()).device
    batches = (torch.stack([to_model_input(p, image_size, mean, std) for p in pictures[i:i + batch_size]])
               for i in range(0, len(pictures), batch_size))
    return np.concatenate([embeddings for embeddings, _, _ in describe_batches(model, batches, device)])


def embed(method: str, image_paths: Sequence[str | Path], ids: Sequence[str] | None = None,
          image_size: int | None = None, batch_size: int = 128, device: str = "auto", num_workers: int = 1,
          roles: Sequence[str] | None = None) -> EmbeddingResult:
    """Embed images with one method (see the module docstring); ids default to the paths;
    a checkpoint's input size defaults to the size it was trained at."""
    paths = [Path(p) for p in image_paths]
    ids = [str(p) for p in image_paths] if ids is None else [str(i) for i in ids]
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids for {len(paths)} images")
    images = ImageList(paths, ids, None if roles is None else list(roles))
    kind, checkpoint = parse_method(method)
    if kind in HASH_METHODS:
        return embed_hashes(kind, images, num_workers=num_workers)
    return embed_many(checkpoint, images, image_size, batch_size, device, num_workers)[kind]


# --------------------------------------------------------------------------- command line

def report_failures(result: EmbeddingResult, out=None) -> None:
    out = out or sys.stderr
    if len(result.failed):
        reasons, counts = np.unique(result.failed_reasons, return_counts=True)
        summary = ", ".join(f"{r}: {c}" for r, c in zip(reasons, counts))
        print(f"skipped {len(result.failed)} unreadable image(s) ({summary}):", file=out)
        for id_, reason in list(zip(result.failed, result.failed_reasons))[:20]:
            print(f"  {id_}  [{reason}]", file=out)


def _merge_and_report(outputs) -> None:
    for path in outputs:
        merged = merge_parts(path)
        print(f"{len(merged.ids)} embeddings ({merged.dim}-d, {merged.method}) joined -> {path}")


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard takes i/n with 0 <= i < n, got {text!r}")
    return int(match[1]), int(match[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl embed", description="Write embeddings (+ class probabilities) "
                                     "of images to .npz.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[2])
    parser.add_argument("--method", help="best (the pipeline's trained model, else the released one) | CKPT | "
                        "backbone_gap1280:CKPT | phash | dhash")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--folder", type=Path, help="every image file under this folder")
    source.add_argument("--list", type=Path, help="a text file with one image path per line")
    source.add_argument("--evalset", type=Path, help="an eval split, e.g. data/eval/test (references + queries)")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--gap-out", type=Path, help="with a checkpoint: also write its 1280-d backbone "
                        "descriptors here (same pass)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="network input size (default: the size the checkpoint was trained at)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    parser.add_argument("--num-workers", type=int, default=1, help="decoding workers")
    parser.add_argument("--shard", type=parse_shard, help="i/n: embed only part i (0..n-1) of the images, into "
                        "OUT.part-i-of-n.npz (under torchrun: the rank's part, joined by rank 0)")
    parser.add_argument("--merge", action="store_true", help="join the parts of --out (and --gap-out) written "
                        "with --shard into one file, then delete them")
    args = parser.parse_args(argv)
    outputs = {"out": args.out, **({"gap_out": args.gap_out} if args.gap_out else {})}
    if args.merge:
        _merge_and_report(outputs.values())
        return 0
    if args.method is None or not (args.folder or args.list or args.evalset):
        parser.error("--method and one of --folder, --list, --evalset are required (unless --merge)")

    if args.folder:
        images = images_in_folder(args.folder)
    elif args.list:
        images = images_in_list(args.list)
    else:
        images = images_in_evalset(args.evalset)
    if args.method == "best":
        from mtl.release import best_model

        checkpoint_path, _, which = best_model()
        print(f"--method best: {which}")
        args.method = str(checkpoint_path)
    kind, checkpoint = parse_method(args.method)
    if args.gap_out and kind != "mtl":
        parser.error("--gap-out needs a checkpoint as --method")
    if args.gap_out and overlaps(npz_path(args.out), npz_path(args.gap_out)):
        raise UserError(f"--out and --gap-out name one file ({npz_path(args.out)}): give two")
    joined_by_rank_zero = distributed.init_from_env("gloo")  # torchrun: a process per part
    shard = distributed.shard() if joined_by_rank_zero else args.shard
    if shard is not None:
        images = shard_images(images, *shard, args.batch_size)
        outputs = {key: part_path(path, *shard) for key, path in outputs.items()}
    if kind in HASH_METHODS:
        results = {"out": embed_hashes(kind, images, num_workers=args.num_workers)}
    else:
        many = embed_many(checkpoint, images, args.image_size, args.batch_size, args.device, args.num_workers,
                          allow_empty=shard is not None)
        results = {"out": many[kind]}
        if args.gap_out:
            results["gap_out"] = many["gap1280"]
    for key, result in results.items():
        path = save_npz(result, outputs[key])
        print(f"{len(result.ids)} embeddings ({result.dim}-d, {result.method}) at "
              f"{result.images_per_second:.1f} img/s -> {path}")
    report_failures(results["out"])
    if joined_by_rank_zero:
        distributed.barrier()  # every part is written
        if distributed.is_main():
            _merge_and_report([args.out, *([args.gap_out] if args.gap_out else [])])
        distributed.shutdown()
    elif shard is not None:
        print(f"part {shard[0]} of {shard[1]} written; once all are: mtl embed --merge --out {args.out}")
    return 0
