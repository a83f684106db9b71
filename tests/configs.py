"""The study's section configs as the tests build them: params.yaml's values (the only
place that holds them), with each test's own changes written over them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mtl.data.corpus import CorpusConfig
from mtl.data.evalset import EvalsetConfig, SplitCounts
from mtl.params import load_params
from mtl.training.config import StageConfig

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def study_params() -> dict:
    return load_params(PARAMS)


def corpus_config(**changes) -> CorpusConfig:
    return CorpusConfig.from_params({**study_params()["data"], **changes})


def evalset_config(**changes) -> EvalsetConfig:
    """params.yaml's evalset section with `changes`; a test that sets its own `splits` for a
    small corpus gets no photo part unless it sets `photos` too."""
    if "splits" in changes and "photos" not in changes:
        changes["photos"] = {split: SplitCounts(0, 0, 0) for split in changes["splits"]}
    return replace(EvalsetConfig.from_params(study_params()["evalset"]), **changes)


def stage_config(stage: str, **changes) -> StageConfig:
    return replace(StageConfig.from_params(study_params(), stage), **changes)
