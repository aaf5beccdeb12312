"""The overlapped chunk loop (losses/overlap.py) against the float64 reference, on the CPU.

On the CPU the two streams are one, so these tests check what the schedule computes: teacher
sub-chunks that alternate between two buffers, the hidden-state gradient written one sub-chunk
behind, the weight gradient once per chunk, and the loss partials, for chunkings that leave a
short last chunk and a short last sub-chunk. The stream and event ordering itself runs on a GPU
(tests/gpu/test_fused_gpu.py). Tolerances as in test_fused_loss.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.losses import fused as fused_module
from megatron_distill.losses import fused_linear_distill_loss, overlap
from megatron_distill.losses.kernels import distill_elementwise as ew
from tests.unit.test_fused_loss import _check, _inputs


@pytest.fixture
def overlapped(monkeypatch):
    def enable(splits: int) -> None:
        monkeypatch.setitem(ew.KERNEL_CONFIG, "overlap_sms", 0)
        monkeypatch.setitem(ew.KERNEL_CONFIG, "overlap_splits", splits)

    return enable


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("splits", [2, 3])
def test_overlapped_loop_matches_reference(kind, beta, splits, impl, overlapped, monkeypatch):
    monkeypatch.setattr(ew, "_INTERPRET_BLOCK_V", 128)
    overlapped(splits)
    h, w, ht, wt = _inputs(29, 16, 24, 301, torch.float32, seed=1, scale=4.0)
    mask = (torch.rand(29, generator=torch.Generator().manual_seed(2)) > 0.35).float()
    # 18 counted rows in chunks of 8: 8, 8, 2; sub-chunks of 4 (or 3, 3, 2), the last one short
    _check(h, w, ht, wt, kind, beta, 1.7, mask, "mean", impl, chunk_tokens=8)
    _check(h, w, ht, wt, kind, beta, 0.6, None, "sum", impl, chunk_tokens=29)


def test_overlapped_loop_is_the_one_that_runs(overlapped, monkeypatch):
    """The switch reaches the loop, and the single-pass kernel (whole grid resident) is not
    used beside the GEMMs even when it is switched on."""
    calls = []
    real = overlap.overlapped_chunks

    def spy(*args, **kwargs):
        calls.append(args[7])  # splits
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_module, "overlapped_chunks", spy)
    monkeypatch.setitem(ew.KERNEL_CONFIG, "single_pass", True)
    overlapped(2)
    h, w, ht, wt = _inputs(12, 8, 8, 40, torch.float32)
    w.requires_grad_()
    fused_linear_distill_loss(h, w, ht, wt, "forward_kl", impl="torch", chunk_tokens=5).backward()
    assert calls == [2]
    assert not fused_module._single_pass(fused_module._Config(
        kind="forward_kl", beta=0.5, temperature=1.0, tp_group=None, chunk_tokens=None, teacher_chunk_tokens=None,
        sequence_parallel=False, reduction="mean", impl="triton", fp32_weight_grad=False,
    ))
