"""fused_linear_distill_loss at TP=2 (2 processes, gloo) vs the single-process reference.

Each rank holds its own rows of the full output-layer weights (uneven shards: V = 301), the
hidden states replicated, or with ``sequence_parallel`` its contiguous block of the tokens. The
loss must equal the reference on the full weights; the hidden-state gradient must be the full
gradient (its local block with sequence parallel); the weight gradient the matching rows of
the full one. fp32 inputs, so the tolerances are the unit tests' fp32 ones.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_distill.losses import distill_loss, fused_linear_distill_loss

WORLD = 2
T, H_S, H_T, V = 24, 12, 20, 301
CASES = [  # kind, beta, temperature, masked, sequence_parallel, impl
    ("forward_kl", 0.5, 1.0, False, False, "torch"),
    ("reverse_kl", 0.5, 1.5, True, False, "torch"),
    ("jsd", 0.3, 0.8, True, True, "torch"),
    ("forward_kl", 0.5, 1.3, True, True, "triton"),
    ("reverse_kl", 0.5, 1.0, False, True, "triton"),
    ("jsd", 0.6, 1.7, True, False, "triton"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H_S, generator=g, dtype=torch.float64)
    w = torch.randn(V, H_S, generator=g, dtype=torch.float64) * (3.0 / H_S**0.5)
    ht = torch.randn(T, H_T, generator=g, dtype=torch.float64)
    wt = torch.randn(V, H_T, generator=g, dtype=torch.float64) * (3.0 / H_T**0.5)
    mask = (torch.rand(T, generator=g) > 0.3).float()
    return h, w, ht, wt, mask


def _reference(h, w, ht, wt, kind, beta, tau, mask):
    zs = (h @ w.T).requires_grad_()
    loss = distill_loss(zs, ht @ wt.T, kind, beta=beta, temperature=tau, loss_mask=mask)
    loss.backward()
    return loss.detach(), zs.grad @ w, zs.grad.T @ h


def _rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _worker(rank: int, port: int, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        group = dist.group.WORLD
        rows = [151, 150]  # uneven vocab shards
        r0 = sum(rows[:rank])
        for i, (kind, beta, tau, masked, sp, impl) in enumerate(CASES):
            h, w, ht, wt, mask = _full_inputs(seed=i)
            mask = mask if masked else None
            ref_loss, ref_gh, ref_gw = _reference(h, w, ht, wt, kind, beta, tau, mask)
            h32, ht32 = h.float(), ht.float()
            if sp:
                block = slice(rank * T // WORLD, (rank + 1) * T // WORLD)
                h32, ht32, ref_gh = h32[block], ht32[block], ref_gh[block]
            hs = h32.clone().requires_grad_()
            ws = w[r0 : r0 + rows[rank]].float().requires_grad_()
            loss = fused_linear_distill_loss(
                hs, ws, ht32, wt[r0 : r0 + rows[rank]].float(), kind, beta=beta, temperature=tau,
                loss_mask=mask, tp_group=group, sequence_parallel=sp, impl=impl, chunk_tokens=7,
            )
            loss.backward()
            tol = 5e-5 if kind == "jsd" else 1e-5  # see tests/unit/test_fused_loss.py
            case = f"rank {rank} case {CASES[i]}"
            assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item(), case
            assert hs.grad.shape == h32.shape, case
            assert _rel(hs.grad, ref_gh) <= tol, (case, _rel(hs.grad, ref_gh))
            assert _rel(ws.grad, ref_gw[r0 : r0 + rows[rank]]) <= tol, case
        dist.destroy_process_group()
    except Exception:
        errors.put(traceback.format_exc())
        raise


def test_tp2_matches_single_process_reference():
    if not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(_free_port(), errors), nprocs=WORLD, join=True)
    except Exception as exc:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or str(exc))
