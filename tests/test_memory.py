"""The cross-batch memory's variants for a memory shorter than an epoch (mtl.loss and
mtl.training.loop): a momentum encoder fills it, a warm-up keeps it to the current batch,
a refresh embeds the stored views again, the negative mean over every compared pair, and
a bank of each picture's last view that supplies positives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl.loss import CrossBatchContrastiveLoss, dense_pair_terms
from mtl.model import MTLNet, ModelConfig
from mtl.training.loop import StageRun
from tests import configs

DIM = 8


def unit(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_the_negative_mean_over_every_compared_pair():
    anchors, labels = unit(8, 0), torch.arange(4).repeat_interleave(2)
    nonzero = CrossBatchContrastiveLoss(1.2, 16, DIM)
    every = CrossBatchContrastiveLoss(1.2, 16, DIM, negative_reduction="all")
    value_nonzero, value_every = nonzero(anchors, labels), every(anchors, labels)
    terms = dense_pair_terms(anchors, labels, anchors, labels, torch.arange(8), 1.2)
    positive = terms.positive.sum() / (terms.positive > 0).sum()
    assert value_every == pytest.approx(float(positive + terms.negative.sum() / terms.negatives_compared), abs=1e-5)
    assert value_nonzero == pytest.approx(float(positive + terms.negative.sum() / (terms.negative > 0).sum()), abs=1e-5)
    assert every.last_stats["active_negatives"] == nonzero.last_stats["active_negatives"]
    with pytest.raises(ValueError, match="negative_reduction"):
        CrossBatchContrastiveLoss(1.2, 16, DIM, negative_reduction="mean")


def test_keys_are_stored_instead_of_the_batch():
    loss = CrossBatchContrastiveLoss(0.45, 16, DIM)
    anchors, keys, labels = unit(4, 1), unit(4, 2), torch.tensor([0, 0, 1, 1])
    loss(anchors, labels, keys=keys)
    torch.testing.assert_close(loss.memory_embeddings[:4], keys)


def test_the_bank_supplies_a_positive_after_the_memory_forgot_the_picture():
    labels_first, labels_later = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 3])
    for positives in (False, True):
        loss = CrossBatchContrastiveLoss(0.45, 4, DIM, memory_positives=positives)  # holds one batch
        loss(unit(4, 3), labels_first)
        loss(unit(4, 4), labels_later)  # picture 0 is no longer in the memory
        loss(unit(4, 5), torch.tensor([0, 0, 4, 4]))
        # within the batch each of the two views of 0 and 4 has one positive; the bank adds
        # picture 0's stored view as a positive of both of its views
        assert loss.last_stats["positive_pairs"] == 4 + (2 if positives else 0)
    with pytest.raises(ValueError, match="needs a memory"):
        CrossBatchContrastiveLoss(0.45, 0, DIM, memory_positives=True)
    loss.reset_memory()
    assert len(loss.bank_filled) == 0


def taps_batch(seed: int, instances: int = 4, views: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    taps = torch.randn(instances * views, 320, 2, 2, generator=generator)
    labels = torch.arange(seed * instances, (seed + 1) * instances).repeat_interleave(views)
    return taps, labels, torch.zeros(len(labels), dtype=torch.long)


def stage_run(tmp_path, **settings) -> StageRun:
    settings = {"memory_size": 16, **settings}
    cfg = configs.stage_config("frozen", source="features", instances_per_batch=4, views_per_instance=2,
                               warmup_steps=0, lr=1e-2, channels_last=False, **settings)
    return StageRun(MTLNet(ModelConfig(pretrained=False)), cfg, tmp_path, steps_per_epoch=10)


def test_the_memory_holds_only_the_current_batch_during_its_warm_up(tmp_path):
    run = stage_run(tmp_path, memory_warmup_steps=2, memory_size=64)
    run.model.train()
    for step in range(5):
        run.train_step(taps_batch(step), step)
        # warm-up: the current batch only; then it grows from the last warm-up batch on
        assert run.criterion.contrastive.stored == (8 if step < 2 else 8 * step), step


def test_the_momentum_encoder_fills_the_memory_and_follows_the_network(tmp_path):
    run = stage_run(tmp_path, memory_momentum=0.9)
    run.model.train()
    before = [p.detach().clone() for p in run.key_model.parameters()]
    taps, labels, classes = taps_batch(0)
    with torch.no_grad():
        run.key_model.train()
        expected = run.key_model.heads(taps).embedding
    run.train_step((taps, labels, classes), 0)
    torch.testing.assert_close(run.criterion.contrastive.memory_embeddings[:8], expected, atol=1e-5, rtol=0)
    for key, start, now in zip(run.key_model.parameters(), before, run.model.parameters()):
        torch.testing.assert_close(key, 0.9 * start + 0.1 * now.detach(), atol=1e-6, rtol=0)
    checkpoint = tmp_path / "last.pt"
    run.save(checkpoint)
    again = stage_run(tmp_path, memory_momentum=0.9)
    again.restore(torch.load(checkpoint, weights_only=True))
    for a, b in zip(again.key_model.parameters(), run.key_model.parameters()):
        assert torch.equal(a, b)


def test_a_refresh_embeds_the_stored_views_again_with_the_current_network(tmp_path):
    run = stage_run(tmp_path, memory_refresh_steps=3)
    run.model.train()
    batches = [taps_batch(step) for step in range(3)]
    for step, batch in enumerate(batches):
        run.train_step(batch, step)
    run.model.eval()
    with torch.no_grad():  # 16 slots: the third batch overwrote the first
        stored = torch.cat([batches[2][0], batches[1][0]]).half().float()
        expected = run.model.heads(stored).embedding
    torch.testing.assert_close(run.criterion.contrastive.memory_embeddings[:16], expected, atol=1e-4, rtol=0)


def test_the_probe_splits_the_gradient_between_memory_and_batch_negatives(tmp_path):
    from mtl.memory_study import probe_step

    run = stage_run(tmp_path, margin=1.9, memory_size=32)  # every negative inside the margin
    run.model.train()
    statistics = [m.running_mean.clone() for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    first = probe_step(run, taps_batch(0))
    assert first["stored"] == 0 and first["active_memory"] == 0 and first["grad_memory"] == 0
    assert first["active_batch"] == 8 * 6  # each anchor against the 6 views of other pictures
    after = [m.running_mean for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(statistics, after))  # the probe leaves BatchNorm alone
    run.train_step(taps_batch(0), 0)
    second = probe_step(run, taps_batch(1))
    assert second["stored"] == 8 and second["active_memory"] == 8 * 8
    assert second["share_from_memory"] == 64 / (64 + 48)
    assert second["grad_memory"] > 0 and second["grad_batch"] > 0 and 0 <= second["grad_angle"] <= 180
    assert 0 <= second["mean_norm"] <= 1 and -1 <= second["memory_alignment"] <= 1


def test_probe_runs_are_named_by_memory_and_momentum_and_add_keeps_the_others(tmp_path):
    import json

    import pandas as pd

    from mtl.memory_study import earlier_records, summarize, with_run_names

    # a probe.csv from before runs had names: the memory size names them
    old = pd.DataFrame({"memory_size": [10240, 10240, 0, 0], "step": [0, 1, 0, 1], "epoch": 1,
                        **{c: [0.5, 0.6, 0.5, 0.4] for c in ("mean_norm", "batch_similarity", "memory_alignment",
                                                           "memory_mean_norm", "active_memory", "active_batch",
                                                           "share_from_memory", "grad_memory", "grad_batch",
                                                           "grad_angle")}})
    named = with_run_names(old)
    assert list(named["run"].unique()) == ["10240", "0"]
    assert list(named["label"].unique()) == ["memory 10,240", "no memory"]
    old.to_csv(tmp_path / "probe.csv", index=False)
    (tmp_path / "scores.json").write_text(json.dumps({"10240": {"muap": 0.2}, "0": {"muap": 0.8}}))
    kept, scores = earlier_records(tmp_path, {"10240_m0.99", "0"})  # the no-memory run is repeated
    assert set(kept[0]["run"]) == {"10240"} and scores == {"10240": {"muap": 0.2}}
    momentum = old[old["memory_size"] == 10240].assign(momentum=0.99)
    summary = summarize(pd.concat([*kept, momentum]), {"10240": {"muap": 0.2}, "10240_m0.99": {"muap": 0.7}})
    assert list(summary["run"]) == ["10240", "10240_m0.99"]
    assert list(summary["label"]) == ["memory 10,240", "memory 10,240, momentum encoder m=0.99"]
    assert list(summary["val_muap"]) == [0.2, 0.7]
