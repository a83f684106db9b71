"""The contrastive loss of §II-C and Fig. 2, whose negatives come from the current batch
*and* a FIFO memory of earlier batches (the multi-task objective that adds the content
type's cross-entropy is mtl.objective).

The definition follows pytorch-metric-learning 2.x
``CrossBatchMemory(ContrastiveLoss(pos_margin=0, neg_margin=margin), D, memory_size)``
exactly (the test suite checks this against PML as an oracle):

1. the batch is first *enqueued* (detached) into the memory, overwriting the
   oldest entries;
2. every batch embedding (the anchors, with gradient) is compared with every
   stored entry, its own freshly stored copy excepted;
3. same label -> positive pair, term ``d``; different label -> negative pair,
   term ``relu(margin - d)``, with ``d`` the Euclidean distance of unit vectors;
4. each kind is averaged over its non-zero terms only (PML's AvgNonZeroReducer),
   and the two averages are summed.

``memory_size=0`` is the conventional within-batch loss of Fig. 2 (top):
PML's plain ``ContrastiveLoss``, where both sides of a pair carry gradient.

Variants for a memory that holds less than an epoch (beyond the paper; README "The
cross-batch memory at scale"; all off by default, each a ``loss`` setting):

* ``keys``: what is enqueued may be another encoder's output for the same inputs (a
  momentum encoder, MoCo), so that the memory moves slowly even when the model does not;
* ``negative_reduction="all"``: the negative term is the mean over *every* compared
  negative instead of over the active ones, so that a handful of active negatives is
  not the whole gradient;
* ``memory_positives``: a bank of each picture's last stored view, compared with the
  batch as well, so that every anchor also meets an earlier view of its own picture
  (a positive) -- what a memory longer than an epoch provides by itself.

Across processes (``across_ranks=True`` under torchrun, :mod:`mtl.distributed`) each
rank's anchors are its own rows of the global batch; the references are the global
batch (gathered in rank order, so the memory is the same on every rank and equals the
single-process memory), detached as in one process, or with gradient for the
within-batch loss.  The non-zero means are global: the sums of terms and their counts
are summed over ranks, so the loss value is the single-process value on every rank, and
the ranks' gradients add up to the single-process gradient.

Reading order: the definition (:func:`dense_pair_terms`, :func:`mean_of_nonzero`), the
loss with its memory (:class:`CrossBatchContrastiveLoss`), then the optimization that
makes 64 x 10,240 pairs cheap (the last section): the same terms from the few pairs that
can contribute, about 4x faster than the dense definition at 10,240 negatives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtl import distributed

NEGATIVE_REDUCTIONS = ("nonzero", "all")
# Squared distances at or below this are treated as exactly zero: sqrt has an
# infinite slope at 0 (NaN gradients for identical views).
_SQ_DIST_EPS = 1e-12


class PairTerms(NamedTuple):
    """Loss terms of the pairs that can contribute (zeros elsewhere are ignored by the
    non-zero mean), and the step's pair counts."""

    positive: torch.Tensor            # d of positive pairs
    negative: torch.Tensor            # relu(margin - d) of negative pairs
    positive_pairs: torch.Tensor      # 0-d counts
    negatives_compared: torch.Tensor


# --------------------------------------------------------------------------- the definition

def dense_pair_terms(anchors: torch.Tensor, labels: torch.Tensor, references: torch.Tensor,
                     ref_labels: torch.Tensor, self_columns: torch.Tensor, margin: float) -> PairTerms:
    """The terms of all B x R pairs (steps 2 and 3 above).  ``self_columns[i]`` is anchor
    i's own copy among the references, never its positive.  |a - r|^2 = 2 - 2 a.r for
    unit vectors, from one fp32 matmul, as PML's cdist computes it too."""
    two = torch.full((1, 1), 2.0, device=anchors.device)
    distance = _root(torch.addmm(two, anchors, references.T, alpha=-2.0).clamp_min(0.0))
    same = labels[:, None] == ref_labels[None, :]
    positive = same.clone()
    positive[torch.arange(len(labels), device=labels.device), self_columns] = False
    return PairTerms(distance.masked_fill(~positive, 0.0), F.relu(margin - distance).masked_fill(same, 0.0),
                     torch.count_nonzero(positive), same.numel() - torch.count_nonzero(same))


