"""The progress line's rollout summary (megatron_distill/metrics.py) for every mix of batch parts."""

from __future__ import annotations

from megatron_distill.metrics import _rollout_part

BASE = {"rollout_seconds": 1.5, "train_seconds": 0.5, "rollout_samples": 8, "rollout_tokens_per_sec": 1000.0,
        "rollout_mean_response_length": 12.0, "rollout_truncated_fraction": 0.25}


def test_both_parts():
    line = _rollout_part({**BASE, "kd_loss_on_policy": 0.5, "kd_loss_off_policy": 0.25})
    assert "kd on/off 0.5000/0.2500" in line and "len 12.0, trunc 0.25" in line


def test_all_on_policy_batch_has_no_off_policy_part():
    # --on-policy-fraction 1: every token is on-policy (a KeyError here once stopped such runs).
    assert "kd on/off 0.5000/-" in _rollout_part({**BASE, "kd_loss_on_policy": 0.5})
    assert "kd on/off -/0.2500" in _rollout_part({**BASE, "kd_loss_off_policy": 0.25})
    assert "kd on/off" not in _rollout_part(BASE)


def test_weight_sync_time_shows_only_when_the_sglang_backend_synced():
    assert "sync 2.50s" in _rollout_part({**BASE, "weight_sync_seconds": 2.5})
    assert "sync" not in _rollout_part({**BASE, "weight_sync_seconds": 0.0})  # no export this iteration
    assert "sync" not in _rollout_part(BASE)  # in-place backend
