"""Training with several processes (torchrun, mtl.distributed) is training with one.

Two gloo processes on the CPU, each with half of every batch, must take the step one
process takes on the whole batch: the same loss on every rank, the same gradients once
summed over ranks, the same cross-batch memory (identical on both ranks), the same
BatchNorm statistics.  Only rank 0 writes; a killed run resumes from its checkpoint and
ends where an uninterrupted run ends.

The one-step comparison runs the network in float64.  The two runs add the same numbers
in another order; in float32 that moves an activation by ~1e-6, and one ReLU6 input that
close to its kink (a few among millions) switches its gradient on or off: a true
difference, far above rounding.  In float64 none is that close.  The loss itself stays
float32 (mtl.loss casts), so the tolerances below are float32 rounding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mtl import distributed
from mtl.model import MTLNet, ModelConfig, load_checkpoint
from mtl.training.config import StageConfig
from mtl.training.loop import StageRun, train_stage
from tests import configs

WORLD = 2
K, V = 16, 4  # the paper's batch of 64: 2 ranks x 8 instances x 4 views
# One step's numbers, one process vs two: float rounding only (sums in another order).
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
GRADIENT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    """This process runs on one thread, as each rank does: sharded embeddings are then equal
    bit for bit (another thread count splits the convolutions' sums otherwise and moves the
    last bits, ~1e-7), and on a busy machine OpenMP threads do not spin against other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, port: int, worker, args) -> None:
    """One rank, started as torchrun would start it (environment), on one thread."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env("gloo")
    try:
        worker(rank, *args)
    finally:
        distributed.shutdown()


def launch(worker, *args) -> None:
    mp.spawn(_process, args=(free_port(), worker, args), nprocs=WORLD, join=True)


def tiny_model(seed: int = 0) -> MTLNet:
    torch.manual_seed(seed)
    return MTLNet(ModelConfig(pretrained=False))


# ---------------------------------------------------------------------------- one step, 2 x 32 == 1 x 64

SCENARIOS = {
    # the whole network learns, backbone BatchNorm on batch statistics, a cross-batch memory
    "finetune_bn_train_memory": dict(stage="finetune", bn="train", memory_size=128),
    # stage 1 from stored taps, within-batch negatives (references with gradient), KoLeo
    "frozen_taps_within_batch_koleo": dict(stage="frozen", source="features", memory_size=0, lambda_koleo=0.5),
}


def scenario_config(name: str) -> StageConfig:
    # lr 0: the second step sees the same weights, and a memory holding the first batch.
    # A wide margin: random embeddings put many negatives inside it.
    settings = {**dict(epochs=1, lr=0.0, instances_per_batch=K, views_per_instance=V, image_size=32, device="cpu",
                       amp=False, channels_last=False, num_workers=0, margin=1.4, warmup_steps=0, source="images",
                       views="single"), **SCENARIOS[name]}
    return configs.stage_config(settings.pop("stage"), **settings)


def global_batches(cfg: StageConfig, steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random inputs (images, or non-negative taps); the second batch shares half of its
    instances with the first, so the memory holds positives."""
    generator = torch.Generator().manual_seed(7)
    shape = (3, cfg.image_size, cfg.image_size) if cfg.source == "images" else (320, 3, 3)
    batches = []
    for step in range(steps):
        inputs = torch.randn(K * V, *shape, generator=generator, dtype=torch.float64)
        if cfg.source == "features":
            inputs = inputs.clamp(0, 6)  # ReLU6 outputs
        ids = (torch.arange(K) + step * K // 2).repeat_interleave(V)
        batches.append((inputs, ids, ids % 2))
    return batches


def take_steps(cfg: StageConfig, batches, rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's part of each batch through StageRun.train_step; what each step left."""
    run = StageRun(tiny_model().double(), cfg, Path("unused"), steps_per_epoch=len(batches))
    run.model.train()
    rows = len(batches[0][1]) // world
    records = []
    for step, batch in enumerate(batches):
        local = tuple(part[rank * rows:(rank + 1) * rows] for part in batch)
        parts, counts = run.train_step(local, step)
        records.append({
            "loss": {name: getattr(parts, name).detach().clone() for name in parts._fields
                     if getattr(parts, name) is not None},
            "counts": {name: int(value) for name, value in counts.items()},
            "gradients": {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None},
            "memory": {name: value.clone() for name, value in run.criterion.contrastive.state_dict().items()},
            "weights": {name: value.clone() for name, value in run.model.state_dict().items()},
        })
    return records


def _step_worker(rank: int, name: str, out_dir: Path) -> None:
    cfg = scenario_config(name)
    torch.save(take_steps(cfg, global_batches(cfg), rank, WORLD), out_dir / f"rank{rank}.pt")


def assert_all_close(ours: dict, theirs: dict, what: str, **tolerance) -> float:
    """Every entry within tolerance; returns the largest absolute difference seen."""
    assert ours.keys() == theirs.keys(), what
    worst = 0.0
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=lambda m: f"{what} {key}: {m}", **tolerance)
        if ours[key].is_floating_point() and ours[key].numel():
            worst = max(worst, float((ours[key] - theirs[key]).abs().max()))
    return worst


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_take_the_single_process_step(name, tmp_path):
    cfg = scenario_config(name)
    single = take_steps(cfg, global_batches(cfg))
    launch(_step_worker, name, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for step, (one, *others) in enumerate(zip(single, *ranks)):
        first = others[0]
        for other in others[1:]:  # every rank holds the very same numbers
            for key in ("loss", "gradients", "memory", "weights"):
                assert all(torch.equal(first[key][k], other[key][k]) for k in first[key]), (step, key)
            assert first["counts"] == other["counts"]
        assert first["counts"] == one["counts"], step
        assert one["counts"]["active_negatives"] > 0 and one["counts"]["positive_pairs"] > 0
        worst = {key: assert_all_close(first[key], one[key], f"step {step} {key}", **tolerance)
                 for key, tolerance in (("loss", LOSS_TOLERANCE), ("gradients", GRADIENT_TOLERANCE),
                                        ("memory", LOSS_TOLERANCE), ("weights", WEIGHT_TOLERANCE))}
        print(f"{name} step {step}: largest difference 2 x {K * V // 2} vs 1 x {K * V}: {worst}")
    if cfg.memory_size:
        assert int(single[-1]["memory"]["filled"]) == 2 * K * V  # both global batches, in order
    if cfg.bn == "train":  # BatchNorm statistics of the global batch, not of each half
        assert any("running_mean" in k and not torch.equal(v, torch.zeros_like(v))
                   for k, v in ranks[0][-1]["weights"].items() if k.startswith("backbone."))


# ---------------------------------------------------------------------------- kill and resume

RESUME_K, RESUME_V = 4, 2


def resume_config() -> StageConfig:
    return configs.stage_config("finetune", epochs=2, lr=1e-4, instances_per_batch=RESUME_K,
                                views_per_instance=RESUME_V, image_size=32, device="cpu", amp=False,
                                channels_last=False, num_workers=0, memory_size=16, bn="train", warmup_steps=0,
                                views="single")


def rank_batches(epoch: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Two global batches per epoch, a function of the epoch; this rank's half of each."""
    generator = torch.Generator().manual_seed(100 + epoch)
    rows = RESUME_K * RESUME_V // WORLD
    batches = []
    for step in range(2):
        images = torch.randn(RESUME_K * RESUME_V, 3, 32, 32, generator=generator)
        ids = (torch.arange(RESUME_K) + 10 * step).repeat_interleave(RESUME_V)
        batches.append(tuple(part[rank * rows:(rank + 1) * rows] for part in (images, ids, ids % 2)))
    return batches


def _training_worker(rank: int, out_dir: Path, model_seed: int, kill: bool) -> None:
    def batches(epoch: int):
        local = rank_batches(epoch, rank)
        if kill and epoch == 2 and rank == 1:
            def dies_after_one_step():  # rank 1 dies in epoch 2; torch's launcher then ends rank 0
                yield local[0]
                raise KeyboardInterrupt("simulated kill")
            return dies_after_one_step()
        return local

    train_stage(tiny_model(model_seed), resume_config(), batches, None, out_dir)


def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path):
    launch(_training_worker, tmp_path / "straight", 0, False)
    straight = load_checkpoint(tmp_path / "straight" / "final.pt")
    assert straight["world_size"] == WORLD and len(straight["history"]) == 2
    # Whichever rank ends first; the survivor's socket is closed or reset by the dead peer, by timing.
    with pytest.raises(mp.ProcessRaisedException, match="simulated kill|closed by peer|reset by peer"):
        launch(_training_worker, tmp_path / "resumed", 0, True)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "resumed" / "final.pt").exists()
    # Another starting model: the weights must come from the checkpoint.
    launch(_training_worker, tmp_path / "resumed", 1, False)
    resumed = load_checkpoint(tmp_path / "resumed" / "final.pt")
    for part in ("model_state", "loss_state"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert len(resumed["history"]) == 2
    # One writer: the log has one row per epoch, no temporary files are left behind.
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 3
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["final.pt", "last.pt", "log.csv", "steps.csv"]


# ---------------------------------------------------------------------------- the command line

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, processes: int = WORLD, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS`, this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_trains_stage_one_from_the_feature_cache_like_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m mtl.train` on a tiny corpus: rank 0 builds the
    feature cache and writes one log; the weights end where one process's end."""
    from mtl.train import main
    from tests.test_batches import write_tiny_corpus

    corpus = write_tiny_corpus(tmp_path / "corpus", {"train": 8, "val": 4, "test": 1}).parent
    common = ["--params", str(ROOT / "params.yaml"), "--stage", "frozen", "--set", f"data.corpus_dir={corpus}",
              "--set", "model.pretrained=false", "--set", "loss.memory_size=16", "--set", "features.views=2",
              "--set", f"features.dir={tmp_path / 'features'}", "--set", "train.frozen.epochs=2",
              *[f"--set=train.{setting}" for setting in ("instances_per_batch=2", "views_per_instance=2",
                                                          "image_size=32", "num_workers=0")]]
    result = torchrun("-m", "mtl.train", *common, "--out", str(tmp_path / "two"))
    assert result.stdout.count("epoch 2/2") == 1 and "processes=2" in result.stdout  # rank 0 speaks
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two, one = (load_checkpoint(tmp_path / name / "final.pt") for name in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    # float32 over four optimizer steps: rounding, grown a little by Adam's first steps
    assert_all_close(two["loss_state"], one["loss_state"], "memory", rtol=1e-3, atol=1e-4)
    assert_all_close(two["model_state"], one["model_state"], "weights", rtol=1e-3, atol=1e-4)
    assert [row["train_positive_pairs"] for row in two["history"]] == [row["train_positive_pairs"]
                                                                       for row in one["history"]]


def test_torchrun_embeds_a_part_per_process_and_joins_them_like_one_process(folder_with_copies, tmp_path):
    """`torchrun --nproc-per-node 2 -m mtl.cli embed`: one .npz, equal to one process's."""
    from mtl.eval.embed import main
    from mtl.eval.embeddings import load_npz
    from tests.test_embed import assert_same_embeddings

    folder, _ = folder_with_copies
    (folder / "broken.jpg").write_text("not a picture")  # a failure in the middle of the list
    checkpoint = tmp_path / "model.pt"
    tiny_model().save_checkpoint(checkpoint)
    common = ["--method", str(checkpoint), "--folder", str(folder), "--image-size", "48", "--batch-size", "3",
              "--num-workers", "0", "--gap-out"]
    result = torchrun("-m", "mtl.cli", "embed", *common, str(tmp_path / "gap2.npz"), "--out", str(tmp_path / "two.npz"))
    assert result.stdout.count("joined ->") == 2  # rank 0 joins both files
    assert main([*common, str(tmp_path / "gap1.npz"), "--out", str(tmp_path / "one.npz")]) == 0
    for two, one in (("two", "one"), ("gap2", "gap1")):
        assert_same_embeddings(load_npz(tmp_path / f"{two}.npz"), load_npz(tmp_path / f"{one}.npz"))
    assert list(load_npz(tmp_path / "two.npz").failed) == ["broken.jpg"]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["gap1.npz", "gap2.npz", "one.npz", "two.npz"]