def mean_of_nonzero(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the strictly positive terms (0 when there are none) and their count (step 4):
    PML's AvgNonZeroReducer, which lets the few hard pairs speak instead of being
    drowned by thousands of satisfied ones.  Terms are >= 0 (distances, hinges), so
    the plain sum already is the sum of the non-zero ones."""
    count = torch.count_nonzero(terms > 0)  # no int64 copy of a bool matrix
    return terms.sum() / count.clamp_min(1), count


def _root(squared: torch.Tensor) -> torch.Tensor:
    """sqrt that is exactly 0, with zero gradient, for (near-)coincident vectors."""
    distance = squared.clamp_min(_SQ_DIST_EPS).sqrt()
    return torch.where(squared > _SQ_DIST_EPS, distance, torch.zeros_like(distance))


# --------------------------------------------------------------------------- the loss and its memory

class CrossBatchContrastiveLoss(nn.Module):
    """Contrastive loss with cross-batch negatives from a FIFO memory (§II-C).

    Args:
        margin: negatives closer than this (Euclidean, unit vectors) are penalized.
        memory_size: number of stored entries, the current batch included (the
            paper's "max number of negatives", 10,240).  0 = within-batch only.
        embed_dim: width of the embeddings the memory stores.

    Call as ``loss_fn(embeddings [B, D], labels [B]) -> scalar``; labels are
    instance ids (all views of one original share one).  ``update_memory=False``
    (validation) scores against the batch plus the stored entries and stores
    nothing.  After each call ``last_stats`` holds the step's pair counts.

    The memory is a set of registered buffers, so it travels with
    ``state_dict()`` into checkpoints and with ``.to(device)``.
    """

    def __init__(self, margin: float, memory_size: int, embed_dim: int, negative_reduction: str = "nonzero",
                 memory_positives: bool = False):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if negative_reduction not in NEGATIVE_REDUCTIONS:
            raise ValueError(f"negative_reduction must be one of {NEGATIVE_REDUCTIONS}, got {negative_reduction!r}")
        if memory_positives and memory_size == 0:
            raise ValueError("memory_positives needs a memory (memory_size > 0)")
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be > 0, got {embed_dim}")
        self.margin = float(margin)
        self.memory_size = int(memory_size)
        self.embed_dim = int(embed_dim)
        self.negative_reduction = negative_reduction
        self.memory_positives = bool(memory_positives)
        # The positive bank: row = label, each picture's last stored view (grown on demand).
        self.register_buffer("bank_embeddings", torch.zeros(0, self.embed_dim))
        self.register_buffer("bank_filled", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("memory_embeddings", torch.zeros(self.memory_size, self.embed_dim))
        self.register_buffer("memory_labels", torch.zeros(self.memory_size, dtype=torch.long))
        # Next slot to write, and how many slots hold real entries.  Slots fill
        # from 0 upwards, so the valid entries are always memory[:filled].
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # The optimization's low-precision copy of memory_embeddings (see the last section):
        # never saved, moved by .to(device) with the memory, written with it on every enqueue,
        # and dropped (rebuilt on first use) when a state dict is loaded or the memory reset.
        self.register_buffer("selection_memory", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._drop_selection_memory())
        self._last_counts: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, memory_size={self.memory_size}, embed_dim={self.embed_dim}, "
                f"negative_reduction={self.negative_reduction}, memory_positives={self.memory_positives}")

    # -- memory -----------------------------------------------------------------

    def reset_memory(self) -> None:
        """Forget every stored entry (e.g. between independent runs)."""
        self.memory_embeddings.zero_()
        self.memory_labels.zero_()
        self.write_pointer.zero_()
        self.filled.zero_()
        self.bank_embeddings = self.bank_embeddings[:0]
        self.bank_filled = self.bank_filled[:0]
        self._drop_selection_memory()

    @property
    def stored(self) -> int:
        """How many entries the memory holds now."""
        return int(self.filled)

    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write the batch over the oldest entries; returns the slots it took."""
        batch = embeddings.shape[0]
        slots = (int(self.write_pointer) + torch.arange(batch, device=labels.device)) % self.memory_size
        self.memory_embeddings[slots] = embeddings.detach().to(self.memory_embeddings.dtype)
        if self.selection_memory is not None:  # the copy stays in step with the memory
            self.selection_memory[slots] = embeddings.detach().to(self.selection_memory.dtype)
        self.memory_labels[slots] = labels.detach()
        self.write_pointer.fill_((int(self.write_pointer) + batch) % self.memory_size)
        self.filled.fill_(min(int(self.filled) + batch, self.memory_size))
        return slots

    def _references(self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool,
                    selection_dtype: torch.dtype, keys: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the batch is compared with: (reference embeddings, the same in the
        pre-selection dtype, their labels, each batch row's own column).  Only the
        within-batch case (memory_size=0, Fig. 2 top) has references that carry
        gradient, as in PML's plain ContrastiveLoss.  `keys` (the momentum encoder's
        output for the batch) are stored instead of the batch itself."""
        batch_columns = torch.arange(len(labels), device=labels.device)
        if self.memory_size == 0:
            return embeddings, embeddings.detach().to(selection_dtype), labels, batch_columns
        if update_memory:
            banked = self._bank_lookup(labels) if self.memory_positives else None
            slots = self._enqueue(embeddings if keys is None else keys, labels)
            n = self.stored
            references = (self.memory_embeddings[:n], self._selection_references(n, selection_dtype),
                          self.memory_labels[:n], slots)
            if self.memory_positives:
                self._bank_store(embeddings if keys is None else keys, labels)
                if banked is not None:
                    vectors, bank_labels = banked
                    references = (torch.cat([references[0], vectors]),
                                  torch.cat([references[1], vectors.to(selection_dtype)]),
                                  torch.cat([references[2], bank_labels]), slots)
            return references
        # Validation: the stored entries plus a detached copy of the batch, as training
        # would see them, but nothing is written.
        n = self.stored
        references = torch.cat([self.memory_embeddings[:n], embeddings.detach()])
        selection = torch.cat([self._selection_references(n, selection_dtype), embeddings.detach().to(selection_dtype)])
        return references, selection, torch.cat([self.memory_labels[:n], labels]), n + batch_columns

    # -- forward ----------------------------------------------------------------

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor, ranks: int = 1) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [B, {self.embed_dim}], got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be [B]={embeddings.shape[0]}, got {tuple(labels.shape)}")
        batch = embeddings.shape[0] * ranks  # the global batch is what the memory stores
        if self.memory_size and batch > self.memory_size:
            raise ValueError(f"batch of {batch} does not fit a memory of {self.memory_size}; "
                             "use memory_size=0 (within-batch) or >= the batch size")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, update_memory: bool = True,
                across_ranks: bool = False, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``across_ranks``: `embeddings` are this rank's rows of a global batch (training
        under torchrun); see the module docstring.  Ignored in a single process.
        ``keys``: what to store instead of the batch (a momentum encoder's output)."""
        across_ranks = across_ranks and distributed.is_active()
        self._check_inputs(embeddings, labels, distributed.world_size() if across_ranks else 1)
        # Always in fp32 (autocast may hand us fp16); renormalizing is a no-op for
        # the model's unit outputs and matches PML's LpDistance(normalize_embeddings=True).
        embeddings = F.normalize(embeddings.float(), dim=1)
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        if keys is not None:
            keys = F.normalize(keys.detach().float(), dim=1)
        if across_ranks:
            batch, batch_labels = self._global_batch(embeddings, labels)
            keys = distributed.gather_rows(keys) if keys is not None else None
        else:
            batch, batch_labels = embeddings, labels
        if self.memory_embeddings.device != embeddings.device:
            raise ValueError(f"loss memory is on {self.memory_embeddings.device} but embeddings are on "
                             f"{embeddings.device}; move the loss with .to(device)")
        selection_dtype = fast_selection_dtype(embeddings.device)
        references, selection_references, ref_labels, self_columns = self._references(
            batch, batch_labels, update_memory, selection_dtype, keys)
        if across_ranks:  # this rank's anchors are its rows of the global batch
            first = distributed.rank() * len(labels)
            self_columns = self_columns[first:first + len(labels)]
        cosine, columns, threshold = near_columns(embeddings.detach().to(selection_dtype), selection_references,
                                                  self.margin)
        if len(columns) <= _DENSE_COLUMN_SHARE * len(ref_labels):
            terms = sparse_pair_terms(embeddings, labels, references, ref_labels, self_columns, self.margin,
                                      cosine, columns, threshold)
        else:
            terms = dense_pair_terms(embeddings, labels, references, ref_labels, self_columns, self.margin)
        if across_ranks:
            return self._global_means(terms)
        positive_loss, _ = mean_of_nonzero(terms.positive)
        negative_loss, active_negatives = mean_of_nonzero(terms.negative)
        if self.negative_reduction == "all":  # the mean over every compared negative
            negative_loss = terms.negative.sum() / terms.negatives_compared.clamp_min(1)
        self._last_counts = {
            "positive_pairs": terms.positive_pairs,
            "negatives_compared": terms.negatives_compared,
            "active_negatives": active_negatives,
        }
        return positive_loss + negative_loss

    def _global_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows in rank order: with gradient where the single-process loss
        has references with gradient (within-batch), detached otherwise."""
        gather = distributed.gather_rows_with_grad if self.memory_size == 0 else distributed.gather_rows
        return gather(embeddings), distributed.gather_rows(labels)

    def _global_means(self, terms: PairTerms) -> torch.Tensor:
        """AvgNonZeroReducer over the global batch: sums and counts of the non-zero terms
        are summed over ranks (one all-reduce); each rank's gradient is its share."""
        positive_sum, negative_sum = terms.positive.sum(), terms.negative.sum()
        local = torch.stack([value.detach().double() for value in (
            positive_sum, torch.count_nonzero(terms.positive > 0), negative_sum,
            torch.count_nonzero(terms.negative > 0), terms.positive_pairs, terms.negatives_compared)])
        totals = distributed.all_reduce_sum(local)
        positive_count, negative_count = totals[1].clamp_min(1).float(), totals[3].clamp_min(1).float()
        if self.negative_reduction == "all":
            negative_count = totals[5].clamp_min(1).float()
        positive = distributed.global_share(positive_sum, totals[0].float()) / positive_count
        negative = distributed.global_share(negative_sum, totals[2].float()) / negative_count
        self._last_counts = {"positive_pairs": totals[4].long(), "negatives_compared": totals[5].long(),
                             "active_negatives": totals[3].long()}
        return positive + negative

    @property
    def last_stats(self) -> dict[str, int]:
        """Counts of the last call: ordered positive pairs, negatives compared,
        active (inside the margin, i.e. non-zero) negatives.  Reading it syncs."""
        return {name: int(value) for name, value in self._last_counts.items()}

    @property
    def last_counts(self) -> dict[str, torch.Tensor]:
        """The same counts as device tensors (no host sync; sum them over steps)."""
        return dict(self._last_counts)

    # -- the optimization's copy of the memory --------------------------------------

    def _selection_references(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """memory[:n] in the pre-selection dtype: the memory itself in fp32, else the
        low-precision copy, built on first use and kept in step by `_enqueue`."""
        if dtype == self.memory_embeddings.dtype:
            return self.memory_embeddings[:n]
        if self.selection_memory is None or self.selection_memory.dtype != dtype:
            self.selection_memory = self.memory_embeddings.to(dtype)
        return self.selection_memory[:n]

    def _drop_selection_memory(self) -> None:
        self.selection_memory = None

    # -- the positive bank ------------------------------------------------------------

    def _bank_lookup(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored views of the batch's pictures (one each, those the bank holds)."""
        unique = torch.unique(labels)
        unique = unique[unique < len(self.bank_filled)]
        unique = unique[self.bank_filled[unique]] if len(unique) else unique
        if not len(unique):
            return None
        return self.bank_embeddings[unique], unique

    def _bank_store(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Each picture's last view in the batch becomes its bank entry."""
        needed = int(labels.max()) + 1
        if needed > len(self.bank_filled):
            grow = needed - len(self.bank_filled)
            more = self.bank_embeddings.new_zeros(grow, self.embed_dim)
            self.bank_embeddings = torch.cat([self.bank_embeddings, more])
            self.bank_filled = torch.cat([self.bank_filled, self.bank_filled.new_zeros(grow)])
        self.bank_embeddings[labels] = embeddings.detach().to(self.bank_embeddings.dtype)
        self.bank_filled[labels] = True


# --------------------------------------------------------------------------- optimization: only the pairs that matter
#
# A negative only counts inside the margin, so one low-precision matmul (no graph) finds
# the reference columns that can matter.  When they are few (the usual case once training
# is under way) the exact fp32 distances, and the gradients, are computed for the selected
# pairs only; when many negatives are inside the margin (a fresh embedding branch) the
# dense definition is used.  The result equals the definition's (the tests run both).

# Slack on the cosine pre-selection of negatives.  The pre-selection matmul may run in
# bfloat16 (or TF32 on GPUs).  bfloat16 keeps 8 significant bits, so rounding changes
# each factor by at most 2^-8 of itself and each product a_i r_i by < 2^-7 of itself;
# as sum |a_i r_i| <= |a| |r| = 1 for unit vectors, a cosine is off by < 2^-7 (plus a
# negligible fp32 accumulation error).  1/64 is twice that bound: no pair that the
# exact fp32 distance puts inside the margin is ever missed, at the price of a few
# extra candidates that the exact check then drops.
_COSINE_SLACK = 1.0 / 64
# Sparse or dense: when more than this share of the reference columns has a negative
# inside the margin (as early in training, when embeddings are still bunched), one
# dense pass over all B x R pairs is cheaper than gathering pairs of rows.
_DENSE_COLUMN_SHARE = 0.05


def fast_selection_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matmuls in it are native (CUDA, AVX512-BF16/AMX CPUs), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        cpu = torch.cpu
        native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


@torch.no_grad()
def near_columns(selection_anchors: torch.Tensor, selection_references: torch.Tensor, margin: float
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Cosines (low precision, no graph) and the reference columns with some anchor
    closer than the margin.  Unit vectors: d < margin  <=>  cos > 1 - margin^2 / 2."""
    threshold = 1.0 - margin * margin / 2.0 - _COSINE_SLACK
    cosine = selection_anchors @ selection_references.T
    return cosine, (cosine.amax(dim=0) > threshold).nonzero().squeeze(1), threshold


def sparse_pair_terms(anchors: torch.Tensor, labels: torch.Tensor, references: torch.Tensor,
                      ref_labels: torch.Tensor, self_columns: torch.Tensor, margin: float,
                      cosine: torch.Tensor, columns: torch.Tensor, threshold: float) -> PairTerms:
    """The terms of :func:`dense_pair_terms` for the few pairs that matter, computed
    exactly from gathered rows.

    Positives: only references whose label occurs in the batch (a handful of columns
    out of 10,240).  Negatives: only the pre-selected near ones.  The dense work is the
    low-precision matmul and a column-wise max, done by :func:`near_columns`.
    """
    with torch.no_grad():
        candidate_columns = torch.isin(ref_labels, labels).nonzero().squeeze(1)
        same = labels[:, None] == ref_labels[candidate_columns][None, :]
        positive_anchor, candidate = same.nonzero(as_tuple=True)
        positive_reference = candidate_columns[candidate]
        not_self = positive_reference != self_columns[positive_anchor]
        positive_anchor, positive_reference = positive_anchor[not_self], positive_reference[not_self]

        near_anchor, near = (cosine[:, columns] > threshold).nonzero(as_tuple=True)
        near_reference = columns[near]
        different = labels[near_anchor] != ref_labels[near_reference]
        near_anchor, near_reference = near_anchor[different], near_reference[different]

    anchor_index = torch.cat([positive_anchor, near_anchor])
    reference_index = torch.cat([positive_reference, near_reference])
    # Differences, not 2 - 2cos: exact also for the tiny distances of good positives.
    distance = _root((anchors[anchor_index] - references[reference_index]).pow(2).sum(dim=1))
    positive, negative = distance.split([len(positive_anchor), len(near_anchor)])
    return PairTerms(positive, F.relu(margin - negative),
                     torch.as_tensor(len(positive_anchor), device=anchors.device),
                     labels.numel() * ref_labels.numel() - torch.count_nonzero(same))
