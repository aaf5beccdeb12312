"""What is allocated at an iteration's memory peak, grouped by the code that allocated it.

``record`` runs a function under PyTorch's CUDA allocator history (``torch.cuda.memory``'s
``_record_memory_history``, Python stacks only); ``peak_breakdown`` replays the snapshot's
allocation trace to find the moment the most bytes were allocated and groups what was live then
by the innermost stack frame outside torch's own files (the model or engine line that asked for
it). What was allocated before recording began (weights, gradient buffers, optimizer state)
has no stack: it is one group, "before the recording".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

BEFORE = "before the recording"
_TORCH_DIR = os.sep + os.path.join("torch", "")


def _where(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame not in torch itself (else the innermost)."""
    if not frames:
        return "(no stack)"
    chosen = next((f for f in frames if _TORCH_DIR not in f["filename"]), frames[0])
    parts = chosen["filename"].split(os.sep)
    short = os.sep.join(parts[-3:])
    return f"{short}:{chosen['line']} {chosen['name']}"


def peak_breakdown(trace: list[dict], allocated_before: int, top: int = 25) -> dict[str, Any]:
    """The largest allocated total over ``trace`` and what made it up.

    ``trace``: one device's allocator events in order (dicts with ``action``, ``addr``, ``size``
    and ``frames``, as in ``torch.cuda.memory._snapshot()["device_traces"][i]``);
    ``allocated_before``: bytes allocated when recording began. A block counts from its
    ``alloc`` to its ``free_completed`` (the caching allocator's ``memory_allocated`` drops
    then, not at ``free_requested``). Returns ``peak_bytes``, ``event_index`` (of the peak),
    ``groups``: the ``top`` largest ``{"where", "bytes", "blocks"}`` live at the peak, largest
    first (the rest summed as "(other)"), and ``before_bytes`` still live from before recording.
    """
    live: dict[int, tuple[int, str]] = {}
    before = allocated_before
    total = allocated_before
    peak, peak_index, peak_live, peak_before = total, -1, dict(live), before
    for index, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], _where(event.get("frames", [])))
            total += event["size"]
        elif action == "free_completed":
            if event["addr"] in live:
                total -= live.pop(event["addr"])[0]
            else:  # allocated before recording began
                before -= event["size"]
                total -= event["size"]
        else:
            continue
        if total > peak:
            peak, peak_index, peak_live, peak_before = total, index, dict(live), before
    groups: dict[str, list[int]] = {}
    for size, where in peak_live.values():
        entry = groups.setdefault(where, [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    rows = [{"where": where, "bytes": b, "blocks": n} for where, (b, n) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append({"where": "(other)", "bytes": sum(v[0] for _, v in rest), "blocks": sum(v[1] for _, v in rest)})
    return {"peak_bytes": peak, "event_index": peak_index, "before_bytes": peak_before, "groups": rows}


def record(fn: Callable[[], Any], device_index: int = 0, top: int = 25) -> dict[str, Any]:
    """Run ``fn`` with the CUDA allocator history on and return ``peak_breakdown`` of it."""
    import torch

    torch.cuda.synchronize(device_index)
    allocated_before = torch.cuda.memory_allocated(device_index)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize(device_index)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_breakdown(snapshot["device_traces"][device_index], allocated_before, top)


def format_breakdown(breakdown: dict[str, Any]) -> str:
    """A text table of ``peak_breakdown``'s result in GiB."""
    gib = 2**30
    lines = [f"peak {breakdown['peak_bytes'] / gib:.3f} GiB; {BEFORE}: {breakdown['before_bytes'] / gib:.3f} GiB"]
    for row in breakdown["groups"]:
        lines.append(f"  {row['bytes'] / gib:8.3f} GiB  {row['blocks']:5d} blocks  {row['where']}")
    return "\n".join(lines)
