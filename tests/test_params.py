"""params.yaml, profiles and dotted overrides."""

from pathlib import Path

import pytest
import yaml

from mtl.params import deep_merge, dvc_set_args, load_params, recipe_params, set_dotted

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_has_the_documented_sections():
    params = load_params(ROOT / "params.yaml")
    assert {"data", "evalset", "model", "loss", "train", "features", "recipes", "embeddings", "diagnose", "eval"} <= set(params)
    assert {"frozen", "finetune"} <= set(params["train"])
    assert params["train"]["instances_per_batch"] * params["train"]["views_per_instance"] == 64
    assert {"paper", "best", "paper_mem0", "best_mem0"} <= set(params["recipes"])


def test_paper_recipe_keeps_table_one():
    paper = recipe_params(load_params(ROOT / "params.yaml"), "paper")
    assert paper["loss"]["margin"] == 0.45
    assert paper["loss"]["memory_size"] == 10240
    for stage in ("frozen", "finetune"):
        assert paper["train"][stage]["lr"] == pytest.approx(4e-6)


def test_paper_profile_restores_the_papers_backbone_and_input_size():
    params = load_params(ROOT / "params.yaml", profile=ROOT / "profiles" / "paper.yaml")
    assert params["model"]["backbone"] == "mobilenetv2_100"
    assert params["train"]["image_size"] == 224
    assert recipe_params(params, "paper")["train"]["finetune"]["lr"] == pytest.approx(4e-6)


def test_recipes_overlay_only_what_they_change_and_can_build_on_each_other():
    params = {"loss": {"margin": 1.0, "memory_size": 2048}, "train": {"seed": 0, "frozen": {"lr": 1e-3}},
              "recipes": {"paper": {"loss": {"margin": 0.45}, "frozen": {"lr": 4e-6}},
                          "control": {"based_on": "paper", "loss": {"memory_size": 0}}}}
    control = recipe_params(params, "control")
    assert control["loss"] == {"margin": 0.45, "memory_size": 0}
    assert control["train"] == {"seed": 0, "frozen": {"lr": 4e-6}}
    assert params["loss"]["margin"] == 1.0  # the input is not modified
    with pytest.raises(KeyError, match="unknown recipe 'papr'"):
        recipe_params(params, "papr")
    with pytest.raises(KeyError, match="unknown key 'los'"):
        recipe_params({**params, "recipes": {"x": {"los": {}}}}, "x")
    with pytest.raises(ValueError, match="circle"):
        recipe_params({**params, "recipes": {"a": {"based_on": "b"}, "b": {"based_on": "a"}}}, "a")


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


def test_the_full_profiles_paper_recipe_fills_its_memory_with_a_momentum_encoder():
    """At the full corpus's scale the paper's memory of 10,240 holds less than an epoch: the
    `paper` recipe keeps it with the measured remedy (results/sweep/memory_all), `best` trains
    without it, and the default profile keeps the paper's memory as the paper states it."""
    from mtl.training.config import StageConfig

    full = load_params(ROOT / "params.yaml", profile=ROOT / "profiles" / "full.yaml")
    paper = StageConfig.from_params(recipe_params(full, "paper"), "frozen")
    assert (paper.memory_size, paper.memory_momentum) == (10240, 0.99)
    assert StageConfig.from_params(recipe_params(full, "best"), "frozen").memory_size == 0
    default = StageConfig.from_params(recipe_params(load_params(ROOT / "params.yaml"), "paper"), "frozen")
    assert (default.memory_size, default.memory_momentum) == (10240, 0.0)


def test_a_profile_mapping_that_adds_a_key_is_set_whole():
    from mtl.params import flatten

    base = {"recipes": {"paper": {"loss": {"margin": 0.45, "memory_size": 10240}}}, "loss": {"margin": 0.3}}
    overlay = {"recipes": {"paper": {"loss": {"margin": 0.45, "memory_size": 10240, "memory_momentum": 0.99}}},
               "loss": {"margin": 0.5}}
    assert flatten(overlay, base=base) == [
        ("recipes.paper.loss", {"margin": 0.45, "memory_size": 10240, "memory_momentum": 0.99}), ("loss.margin", 0.5)]
    for key, value in flatten(overlay, base=base):  # each leaf is a key the base has
        set_dotted(base, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    assert base["recipes"]["paper"]["loss"]["memory_momentum"] == 0.99
