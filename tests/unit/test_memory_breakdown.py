"""benchmarks/memory_breakdown.py: the peak of an allocator trace and what was live then.

The reference is a brute-force replay: the live set after every event, recomputed from scratch.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests._modules import load_file_module

mb = load_file_module("memory_breakdown", Path(__file__).resolve().parents[2] / "benchmarks" / "memory_breakdown.py")


def _frames(where: str) -> list[dict]:
    # innermost first, as torch records them: a torch frame, then the caller that asked
    return [{"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"/repo/megatron_distill/{where}.py", "line": 7, "name": "forward"}]


def _random_trace(seed: int) -> tuple[list[dict], int]:
    """Random allocs / frees, some frees of blocks allocated before recording; and those blocks' bytes."""
    rng = random.Random(seed)
    before = {10_000 + i: rng.randint(1, 50) for i in range(5)}  # addr -> size, allocated before recording
    before_total = sum(before.values())
    live, trace, next_addr = {}, [], 1
    for _ in range(300):
        if live and rng.random() < 0.45:
            addr = rng.choice(sorted(live))
            trace.append({"action": "free_requested", "addr": addr, "size": live[addr][0]})
            trace.append({"action": "free_completed", "addr": addr, "size": live.pop(addr)[0]})
        elif before and rng.random() < 0.03:
            addr = rng.choice(sorted(before))
            trace.append({"action": "free_completed", "addr": addr, "size": before.pop(addr)})
        else:
            where = rng.choice(["mlp", "attention", "loss"])
            size = rng.randint(1, 100)
            live[next_addr] = (size, where)
            trace.append({"action": "alloc", "addr": next_addr, "size": size, "frames": _frames(where)})
            next_addr += 1
        trace.append({"action": "segment_alloc", "addr": 0, "size": 10**6})  # not an allocation
    return trace, before_total


def _brute_force(trace: list[dict], before_total: int) -> tuple[int, dict[str, int]]:
    best, best_groups = before_total, {}
    for end in range(len(trace)):
        live, before = {}, before_total
        for event in trace[: end + 1]:
            if event["action"] == "alloc":
                live[event["addr"]] = event
            elif event["action"] == "free_completed":
                if live.pop(event["addr"], None) is None:
                    before -= event["size"]
        total = before + sum(e["size"] for e in live.values())
        if total > best:
            best = total
            best_groups = {}
            for e in live.values():
                where = mb._where(e["frames"])
                best_groups[where] = best_groups.get(where, 0) + e["size"]
    return best, best_groups


def test_peak_and_groups_match_a_brute_force_replay():
    for seed in range(3):
        trace, before_total = _random_trace(seed)
        result = mb.peak_breakdown(trace, before_total, top=10)
        want_peak, want_groups = _brute_force(trace, before_total)
        assert want_peak > before_total
        assert result["peak_bytes"] == want_peak
        assert {g["where"]: g["bytes"] for g in result["groups"]} == want_groups
        assert result["before_bytes"] + sum(want_groups.values()) == want_peak


def test_group_names_the_caller_not_torch():
    trace = [{"action": "alloc", "addr": 1, "size": 5, "frames": _frames("models/mlp")}]
    (group,) = mb.peak_breakdown(trace, 0)["groups"]
    assert group["where"] == "megatron_distill/models/mlp.py:7 forward"
    assert group["bytes"] == 5 and group["blocks"] == 1
