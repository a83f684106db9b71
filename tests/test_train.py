"""The two stages of §III-A: what each trains, the log, checkpoints and resume.

Instances are real photos that ship with scikit-image and scikit-learn; their views
are simple torchvision augmentations, drawn from (seed, epoch) like the real batches."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from mtl.model import MTLNet, ModelConfig, load_checkpoint, trained_image_size
from mtl.training.config import StageConfig
from mtl.training.loop import train_stage
from mtl.training.outputs import LOG_COLUMNS
from tests import configs

IMAGE_SIZE = 48
INSTANCES_PER_BATCH, VIEWS = 3, 3


def load_photos(side: int = 72) -> torch.Tensor:
    """Six real photos as [6, 3, side, side] floats in [-1, 1] (Lite0's normalization)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images]
    tensors = []
    for photo in photos:
        x = torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255.0
        x = v2.functional.resize(x, side, antialias=True)
        tensors.append(v2.functional.center_crop(x, [side, side]) * 2 - 1)
    return torch.stack(tensors)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return load_photos()


VIEW_AUGMENTATION = v2.Compose([
    v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.4, 1.0), antialias=True),
    v2.RandomHorizontalFlip(),
    v2.ColorJitter(brightness=0.3, contrast=0.3),
])


def epoch_batches(photos: torch.Tensor, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """K instances x V views per batch; instance order and views are a function of (seed, epoch)."""
    with torch.random.fork_rng():  # leave the trainer's RNG stream alone
        torch.manual_seed(seed * 10_000 + epoch)
        order = torch.randperm(len(photos))
        batches = []
        for start in range(0, len(photos) - INSTANCES_PER_BATCH + 1, INSTANCES_PER_BATCH):
            ids = order[start:start + INSTANCES_PER_BATCH].repeat_interleave(VIEWS)
            images = torch.stack([VIEW_AUGMENTATION(photos[i]) for i in ids])
            batches.append((images, ids, ids % 2))  # two content classes
    return batches


def stage_config(stage: str = "frozen", **overrides) -> StageConfig:
    """params.yaml's stage, from images, at the tests' sizes, no warm-up."""
    settings = dict(epochs=2, lr=1e-3, weight_decay=1e-4, instances_per_batch=INSTANCES_PER_BATCH,
                    views_per_instance=VIEWS, image_size=IMAGE_SIZE, seed=0, device="cpu", amp=False,
                    channels_last=False, num_workers=0, memory_size=4 * INSTANCES_PER_BATCH * VIEWS,
                    warmup_steps=0, source="images", views="single")
    return configs.stage_config(stage, **{**settings, **overrides})


def tiny_model(pretrained: bool = False, seed: int = 0) -> MTLNet:
    torch.manual_seed(seed)
    return MTLNet(ModelConfig(pretrained=pretrained))


def run(photos, model_or_init, cfg: StageConfig, out_dir: Path, val: bool = True) -> Path:
    return train_stage(model_or_init, cfg, lambda epoch: epoch_batches(photos, cfg.seed, epoch),
                       (lambda: epoch_batches(photos, cfg.seed + 1, 0)) if val else None, out_dir)


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def branch_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(("embedding.", "classifier.")) and v.is_floating_point()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.fixture(scope="module")
def frozen_run(photos, tmp_path_factory):
    model = tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out_dir = tmp_path_factory.mktemp("frozen")
    final = run(photos, model, stage_config("frozen"), out_dir)
    return initial, final, out_dir


def test_frozen_stage_leaves_backbone_bit_identical_and_trains_branches(frozen_run):
    initial, final, _ = frozen_run
    trained = load_checkpoint(final)["model_state"]
    # BatchNorm running statistics included: the frozen backbone ran in eval mode.
    assert changed(backbone_state(initial), backbone_state(trained)) == []
    branch_changes = changed(branch_state(initial), branch_state(trained))
    assert any(k.startswith("embedding.") for k in branch_changes)
    assert any(k.startswith("classifier.") for k in branch_changes)


def test_finetune_stage_starts_from_frozen_checkpoint_and_trains_backbone(photos, frozen_run, tmp_path):
    _, frozen_final, _ = frozen_run
    start = load_checkpoint(frozen_final)["model_state"]
    final = run(photos, frozen_final, stage_config("finetune", epochs=1, lr=1e-4), tmp_path, val=False)
    trained = load_checkpoint(final)["model_state"]
    assert changed(backbone_state(start), backbone_state(trained))


def test_log_has_one_row_per_epoch_with_every_column(frozen_run):
    _, _, out_dir = frozen_run
    with (out_dir / "log.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for column in LOG_COLUMNS:
            assert math.isfinite(float(row[column])), column
        assert float(row["train_negatives_compared"]) > float(row["train_active_negatives"]) >= 0
        assert 0.0 <= float(row["val_class_accuracy"]) <= 1.0
    # cosine schedule: the second epoch runs at a lower rate than the first
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(1e-3)


def test_checkpoint_holds_everything_needed_to_continue(frozen_run):
    _, final, _ = frozen_run
    checkpoint = load_checkpoint(final)
    for key in ("optimizer", "scheduler", "loss_state", "rng", "epoch", "stage_config", "model_config", "history"):
        assert key in checkpoint, key
    assert checkpoint["epoch"] == 2 and checkpoint["finished"]
    assert int(checkpoint["loss_state"]["filled"]) > 0  # the cross-batch memory is saved
    assert MTLNet.from_checkpoint(final).config == ModelConfig(pretrained=False)
    assert checkpoint["image_size"] == trained_image_size(checkpoint) == IMAGE_SIZE  # what `mtl embed` uses
    del checkpoint["image_size"]  # a checkpoint of an earlier version: its stage config tells
    assert trained_image_size(checkpoint) == IMAGE_SIZE


def test_finished_run_returns_at_once(frozen_run):
    _, final, out_dir = frozen_run

    def must_not_be_called(epoch):
        raise AssertionError("a finished run must not train again")

    assert train_stage(tiny_model(), stage_config("frozen"), must_not_be_called, None, out_dir) == final


def test_resume_after_a_kill_gives_the_same_weights(photos, tmp_path):
    cfg = stage_config("finetune", epochs=2, lr=1e-4, max_steps_per_epoch=1)
    straight = load_checkpoint(run(photos, tiny_model(), cfg, tmp_path / "straight", val=False))

    def killed_in_second_epoch(epoch):
        batches = epoch_batches(photos, cfg.seed, epoch)
        if epoch < 2:
            return batches

        def dies_after_one_step():  # the kill lands after an optimizer step of epoch 2
            yield batches[0]
            raise KeyboardInterrupt("simulated kill")

        return dies_after_one_step()

    with pytest.raises(KeyboardInterrupt):
        train_stage(tiny_model(), cfg, killed_in_second_epoch, None, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    # A different starting model proves the weights come from the checkpoint.
    resumed = load_checkpoint(run(photos, tiny_model(seed=1), cfg, tmp_path / "resumed", val=False))
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key
    for key, value in straight["loss_state"].items():
        assert torch.equal(value, resumed["loss_state"][key]), key
    assert len(resumed["history"]) == 2


def test_resume_refuses_a_changed_configuration(photos, tmp_path):
    run(photos, tiny_model(), stage_config("frozen", epochs=1, max_steps_per_epoch=1), tmp_path, val=False)
    (tmp_path / "final.pt").unlink()
    with pytest.raises(ValueError, match="margin"):
        run(photos, tiny_model(), stage_config("frozen", epochs=1, max_steps_per_epoch=1, margin=0.3), tmp_path)


def test_non_finite_loss_stops_the_run_with_a_clear_error(photos, tmp_path):
    def poisoned(epoch):
        images, ids, classes = epoch_batches(photos, 0, epoch)[0]
        return [(torch.full_like(images, float("nan")), ids, classes)]

    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        train_stage(tiny_model(), stage_config("frozen"), poisoned, None, tmp_path)


def test_stage_config_reads_params_yaml_for_every_recipe():
    from mtl.params import load_params, recipe_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    for recipe in params["recipes"]:
        resolved = recipe_params(params, recipe)
        for stage in ("frozen", "finetune"):
            cfg = StageConfig.from_params(resolved, stage)
            assert cfg.stage == stage and cfg.memory_size == resolved["loss"]["memory_size"]
            assert cfg.batch_size == 64  # the paper's batch, 16 originals x 4 views
            assert cfg.lr == resolved["train"][stage]["lr"]
    paper = recipe_params(params, "paper")
    assert StageConfig.from_params(paper, "frozen").margin == 0.45  # the paper's margin
    assert StageConfig.from_params(paper, "finetune").lr == 4e-6    # and learning rate
    assert StageConfig.from_params(recipe_params(params, "paper_mem0"), "frozen").memory_size == 0
    with pytest.raises(ValueError, match="views_per_instance"):
        stage_config(views_per_instance=1)


@pytest.mark.slow
def test_loss_falls_on_a_tiny_real_image_run(photos, tmp_path):
    """Lite0 ImageNet weights, frozen backbone: six photos are learnt as six instances."""
    cfg = stage_config("frozen", epochs=12, lr=1e-3)
    run(photos, tiny_model(pretrained=True), cfg, tmp_path)
    with (tmp_path / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))

    def mean_of(column: str, part: list[dict[str, str]]) -> float:
        return sum(float(r[column]) for r in part) / len(part)

    # Two small steps per epoch make single epochs noisy: compare the first and last three.
    for column in ("train_total", "val_total"):
        assert mean_of(column, rows[-3:]) < 0.8 * mean_of(column, rows[:3]), column


@pytest.mark.slow
def test_cli_trains_both_stages_from_params_on_a_tiny_corpus(photos, tmp_path):
    """`mtl train` end to end: params.yaml + overrides, the corpus manifest, the real batches."""
    from PIL import Image

    from mtl.train import main

    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    rows = ["id,path,class,source,group,split,hash,width,height"]
    for i, photo in enumerate(photos):
        pixels = ((photo.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(corpus / "images" / f"p{i}.jpg")
        split = "val" if i >= 4 else "train"
        rows.append(f"p{i},images/p{i}.jpg,{('scene', 'clipart')[i % 2]},test,p{i},{split},0,72,72")
    (corpus / "manifest.csv").write_text("\n".join(rows) + "\n")
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    common = ["--params", str(params), "--set", f"data.corpus_dir={corpus}", "--set", "model.pretrained=false",
              "--set", "loss.memory_size=16", "--set", f"features.dir={tmp_path / 'features'}",
              "--set", "features.views=3"]
    common += [f"--set=train.{key}" for key in
               ("instances_per_batch=2", "views_per_instance=2", "image_size=48", "num_workers=0")]
    common += [f"--set=train.{stage}.epochs=1" for stage in ("frozen", "finetune")]

    assert main([*common, "--stage", "frozen", "--out", str(tmp_path / "frozen")]) == 0
    frozen_final = tmp_path / "frozen" / "final.pt"
    assert load_checkpoint(frozen_final)["stage_config"]["memory_size"] == 16
    assert main([*common, "--stage", "finetune", "--init", str(frozen_final), "--out", str(tmp_path / "ft")]) == 0
    with (tmp_path / "ft" / "log.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert math.isfinite(float(row["val_total"]))


# ---------------------------------------------------------------------------- stage-2 BatchNorm, schedule, lr groups

def batchnorm_statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.") and ("running_" in k)}


@pytest.mark.parametrize("policy", ["frozen", "train"])
def test_finetune_batchnorm_policy(photos, frozen_run, tmp_path, policy):
    """`frozen`: the backbone's running statistics stay bit-identical while its weights
    learn; `train`: the batches rewrite them."""
    _, frozen_final, _ = frozen_run
    before = load_checkpoint(frozen_final)["model_state"]
    final = run(photos, frozen_final, stage_config("finetune", epochs=1, lr=1e-4, bn=policy), tmp_path, val=False)
    after = load_checkpoint(final)["model_state"]
    moved_statistics = changed(batchnorm_statistics(before), batchnorm_statistics(after))
    assert bool(moved_statistics) == (policy == "train")
    weights = {k: v for k, v in backbone_state(before).items() if k.endswith("weight") and "bn" not in k}
    assert changed(weights, after)  # the convolutions learn under both policies


def test_lr_zero_moves_no_weight_only_batchnorm_statistics(photos, frozen_run, tmp_path):
    """The diagnosis run: stage 2 at lr 0 changes nothing but running statistics."""
    _, frozen_final, _ = frozen_run
    before = load_checkpoint(frozen_final)["model_state"]
    final = run(photos, frozen_final, stage_config("finetune", epochs=1, lr=0.0, bn="train"), tmp_path, val=False)
    after = load_checkpoint(final)["model_state"]
    moved = changed(before, after)
    assert moved and all("running_" in k or "num_batches_tracked" in k for k in moved)


def test_warmup_then_cosine_schedule():
    from mtl.training.loop import warmup_cosine

    factor = warmup_cosine(total_steps=110, warmup_steps=10, final_fraction=0.01)
    assert [factor(t) for t in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.505)
    assert factor(109) == pytest.approx(0.01, abs=1e-3) and factor(500) == pytest.approx(0.01)
    values = [factor(t) for t in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # falls monotonically after the warm-up


def test_steps_log_and_branch_learning_rate(photos, frozen_run, tmp_path):
    _, frozen_final, _ = frozen_run
    cfg = stage_config("finetune", epochs=2, lr=1e-4, branch_lr_scale=10.0, warmup_steps=2)
    run(photos, frozen_final, cfg, tmp_path, val=False)
    optimizer = load_checkpoint(tmp_path / "final.pt")["optimizer"]
    branch_group, backbone_group = optimizer["param_groups"]
    assert branch_group["initial_lr"] == pytest.approx(1e-3) and backbone_group["initial_lr"] == pytest.approx(1e-4)
    with (tmp_path / "steps.csv").open(newline="") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]  # six photos, three per batch, two epochs
    assert float(steps[0]["lr"]) == pytest.approx(0.5e-4)  # the first warm-up step
    assert all(int(float(r["negatives_compared"])) > 0 for r in steps)


def test_a_finished_run_is_not_returned_for_another_starting_point(photos, frozen_run, tmp_path):
    """final.pt is reused only when the fingerprint (model, init, data, code) matches;
    an interrupted run of other inputs is refused, never resumed."""
    _, frozen_final, _ = frozen_run
    cfg = stage_config("finetune", epochs=1, lr=1e-4)
    batches = (lambda epoch: epoch_batches(photos, cfg.seed, epoch)), None
    first = train_stage(frozen_final, cfg, *batches, tmp_path, fingerprint={"init": "a"})
    stamp = first.stat().st_mtime_ns
    assert train_stage(frozen_final, cfg, *batches, tmp_path, fingerprint={"init": "a"}).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another model, starting point or data"):
        train_stage(frozen_final, cfg, *batches, tmp_path, fingerprint={"init": "b"})


def test_distillation_keeps_the_backbone_near_its_start_and_is_logged(photos, frozen_run, tmp_path):
    from mtl.training.loop import StageRun

    _, frozen_final, _ = frozen_run
    settings = {"epochs": 1, "lr": 3e-3, "max_steps_per_epoch": 2, "warmup_steps": 0}
    distilled = run(photos, frozen_final, stage_config("finetune", lambda_distill=50.0, **settings),
                    tmp_path / "distilled", val=False)
    plain = run(photos, frozen_final, stage_config("finetune", **settings), tmp_path / "plain", val=False)
    images = torch.nn.functional.interpolate(photos, size=IMAGE_SIZE, mode="bilinear", antialias=True)
    with torch.no_grad():
        start = MTLNet.from_checkpoint(frozen_final).eval().backbone_gap(images)
        drift = {name: float((1 - torch.nn.functional.cosine_similarity(
                     MTLNet.from_checkpoint(path).eval().backbone_gap(images), start)).mean())
                 for name, path in (("distilled", distilled), ("plain", plain))}
    assert 0 < drift["distilled"] < drift["plain"], drift
    log = list(csv.DictReader((tmp_path / "distilled" / "log.csv").open()))
    assert float(log[-1]["train_distill"]) > 0
    assert float(list(csv.DictReader((tmp_path / "plain" / "log.csv").open()))[-1]["train_distill"]) == 0
    run_ = StageRun(MTLNet.from_checkpoint(frozen_final), stage_config("finetune", lambda_distill=1.0), tmp_path, 2)
    assert run_.teacher is not None and not any(p.requires_grad for p in run_.teacher.parameters())
