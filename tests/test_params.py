"""params.yaml, profiles and dotted overrides."""

from pathlib import Path

import pytest
import yaml

from mtl.params import deep_merge, dvc_set_args, load_params, set_dotted

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_has_the_documented_sections():
    params = load_params(ROOT / "params.yaml")
    assert {"data", "model", "loss", "train", "eval"} <= set(params)
    assert {"frozen", "finetune"} <= set(params["train"])
    # The paper's loss settings are kept in the default profile (Table I).
    assert params["loss"]["margin"] == 0.45
    assert params["loss"]["memory_size"] == 10240
    for stage in ("frozen", "finetune"):
        s = params["train"][stage]
        assert s["instances_per_batch"] * s["views_per_instance"] == 64


def test_paper_profile_restores_table_one():
    params = load_params(ROOT / "params.yaml", profile=ROOT / "profiles" / "paper.yaml")
    assert params["model"]["backbone"] == "mobilenetv2_100"
    for stage in ("frozen", "finetune"):
        s = params["train"][stage]
        assert s["lr"] == pytest.approx(4e-6)
        assert s["image_size"] == 224
        assert s["instances_per_batch"] * s["views_per_instance"] == 64


def test_profiles_only_name_existing_keys():
    base = load_params(ROOT / "params.yaml")
    for profile in (ROOT / "profiles").glob("*.yaml"):
        for arg in dvc_set_args(profile)[1::2]:
            set_dotted(yaml.safe_load(yaml.safe_dump(base)), arg)  # raises on unknown keys


def test_dotted_override_parses_yaml_values_and_rejects_unknown_keys():
    params = {"loss": {"memory_size": 10240, "margin": 0.45}}
    set_dotted(params, "loss.memory_size=0")
    set_dotted(params, "loss.margin=0.3")
    assert params["loss"] == {"memory_size": 0, "margin": 0.3}
    set_dotted(params, "loss.margin=1e-1")  # YAML 1.1 would keep this a string
    assert params["loss"]["margin"] == 0.1
    with pytest.raises(KeyError, match="unknown key 'memroy_size'"):
        set_dotted(params, "loss.memroy_size=1")
    with pytest.raises(ValueError, match="key.path=value"):
        set_dotted(params, "loss.margin")


def test_deep_merge_keeps_untouched_keys():
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}})
    assert merged == {"a": {"b": 5, "c": 2}, "d": 3}
