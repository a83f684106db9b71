"""The cross-batch contrastive loss of §II-C: equal to pytorch-metric-learning's
CrossBatchMemory(ContrastiveLoss) and a FIFO memory with the promised semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl.loss import CrossBatchContrastiveLoss
from mtl.objective import MultiTaskLoss, koleo_loss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

MARGIN = 0.45


def pml_oracle(memory_size: int, embed_dim: int):
    contrastive = pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=MARGIN)
    if memory_size == 0:
        return contrastive
    return pml_losses.CrossBatchMemory(contrastive, embed_dim, memory_size=memory_size)


def unit_batch(generator: torch.Generator, batch: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=generator), dim=1)


def run_both(batches, memory_size: int, dim: int):
    """Feed the same batches to ours and to PML; yield (ours, pml, grad_ours, grad_pml, stats)."""
    ours = CrossBatchContrastiveLoss(MARGIN, memory_size, dim)
    oracle = pml_oracle(memory_size, dim)
    for embeddings, labels in batches:
        mine = embeddings.clone().requires_grad_()
        theirs = embeddings.clone().requires_grad_()
        loss_ours, loss_pml = ours(mine, labels), oracle(theirs, labels)
        loss_ours.backward()
        loss_pml.backward()
        yield loss_ours.detach(), loss_pml.detach(), mine.grad, theirs.grad, ours.last_stats


@pytest.mark.parametrize(
    ("dim", "memory_size", "batch", "num_labels"),
    [
        (3, 20, 8, 6),     # 3-d: many negatives inside the margin; memory wraps every 2.5 batches
        (320, 64, 16, 10), # the model's width; labels come back from earlier batches
        (8, 24, 8, 40),    # memory exactly 3 batches: wrap-around lands on slot 0
        (3, 0, 12, 4),     # no memory: the within-batch loss of Fig. 2 (top)
        (320, 0, 16, 8),
    ],
)
@pytest.mark.parametrize("dense_share", [-1.0, math.inf], ids=["dense", "sparse"])
def test_equals_pml_cross_batch_memory_over_a_sequence(monkeypatch, dense_share, dim, memory_size, batch, num_labels):
    monkeypatch.setattr("mtl.loss._DENSE_COLUMN_SHARE", dense_share)
    generator = torch.Generator().manual_seed(dim * 1000 + memory_size)
    batches = [(unit_batch(generator, batch, dim), torch.randint(0, num_labels, (batch,), generator=generator))
               for _ in range(9)]
    saw_active_negatives = saw_memory_positives = False
    for loss_ours, loss_pml, grad_ours, grad_pml, stats in run_both(batches, memory_size, dim):
        assert loss_ours.item() == pytest.approx(loss_pml.item(), abs=1e-5)
        torch.testing.assert_close(grad_ours, grad_pml, atol=1e-5, rtol=1e-4)
        saw_active_negatives |= stats["active_negatives"] > 0
        saw_memory_positives |= memory_size > 0 and stats["positive_pairs"] > 0
    if dim == 3:
        assert saw_active_negatives, "3-d vectors should put negatives inside the margin"
    if memory_size:
        assert saw_memory_positives


@pytest.mark.parametrize("selection_dtype", [torch.float32, torch.bfloat16])
def test_pair_preselection_precision_does_not_change_the_loss(monkeypatch, selection_dtype):
    """The bfloat16 pre-selection (fast CPUs, GPUs) and the fp32 one both equal the oracle."""
    monkeypatch.setattr("mtl.loss.fast_selection_dtype", lambda device: selection_dtype)
    generator = torch.Generator().manual_seed(5)
    batches = [(unit_batch(generator, 16, 4), torch.randint(0, 8, (16,), generator=generator)) for _ in range(6)]
    for loss_ours, loss_pml, grad_ours, grad_pml, stats in run_both(batches, 40, 4):
        assert loss_ours.item() == pytest.approx(loss_pml.item(), abs=1e-5)
        torch.testing.assert_close(grad_ours, grad_pml, atol=1e-5, rtol=1e-4)
    assert stats["active_negatives"] > 0


@pytest.mark.parametrize("dense_share", [-1.0, math.inf])  # always the dense path / always the sparse one
def test_both_pair_paths_equal_the_oracle_when_most_negatives_are_active(monkeypatch, dense_share):
    monkeypatch.setattr("mtl.loss._DENSE_COLUMN_SHARE", dense_share)
    generator = torch.Generator().manual_seed(6)
    # Vectors bunched around one direction: nearly every negative is inside the margin.
    direction = F.normalize(torch.ones(1, 8), dim=1)
    batches = [(F.normalize(direction + 0.08 * torch.randn(12, 8, generator=generator), dim=1),
                torch.randint(0, 6, (12,), generator=generator)) for _ in range(5)]
    for loss_ours, loss_pml, grad_ours, grad_pml, stats in run_both(batches, 36, 8):
        assert loss_ours.item() == pytest.approx(loss_pml.item(), abs=1e-5)
        torch.testing.assert_close(grad_ours, grad_pml, atol=1e-5, rtol=1e-4)
    assert stats["active_negatives"] > 0.9 * stats["negatives_compared"]


def test_positives_are_found_in_memory():
    """A label seen only in an earlier batch makes positive pairs with the stored entries."""
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=16, embed_dim=4)
    generator = torch.Generator().manual_seed(0)
    loss_fn(unit_batch(generator, 4, 4), torch.tensor([7, 8, 9, 10]))
    loss_fn(unit_batch(generator, 4, 4), torch.tensor([1, 2, 3, 7]))
    # Only the pair (new 7 -> stored 7) is positive; within the new batch labels differ.
    assert loss_fn.last_stats["positive_pairs"] == 1


def test_counts_and_value_on_a_hand_built_batch():
    # Two views of instance 0 at right angles; instance 1 sits 0.2 rad from the first view,
    # inside the margin of it and far outside the margin of the second view.
    angle = 0.2
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.cos(angle), math.sin(angle)]])
    labels = torch.tensor([0, 0, 1])
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=0, embed_dim=2)
    loss = loss_fn(embeddings, labels)
    assert loss_fn.last_stats == {"positive_pairs": 2, "negatives_compared": 4, "active_negatives": 2}
    positive_distance = math.sqrt(2.0)
    close_negative_distance = 2 * math.sin(angle / 2)
    assert loss.item() == pytest.approx(positive_distance + (MARGIN - close_negative_distance), abs=1e-6)


def test_memory_is_fifo_with_a_cap_and_wraps_in_order():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=5, embed_dim=2)
    generator = torch.Generator().manual_seed(1)
    for step, labels in enumerate([[0, 1], [2, 3], [4, 5]]):
        loss_fn(unit_batch(generator, 2, 2), torch.tensor(labels))
        assert loss_fn.stored == min(2 * (step + 1), 5)
    # 6 entries into 5 slots: label 5 overwrote the oldest (label 0) in slot 0.
    assert loss_fn.memory_labels.tolist() == [5, 1, 2, 3, 4]
    assert int(loss_fn.write_pointer) == 1
    loss_fn(unit_batch(generator, 2, 2), torch.tensor([6, 7]))
    assert loss_fn.memory_labels.tolist() == [5, 6, 7, 3, 4]
    # The current batch scores against everything stored except its own copies.
    assert loss_fn.last_stats["negatives_compared"] == 2 * (5 - 1)


def test_memory_stores_detached_unit_embeddings():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=8, embed_dim=3)
    raw = torch.randn(4, 3, requires_grad=True)
    loss_fn(raw, torch.arange(4))
    assert not loss_fn.memory_embeddings.requires_grad
    torch.testing.assert_close(loss_fn.memory_embeddings[:4], F.normalize(raw.detach(), dim=1))


def test_size_zero_keeps_no_memory():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=0, embed_dim=4)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        loss_fn(unit_batch(generator, 6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        assert loss_fn.stored == 0
        # 6 items: 3 labels x 2 views -> 6 ordered positives, 36 - 6 - 6 negatives.
        assert loss_fn.last_stats == {**loss_fn.last_stats, "positive_pairs": 6, "negatives_compared": 24}


def test_validation_scores_against_memory_without_changing_it():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=6, embed_dim=3)
    generator = torch.Generator().manual_seed(3)
    loss_fn(unit_batch(generator, 4, 3), torch.tensor([0, 1, 2, 3]))
    before = {name: buffer.clone() for name, buffer in loss_fn.named_buffers()}
    loss_fn(unit_batch(generator, 4, 3), torch.tensor([3, 4, 5, 6]), update_memory=False)
    for name, buffer in loss_fn.named_buffers():
        assert torch.equal(buffer, before[name]), name
    # Scored against 4 stored + 3 other batch items; label 3 is found in the memory.
    assert loss_fn.last_stats["positive_pairs"] == 1
    assert loss_fn.last_stats["positive_pairs"] + loss_fn.last_stats["negatives_compared"] == 4 * (4 + 3)


def test_gradients_reach_only_the_current_batch():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=32, embed_dim=3)
    earlier = torch.randn(8, 3, requires_grad=True)
    loss_fn(earlier, torch.arange(8)).backward()
    earlier.grad = None
    current = torch.randn(8, 3, requires_grad=True)
    loss_fn(current, torch.arange(8)).backward()  # same labels: positives come from memory
    assert earlier.grad is None
    assert current.grad is not None and current.grad.abs().sum() > 0


def test_memory_travels_in_state_dict():
    source = CrossBatchContrastiveLoss(MARGIN, memory_size=10, embed_dim=3)
    source(torch.randn(7, 3), torch.arange(7))
    target = CrossBatchContrastiveLoss(MARGIN, memory_size=10, embed_dim=3)
    target.load_state_dict(source.state_dict())
    assert target.stored == 7 and int(target.write_pointer) == 7
    torch.testing.assert_close(target.memory_embeddings, source.memory_embeddings)
    target.reset_memory()
    assert target.stored == 0 and int(target.write_pointer) == 0


def test_the_low_precision_copy_follows_the_memory(monkeypatch):
    """The optimization's bfloat16 copy of the memory is written on every enqueue and
    rebuilt after a state dict is loaded: the pre-selection never sees stale entries."""
    monkeypatch.setattr("mtl.loss.fast_selection_dtype", lambda device: torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=12, embed_dim=4)
    for _ in range(4):  # the memory wraps round
        loss_fn(unit_batch(generator, 4, 4), torch.randint(0, 6, (4,), generator=generator))
        assert torch.equal(loss_fn.selection_memory, loss_fn.memory_embeddings.to(torch.bfloat16))
    other = CrossBatchContrastiveLoss(MARGIN, memory_size=12, embed_dim=4)
    other(unit_batch(generator, 4, 4), torch.arange(4))  # a copy of other entries
    other.load_state_dict(loss_fn.state_dict())
    assert "selection_memory" not in loss_fn.state_dict()
    batch, labels = unit_batch(generator, 4, 4), torch.randint(0, 6, (4,), generator=generator)
    assert other(batch, labels, update_memory=False) == loss_fn(batch, labels, update_memory=False)
    assert torch.equal(other.selection_memory, loss_fn.selection_memory)
    other.reset_memory()
    assert other.selection_memory is None


def test_bad_inputs_are_rejected_with_a_reason():
    loss_fn = CrossBatchContrastiveLoss(MARGIN, memory_size=4, embed_dim=3)
    with pytest.raises(ValueError, match="does not fit"):
        loss_fn(torch.randn(5, 3), torch.arange(5))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        loss_fn(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchContrastiveLoss(MARGIN, memory_size=-1, embed_dim=3)


def test_multitask_loss_is_contrastive_plus_weighted_cross_entropy():
    generator = torch.Generator().manual_seed(4)
    embeddings = unit_batch(generator, 6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.randn(6, 2, generator=generator)
    class_ids = torch.tensor([0, 1, 0, 1, 0, 1])
    parts = MultiTaskLoss(CrossBatchContrastiveLoss(MARGIN, 0, 3), lambda_cls=0.5, lambda_koleo=0.0)(
        embeddings, logits, labels, class_ids)
    expected_contrastive = CrossBatchContrastiveLoss(MARGIN, 0, 3)(embeddings, labels)
    torch.testing.assert_close(parts.contrastive, expected_contrastive)
    torch.testing.assert_close(parts.cross_entropy, F.cross_entropy(logits, class_ids))
    torch.testing.assert_close(parts.total, parts.contrastive + 0.5 * parts.cross_entropy)


# ---------------------------------------------------------------------------- the entropy regularizer (beyond the paper)

def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_other_instance():
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(12, 8, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    expected = []
    for i in range(12):
        others = [torch.dist(x[i], x[j]) for j in range(12) if labels[j] != labels[i]]
        expected.append(-torch.log(torch.stack(others).min()))
    torch.testing.assert_close(koleo_loss(x, labels), torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)


def test_koleo_pushes_bunched_embeddings_apart():
    generator = torch.Generator().manual_seed(1)
    bunched = F.normalize(torch.ones(16, 8) + 0.05 * torch.randn(16, 8, generator=generator), dim=1)
    bunched.requires_grad_(True)
    labels = torch.arange(16)
    koleo_loss(bunched, labels).backward()
    stepped = F.normalize(bunched.detach() - 0.1 * bunched.grad, dim=1)
    spread = lambda v: torch.pdist(v).min()  # noqa: E731
    assert spread(stepped) > spread(bunched.detach())


def test_multitask_loss_adds_the_weighted_regularizer():
    generator = torch.Generator().manual_seed(2)
    embeddings = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    labels, logits, classes = torch.arange(8) // 2, torch.randn(8, 2, generator=generator), torch.arange(8) % 2
    plain = MultiTaskLoss(CrossBatchContrastiveLoss(MARGIN, 0, 16), 1.0, 0.0)(embeddings, logits, labels, classes)
    regular = MultiTaskLoss(CrossBatchContrastiveLoss(MARGIN, 0, 16), 1.0, 3.0)(embeddings, logits, labels, classes)
    torch.testing.assert_close(regular.koleo, koleo_loss(embeddings, labels))
    torch.testing.assert_close(regular.total, plain.total + 3.0 * regular.koleo)
    assert float(plain.koleo) == 0.0
