"""`mtl train` (and ``torchrun --nproc-per-node N -m mtl.train``): one stage of §III-A from
the parameters, on the corpus they name.  The stages themselves are mtl.training."""

from __future__ import annotations

import argparse
import sys

from mtl import distributed
from mtl.params import load_params, recipe_params
from mtl.training.config import STAGES, StageConfig
from mtl.training.loop import train_stage
from mtl.training.stage import corpus_batches, run_fingerprint, stage_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl train", description="Train one stage of §III-A.")
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="a partial YAML overlaid on --params")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--out", required=True, help="output folder: last.pt, final.pt, log.csv")
    parser.add_argument("--init", default=None,
                        help="checkpoint to start from (required for finetune: the frozen stage's final.pt)")
    parser.add_argument("--recipe", default=None, help="a recipe of the parameters' `recipes` section "
                        "(e.g. paper); default: the parameters as they are")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set loss.memory_size=0 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = load_params(args.params, args.set, args.profile)
    if args.recipe:
        params = recipe_params(params, args.recipe)
    cfg = StageConfig.from_params(params, args.stage)
    if args.stage == "finetune" and args.init is None:
        raise SystemExit("mtl train: --stage finetune needs --init (the frozen stage's final.pt)")
    distributed.init_from_env(cfg.distributed_backend)  # torchrun: join the other processes
    try:
        model = stage_model(params, cfg, args.init)
        train_stage(model, cfg, *corpus_batches(params, cfg, model), args.out,
                    fingerprint=run_fingerprint(params, cfg, model, args.init))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
