"""Preemption handler and fault-injection parsing (single process, no Megatron)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from megatron_distill.resilience import FaultInjector, PreemptionHandler


def test_signals_only_set_a_flag_and_a_second_signal_is_ignored():
    messages = []
    handler = PreemptionHandler(log=messages.append).install()
    try:
        assert not handler.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. during the checkpoint save: must not interrupt it
        assert handler.received == signal.SIGUSR1
        assert handler.should_stop(torch.device("cpu"))
        assert "SIGUSR1" in messages[0] and "already stopping" in messages[1]
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not handler._handle


def test_fault_spec_parsing_and_nan_planting():
    faults = FaultInjector("nan:2:0:1, sigterm:5:1")
    assert [(f.kind, f.iteration, f.rank, f.micro_batch) for f in faults.faults] == [
        ("nan", 2, 0, 1), ("sigterm", 5, 1, 0)]
    batches = [{"loss_mask": torch.ones(2, 3)} for _ in range(2)]
    out = faults.corrupt_batches(2, batches)
    assert torch.isnan(out[1]["loss_mask"]).any() and not torch.isnan(out[0]["loss_mask"]).any()
    assert not torch.isnan(batches[1]["loss_mask"]).any(), "the caller's batch must not be modified"
    assert faults.corrupt_batches(3, batches) == batches
    with pytest.raises(ValueError, match="bad entry 'boom:1:0'"):
        FaultInjector("boom:1:0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_check_finds_one_bad_value_anywhere(monkeypatch, dtype):
    from types import SimpleNamespace

    from megatron_distill import resilience

    monkeypatch.setattr(resilience, "FINITE_CHECK_ELEMENTS", 8)  # slices of 8: 37 elements is 5 slices
    buffers = [SimpleNamespace(grad_data=torch.randn(37, dtype=dtype)) for _ in range(2)]
    model = SimpleNamespace(buffers=buffers, expert_parallel_buffers=[])
    assert resilience.local_grads_finite(model)
    for which in range(2):
        for index in (0, 7, 8, 36):  # first, slice ends and starts, the last (partial) slice
            for bad in (float("nan"), float("inf"), float("-inf")):
                original = buffers[which].grad_data[index].item()
                buffers[which].grad_data[index] = bad
                assert not resilience.local_grads_finite(model), (which, index, bad)
                buffers[which].grad_data[index] = original
    assert resilience.local_grads_finite(SimpleNamespace())
