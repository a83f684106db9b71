"""Which images in a folder are copies of each other?  `mtl dedup FOLDER` answers it
with the study's trained model, its calibrated threshold and the class gate.

    mtl dedup FOLDER [--out DIR] [--method best|imagenet|phash|dhash|CKPT] [--threshold T]
                     [--raw] [--decision auto|threshold|combined]
                     [--no-gate] [--min-score-report S] [--cache DIR]
                     [--move-duplicates-to DIR [--apply]]
    mtl dedup --undo DIR/moves.csv

In order:
  1. every image file under FOLDER (recursively, by extension) is digested (sha256);
  2. files whose digest the cache does not know yet are embedded; the cache is keyed by
     file content and model, so a rerun on a grown folder embeds only the new files.
     Unreadable files are counted and skipped (mtl.data.imageio says why);
  3. each image's density in the folder (the mean similarity to its k nearest other
     images) normalizes the scores: s' = cosine - beta (density(a) + density(b)) / 2, so
     a pair scores high when its images are closer to each other than to their usual
     neighbours, and one threshold means the same in every folder (`--raw`: plain cosine);
  4. all against all, exact search (faiss) finds the pairs scoring at least the
     threshold; with the combined decision (the default where the val split chose it),
     pairs whose 64-bit pHashes are within a few bits are duplicates too;
  5. with an MTL checkpoint an embedding pair is kept only if both images' predicted
     content classes agree: the class gate, the paper's proposal against false positives
     (`--no-gate` turns it off);
  6. kept pairs are grouped around keepers, without chaining: every member of a group
     matches its keeper itself; a keeper is the file with the most pixels, then the
     oldest (modification time), then the first path;
  7. `--out` receives pairs.csv (a, b, score, cosine, hamming, same_class, kept, why),
     groups.json and report.html (mtl.dedup.report).

Methods and thresholds.  The pipeline's evaluate stage writes models/operating_points.json:
per method, the normalization, the threshold and the combined decision chosen on the val
split (as one folder) for pair precision 0.9.
  best       the study's trained model (the default); without it, run `make repro`
  imagenet   the untrained ImageNet backbone's pooled 1280-d output (needs --threshold
             when the file has no entry for it)
  phash      64-bit perceptual hash; score = 1 - 2*hamming/64.  Without an entry the
  dhash      Hamming radius is 10 bits, imagededup's default (score 0.6875)
  CKPT       any MTLNet checkpoint: its entry is found by the file's digest, else --threshold

Nothing is ever deleted.  `--move-duplicates-to DIR` plans moving every non-keeper
into DIR (mirroring sub-folders); only `--apply` moves, and `--undo moves.csv` moves
everything back (mtl.dedup.moves).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtl.dedup import find_duplicates, moves
from mtl.dedup.cache import DEFAULT_CACHE
from mtl.dedup.thresholds import DEFAULT_IMAGE_SIZE, DedupSetupError
from mtl.eval.operating_points import DEFAULT_OPERATING_POINTS

DEFAULT_OUT = Path("dedup")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl dedup", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="the images (searched recursively)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where pairs.csv, groups.json, report.html (and moves.csv) go (default {DEFAULT_OUT}/)")
    parser.add_argument("--method", default="best", help="best (default) | imagenet | phash | dhash | CKPT")
    parser.add_argument("--operating-points", type=Path, default=DEFAULT_OPERATING_POINTS,
                        help=f"thresholds chosen on val (default {DEFAULT_OPERATING_POINTS})")
    parser.add_argument("--threshold", type=float, help="accept pairs scoring at least this (overrides the "
                        "operating point; for hashes 1 - 2*hamming/64)")
    parser.add_argument("--raw", action="store_true", help="decide on plain cosine scores (the operating point's "
                        "raw threshold), not on scores normalized by each image's density in the folder")
    parser.add_argument("--decision", choices=("auto", "threshold", "combined"), default="auto",
                        help="auto (the operating point's, default) | threshold (the embedding alone) | combined "
                             "(also pairs whose pHashes are within the operating point's radius)")
    parser.add_argument("--no-gate", action="store_true", help="keep pairs whose predicted classes differ")
    parser.add_argument("--min-score-report", type=float,
                        help="also list pairs down to this score (not grouped): near misses to review")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"embedding cache (default {DEFAULT_CACHE})")
    parser.add_argument("--image-size", type=int, help="network input size (default: the operating point's, else "
                        f"the size the checkpoint was trained at; {DEFAULT_IMAGE_SIZE} for imagenet)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    parser.add_argument("--num-workers", type=int, default=1, help="decoding workers")
    parser.add_argument("--move-duplicates-to", type=Path, metavar="DIR",
                        help="plan moving every non-keeper into DIR, mirroring sub-folders (a dry run without --apply)")
    parser.add_argument("--apply", action="store_true", help="really move (writes moves.csv into --out first)")
    parser.add_argument("--undo", type=Path, metavar="MOVES_CSV", help="move the files of a moves.csv back")
    args = parser.parse_args(argv)

    if args.undo:
        if args.folder or args.move_duplicates_to:
            parser.error("--undo takes only the moves.csv")
        return moves.undo_command(args.undo)
    if args.folder is None:
        parser.error("give the FOLDER to search (or --undo MOVES_CSV)")
    if args.apply and not args.move_duplicates_to:
        parser.error("--apply needs --move-duplicates-to DIR")
    try:
        if args.move_duplicates_to:
            moves.check_destination(args.folder, args.move_duplicates_to)
        result = find_duplicates(args.folder, args.method, args.threshold, not args.no_gate, args.min_score_report,
                                 args.operating_points, args.cache, args.image_size, args.batch_size, args.device,
                                 args.num_workers, args.raw, args.decision)
    except (DedupSetupError, moves.MoveError, FileNotFoundError, ValueError) as error:
        print(f"mtl dedup: {error}", file=sys.stderr)
        return 2
    written = result.write(args.out)
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    if args.move_duplicates_to:
        return moves.move_command(result, args.move_duplicates_to, args.out / "moves.csv", args.apply)
    return 0
