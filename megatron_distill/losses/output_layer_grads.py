"""What the chunked output-layer losses (fused.py, fused_topk.py) share around their element-wise step.

Both losses walk the counted tokens in chunks: logits ``z = h W^T`` for a chunk, an element-wise
step that overwrites ``z`` with ``dL/dz`` in place, then ``dL/dh = dz W`` and ``dL/dW += dz^T h``.
This module holds the token compaction (masked tokens cost nothing), the gradient buffers and
their accumulation, the closing TP reduction, and the backward that only scales what the
forward stored.
"""

from __future__ import annotations

import math

import torch

from megatron_distill.losses.kernels.scale_unless_one import scale_unless_one_
from megatron_distill.losses.tp_collectives import ProcessGroup, all_reduce_sum_, reduce_scatter_dim0


def counted_tokens(loss_mask: torch.Tensor | None, n_tokens: int) -> tuple[torch.Tensor | None, int]:
    """The indices ``[n]`` of the tokens with a nonzero ``loss_mask`` (None when all ``n_tokens``
    count), and ``n``. ``loss_mask`` has ``n_tokens`` elements in any shape."""
    if loss_mask is None:
        return None, n_tokens
    keep = loss_mask.reshape(-1) != 0
    if keep.shape[0] != n_tokens:
        raise ValueError(f"loss_mask has {keep.shape[0]} tokens, the hidden states {n_tokens}")
    idx = keep.nonzero().squeeze(1)
    n = idx.numel()
    return (None, n) if n == n_tokens else (idx, n)


