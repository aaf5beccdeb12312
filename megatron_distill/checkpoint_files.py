"""The on-disk layout of checkpoints: names, the ``COMPLETE`` marker, verification, atomic commit.

No process groups here: every function works on the filesystem alone, so a supervisor (or the
reliability logic that restarts crashed jobs) can call ``find_latest_complete`` without starting
Megatron. The layout of a save directory::

    SAVE_DIR/
      latest_checkpointed_iteration.txt     "20" (Megatron-LM's pointer file; a hint for tools)
      iter_0000010/                          a complete checkpoint
        COMPLETE                             JSON: kind, iteration, {relative path: size in bytes}
        metadata.json  common.pt  .metadata  __0_0.distcp ...   (megatron.core.dist_checkpointing)
        rng/pp00_tp00_dp000.pt ...           per-rank RNG states (tensors and ints only)
      iter_0000020/
      iter_0000030.tmp-3f9a1c2e/             a save in progress, or left by a crash: never loaded
      teacher_pretrained/                    the quickstart's pre-trained teacher (same format)

A checkpoint is written into ``<name>.tmp-<random>``; once every rank has written its files,
rank 0 checks that the expected files exist, writes ``COMPLETE`` (last) and renames the
directory to its final name. A crash at any point leaves either a ``.tmp-`` directory (ignored)
or a complete checkpoint. ``COMPLETE`` lists every file with its size, so a checkpoint that was
truncated or partly deleted afterwards is recognised (``verify_checkpoint``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
POINTER = "latest_checkpointed_iteration.txt"
TMP_TAG = ".tmp-"
TEACHER_DIR = "teacher_pretrained"
MARKER_FORMAT = "megatron_distill.checkpoint/1"

_ITER_RE = re.compile(r"^iter_(\d+)$")
_TMP_ITER_RE = re.compile(r"^iter_(\d+)\.tmp-.+$")


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """``root/iter_0000010`` for iteration 10 (Megatron-LM's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def temporary_name(final: Path) -> Path:
    """A fresh ``<final>.tmp-<random>`` path next to ``final``."""
    return final.with_name(f"{final.name}{TMP_TAG}{secrets.token_hex(4)}")


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_N`` directory, oldest first (``.tmp-`` ones excluded).

    Lists names only: a directory listed here may still be incomplete or damaged.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ITER_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems that make the checkpoint at ``path`` unusable; an empty list means it is intact.

    Checks that the ``COMPLETE`` marker exists and parses, and that every file it lists exists
    with the recorded size (a truncated or missing file is reported by name).
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    marker = path / COMPLETE
    if not marker.is_file():
        return [f"no {COMPLETE} marker in {path}: the save did not finish (or the marker was removed)"]
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("empty file list")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return [f"{marker} is unreadable ({exc})"]
    problems = []
    for rel, size in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"missing file {rel}")
        elif file.stat().st_size != size:
            problems.append(
                f"{rel} has {file.stat().st_size} bytes, {size} were written (truncated or overwritten)"
            )
    return problems


def read_marker(path: str | os.PathLike) -> dict:
    """The parsed ``COMPLETE`` marker of a checkpoint directory."""
    return json.loads((Path(path) / COMPLETE).read_text())


def find_latest_complete(root: str | os.PathLike) -> int | None:
    """The newest iteration under ``root`` whose checkpoint is complete and intact, or None.

    Skips ``.tmp-`` directories (saves in progress or interrupted), checkpoints without a
    ``COMPLETE`` marker and checkpoints whose files are missing or truncated
    (``verify_checkpoint``), so a caller can fall back to the previous good checkpoint when
    the newest one is damaged. Reads the filesystem only (no process group needed).
    """
    for iteration, path in reversed(list_checkpoints(root)):
        if not verify_checkpoint(path):
            return iteration
    return None


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable (best effort on odd filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f"{path.name}{TMP_TAG}{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_complete_marker(path: Path, info: dict) -> None:
    """Write ``COMPLETE`` into ``path``: ``info`` plus every file's relative path and size."""
    files = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != COMPLETE:
            files[file.relative_to(path).as_posix()] = file.stat().st_size
    _write_atomic(path / COMPLETE, json.dumps({"format": MARKER_FORMAT, **info, "files": files}, indent=1))


def commit(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory (marker already written) to ``final``.

    An existing ``final`` (the same iteration saved again) is first moved aside, so there is no
    moment where ``final`` holds a mix of old and new files.
    """
    aside = None
    if final.exists():
        aside = temporary_name(final)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_pointer(root: Path, iteration: int) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration`` (atomically)."""
    _write_atomic(root / POINTER, f"{iteration}\n")


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted copy keeps a checkpoint's name."""
    doomed = path.with_name(f"{path.name}{TMP_TAG}deleting-{secrets.token_hex(4)}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep_last: int, newest: int) -> list[Path]:
    """Keep the ``keep_last`` newest complete checkpoints up to ``newest``; delete older ones.

    Called only after checkpoint ``newest`` is complete. Also deletes ``.tmp-`` directories of
    iterations before ``newest`` (left by interrupted saves). Damaged checkpoints (no marker)
    are left alone for a human to look at. Returns the deleted paths.
    """
    complete = [(it, p) for it, p in list_checkpoints(root) if it <= newest and (p / COMPLETE).is_file()]
    doomed = [p for _, p in complete[:-keep_last]] if keep_last < len(complete) else []
    for entry in root.iterdir():
        match = _TMP_ITER_RE.match(entry.name)
        if match and int(match.group(1)) < newest and entry.is_dir():
            doomed.append(entry)
    for path in doomed:
        _remove(path)
    return doomed
