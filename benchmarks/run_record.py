"""The header every benchmark results file starts with, and writing it (benchmarks/results/README.md).

A results file names the device, the date, the versions and the exact command that produced it;
``run_header`` collects those, ``write_record`` writes the JSON (creating its directory).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

import torch


def run_header(benchmark: str, world_size: int, **extra_versions: str | None) -> dict[str, Any]:
    """``benchmark``, ``date`` (UTC), ``device`` (the CUDA device's name, or "cpu"), ``world_size``,
    ``versions`` (torch, CUDA, megatron-core, Python, plus ``extra_versions``) and ``command``."""
    try:
        import megatron.core

        megatron_version = megatron.core.__version__
    except ImportError:
        megatron_version = None
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world_size,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron_version,
                     "python": sys.version.split()[0], **extra_versions},
        "command": " ".join(sys.argv),
    }


def write_record(path: str | None, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def write_device_record(record: dict[str, Any], name: str, outdir: str | None = None, tag: str = "") -> str:
    """Write a probe's ``record`` (with ``device`` and ISO ``date`` keys) to
    ``OUTDIR/<name>_<device>_<YYYY-MM-DD>[_<tag>].json`` (OUTDIR: benchmarks/results by default)
    and return the path; the device's name without "NVIDIA " and with dashes for spaces."""
    slug = record["device"].replace("NVIDIA ", "").replace(" ", "-")
    outdir = outdir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(outdir, f"{name}_{slug}_{record['date'][:10]}{'_' + tag if tag else ''}.json")
    write_record(path, record)
    print(f"wrote {path}")
    return path
