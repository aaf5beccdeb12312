"""Autograd-aware all-reduces over the tensor-parallel group, for vocab-parallel losses.

Two gradient conventions are needed (see losses/reference.py for the derivation):

* a *statistic* (e.g. a partial sum-exp) whose all-reduced value is used differently on each
  rank needs the backward to all-reduce the gradients too (``all_reduce_sum_grad_sum``);
* a *result* that every rank then treats as the same replicated value (the per-token loss)
  needs the identity backward (``all_reduce_sum_grad_identity``), as in Megatron's
  ``reduce_from_tensor_model_parallel_region``.

``group=None`` means one rank holds the whole vocabulary: every function is then the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup | None


def group_size(group: ProcessGroup) -> int:
    """Number of ranks in ``group`` (1 when ``group`` is None or distributed is not started)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_max_(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """In-place max over the group (no gradient: used only for the softmax shift)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """In-place sum over the group, no autograd."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _AllReduceSumGradSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_reduce_sum_(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum_(grad.clone(), ctx.group), None


class _AllReduceSumGradIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return all_reduce_sum_(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum_grad_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum over the group; backward sums the incoming gradients over the group too."""
    if group_size(group) == 1:
        return tensor
    return _AllReduceSumGradSum.apply(tensor, group)


def all_reduce_sum_grad_identity(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum over the group; backward passes the gradient through unchanged."""
    if group_size(group) == 1:
        return tensor
    return _AllReduceSumGradIdentity.apply(tensor, group)


def all_gather_dim0(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order, no autograd.

    ``[n, ...]`` on each of the ``world`` ranks -> ``[world * n, ...]``, identical on every rank
    (Megatron's sequence-parallel gather of a ``[s / tp, ...]`` block).
    """
    world = group_size(group)
    if world == 1:
        return tensor
    out = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


def reduce_scatter_dim0(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``tensor`` over the group and keep this rank's block of dim 0, no autograd.

    ``[world * n, ...]`` on every rank -> ``[n, ...]``: rows ``[rank * n, (rank + 1) * n)`` of the
    sum (the transpose of ``all_gather_dim0``).
    """
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.shape[0] % world:
        raise ValueError(f"dim 0 ({tensor.shape[0]}) must divide by the group size ({world})")
    out = tensor.new_empty((tensor.shape[0] // world,) + tuple(tensor.shape[1:]))
    dist.reduce_scatter_tensor(out, tensor.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out