def rows(t: torch.Tensor, idx: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the counted tokens of ``t`` ``[T, ...]`` (``idx`` from ``counted_tokens``)."""
    return t[r0:r1] if idx is None else t.index_select(0, idx[r0:r1])


def _accumulate_weight_grad(grad_w: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool,
                            alpha: float = 1.0) -> None:
    """``grad_w = dz^T h`` (``first``) or ``grad_w += alpha dz^T h``; ``grad_w`` ``[V_local, h]`` in
    ``dz``'s dtype or fp32. Only additions are scaled: a buffer of the caller's own (``alpha`` != 1)
    is never overwritten."""
    if grad_w.dtype == dz.dtype:
        # cuBLAS accumulates in fp32 within the call; one rounding per chunk
        if first:
            torch.mm(dz.t(), h, out=grad_w)
        else:
            grad_w.addmm_(dz.t(), h, alpha=alpha)
    elif grad_w.is_cuda:
        # bf16 operands, fp32 accumulator: no fp32 copy of dz needed (torch >= 2.8)
        torch.addmm(grad_w, dz.t(), h, beta=0.0 if first else 1.0, alpha=alpha, out_dtype=torch.float32, out=grad_w)
    else:
        part = torch.mm(dz.t(), h).float()
        grad_w.copy_(part) if first else grad_w.add_(part, alpha=alpha)


class OutputLayerGrads:
    """The gradients wrt the hidden states ``hs`` ``[T, h]`` and this rank's weight shard ``ws``
    ``[V_local, h]``, accumulated chunk by chunk over the ``n`` counted tokens (rows ``idx``).

    ``fp32_weight_grad`` keeps the weight gradient in fp32 until ``finish`` casts it back.
    ``weight_grad_into`` (a ``[V_local, h]`` tensor, fp32 or the weight's dtype: the parameter's
    ``main_grad``) receives ``weight_grad_scale`` times the weight gradient, added chunk by chunk,
    instead of a buffer of its own; ``finish`` then returns no weight gradient.
    """

    def __init__(self, hs: torch.Tensor, ws: torch.Tensor, idx: torch.Tensor | None, n: int, need_gh: bool,
                 need_gw: bool, fp32_weight_grad: bool = False, weight_grad_into: torch.Tensor | None = None,
                 weight_grad_scale: float = 1.0):
        self.ws, self.idx = ws, idx
        self.into = need_gw and weight_grad_into is not None
        self.alpha = weight_grad_scale if self.into else 1.0
        # uncounted rows get no gradient: zeros unless every row is written
        alloc_gh = torch.zeros if idx is not None or n == 0 else torch.empty
        self.grad_h = alloc_gh(hs.shape, dtype=hs.dtype, device=hs.device) if need_gh else None
        self.grad_w = None
        if self.into:
            if weight_grad_into.shape != ws.shape or weight_grad_into.dtype not in (ws.dtype, torch.float32):
                raise ValueError(f"weight_grad_into must be {tuple(ws.shape)} in {ws.dtype} or float32, got "
                                 f"{tuple(weight_grad_into.shape)} in {weight_grad_into.dtype}")
            self.grad_w = weight_grad_into
        elif need_gw:
            w_dtype = torch.float32 if fp32_weight_grad else ws.dtype
            # the first chunk overwrites it (beta = 0): no memset of a [V_local, h] tensor
            self.grad_w = (torch.empty if n > 0 else torch.zeros)(ws.shape, dtype=w_dtype, device=hs.device)

    def add(self, dz: torch.Tensor, hs_chunk: torch.Tensor, c0: int, c1: int) -> None:
        """Add counted rows ``c0:c1``'s share: ``dz`` ``[c1 - c0, V_local]`` = dL/dz, ``hs_chunk``
        ``[c1 - c0, h]`` their hidden states."""
        if self.grad_h is not None:
            if self.idx is None:
                torch.mm(dz, self.ws, out=self.grad_h[c0:c1])
            else:
                self.grad_h.index_copy_(0, self.idx[c0:c1], dz @ self.ws)
        if self.grad_w is not None:
            _accumulate_weight_grad(self.grad_w, dz, hs_chunk, first=c0 == 0 and not self.into, alpha=self.alpha)

    def finish(self, group: ProcessGroup, sequence_parallel: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(grad_h, grad_w)``: each rank holds dz for its vocab shard only, so the hidden states'
        gradient is summed over ``group`` (reduce-scattered back to this rank's block with
        ``sequence_parallel``); the weight gradient in the weight's dtype (None when it went into
        ``weight_grad_into``)."""
        grad_h, grad_w = self.grad_h, None if self.into else self.grad_w
        if grad_h is not None:
            grad_h = reduce_scatter_dim0(grad_h, group) if sequence_parallel else all_reduce_sum_(grad_h, group)
        if grad_w is not None and grad_w.dtype != self.ws.dtype:
            grad_w = grad_w.to(self.ws.dtype)
        return grad_h, grad_w


def scale_saved_grads(ctx, grad_output: torch.Tensor, promised_scale: float | None = None) -> tuple:
    """Backward of a loss whose forward stored ``(grad_hidden, grad_weight)``: scale them by ``grad_output``.

    ``promised_scale``: the gradient the forward already applied to a weight gradient it added
    into ``main_grad`` (``weight_grad_into``); raises unless ``grad_output`` is that value (a host
    read of ``grad_output``). Without a promise, on CUDA, the factor is never read on the host: the
    stored gradients are scaled in place by a kernel that skips the pass when it is 1
    (``loss.backward()``), so the host does not wait for the forward here. A second backward
    through the same graph (``retain_graph``) scales the first one's results by the ratio of the
    two factors, out of place.
    """
    grad_h, grad_w = ctx.saved_tensors
    if promised_scale is None and grad_output.is_cuda:
        first = getattr(ctx, "scaled_by", None)
        if first is None:
            ctx.scaled_by = grad_output.detach().clone()
            return tuple(None if g is None else scale_unless_one_(g, grad_output) for g in (grad_h, grad_w))
        # a second backward through a retained graph (rare: a host read is fine here)
        if float(first) == 0.0:
            raise RuntimeError(
                "the fused loss's first backward received the gradient 0 and scaled its stored gradients by it "
                "in place, so a second backward through the retained graph cannot recover them; run the "
                "forward again instead of retain_graph"
            )
        ratio = grad_output.float() / first.float()
        return tuple(None if g is None else (g.float() * ratio).to(g.dtype) for g in (grad_h, grad_w))
    got = float(grad_output)  # one host read serves the check and the scaling
    if promised_scale is not None and not math.isclose(got, promised_scale, rel_tol=1e-6):
        raise RuntimeError(
            f"the fused loss added its output-layer weight gradient into main_grad scaled by {promised_scale!r}, "
            f"but the loss received the gradient {got!r} in backward, so that weight's gradient is wrong; run "
            "with --no-output-layer-grad-accumulation-fusion, and report this (the loss weighting or the "
            "loss scale differs from the one the engine assumed)"
        )
    # the common case (loss.backward() on this loss alone) needs no pass over grad_W
    if got != 1.0:
        grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
    return grad_h, grad_w
