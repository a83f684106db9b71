"""Several processes, one training run: the plumbing behind ``torchrun ... -m mtl.train``.

torchrun starts N processes and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` joins them into one process group (NCCL on GPUs, gloo on CPUs).
Without those variables everything here is a no-op for one process, so the
single-process code path stays exactly what it was.

What the trainer needs, and nothing else:

- :func:`gather_rows` (detached) and :func:`gather_rows_with_grad` (autograd: the
  gradient of every rank's use of the gathered rows flows back to the rows' owner):
  the global batch, in rank order;
- :func:`global_share`: a loss value summed over ranks whose gradient is the local
  share only; summing the shares' gradients (:func:`sum_gradients`) gives exactly the
  gradient of the global loss;
- :func:`sync_batchnorm`: BatchNorm statistics over the global batch, on any device
  (``torch.nn.SyncBatchNorm`` runs on GPUs only);
- rank-0 guards: :func:`is_main`, :func:`main_first`, :func:`barrier`.

Why no DistributedDataParallel: the loss (mtl.loss) is already a mean over the global
batch on every rank, so each rank's backward gives its share of the global gradient and
one all-reduce SUM gives the single-process gradient.  DDP *averages* gradients (the loss
would have to be scaled by the world size to undo it), and its hooks expect ``forward()``
itself to be called, while stage 1 can train ``model.heads()`` from stored taps.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

BACKENDS = ("auto", "gloo", "nccl")


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the only process that writes checkpoints, logs and metrics."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; True when joined
    (or already joined), False for a plain single-process start.  ``auto``: NCCL when
    CUDA is present, else gloo.  On GPUs each process takes the device LOCAL_RANK."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {BACKENDS}, got {backend!r}")
    if not launched_by_torchrun():
        return False
    if dist.is_initialized():
        return True
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it is done
    (and then find the cache built)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard() -> tuple[int, int]:
    """(rank, world size): which slice of every global batch this process takes."""
    return rank(), world_size()


# --------------------------------------------------------------------------- collectives

def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (no gradient).  Every rank must pass
    the same shape: sharded training batches are all K/N x V."""
    if not is_active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


class _GatherRowsWithGrad(torch.autograd.Function):
    """all_gather forward; backward: each rank's gradient of the gathered rows summed over
    ranks (all-reduce), its own block returned.  Ours because torch's differentiable
    ``torch.distributed.nn.functional.all_gather`` is deprecated for a private module."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        return gather_rows(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_rows_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows`, differentiable: used where the single-process loss lets the
    gradient flow into both sides of a pair (within-batch negatives, KoLeo)."""
    return _GatherRowsWithGrad.apply(tensor) if is_active() else tensor


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """A detached copy of `values` summed over ranks (float64 while reduced: the sums of
    loss terms then differ from one process's sum by rounding only)."""
    total = values.detach().to(torch.float64).clone()
    if is_active():
        dist.all_reduce(total)
    return total.to(values.dtype)


def global_share(local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is `total` (the same on every rank) and whose gradient is that
    of `local`, this rank's share: summed over ranks the gradients are the gradient of
    the total.  ``local - local.detach()`` is exactly zero, so the value is exact."""
    return total.detach() + (local - local.detach())


def sum_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks, in one flat all-reduce.  Parameters
    without a gradient have none on every rank (the ranks run the same graph)."""
    if not is_active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (all ranks start identical)."""
    if not is_active():
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


# --------------------------------------------------------------------------- BatchNorm

class _GlobalBatchNorm:
    """BatchNorm whose training-mode statistics are those of the global batch.

    Each rank computes its rows' mean and sum of squared deviations exactly, the ranks
    exchange them (one differentiable all-gather) and combine them (Chan et al.'s
    parallel variance), so the normalization, the running statistics and the gradients
    are those of one process seeing the whole batch.  Every rank holds the same number of
    rows.  In eval mode, or alone, it is the original layer, untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active()):
            return super().forward(x)  # type: ignore[misc]
        y = _global_batch_norm(self, x)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: BatchNorm, then dropout and activation
            y = self.act(self.drop(y))
        return y


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    dims = [d for d in range(x.ndim) if d != 1]
    shape = [1, -1] + [1] * (x.ndim - 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 under autocast
    local_rows = x.numel() // x.shape[1]
    local_mean = xf.mean(dim=dims)
    local_m2 = (xf - local_mean.view(shape)).pow(2).sum(dim=dims)
    stats = gather_rows_with_grad(torch.stack([local_mean, local_m2])[None])  # [world, 2, C]
    means, m2s = stats[:, 0], stats[:, 1]
    rows = local_rows * world_size()
    mean = means.mean(dim=0)
    var = (m2s + local_rows * (means - mean).pow(2)).sum(dim=0) / rows
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var.detach() * rows / max(rows - 1, 1), alpha=momentum)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


_SYNCED_CLASSES: dict[type, type] = {}


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of `model` use global-batch statistics in training mode (see
    _GlobalBatchNorm).  The layers keep their parameters, buffers and state-dict keys
    (only their class changes), so checkpoints load into plain models."""
    for module in model.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlobalBatchNorm):
            if cls not in _SYNCED_CLASSES:
                _SYNCED_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
            module.__class__ = _SYNCED_CLASSES[cls]
    return model
