"""Save, load and resume distillation runs through ``megatron.core.dist_checkpointing``.

What a checkpoint holds (``iter_NNNNNNN/``, layout in ``checkpoint_files.py``):

* ``model``: the student ``GPTModel``'s own ``sharded_state_dict()``: the keys of a plain
  GPTModel (``embedding.word_embeddings.weight``, ``decoder.layers.self_attention...``), global
  over TP/PP, so any TP/PP/DP layout (or a plain GPTModel) can load it. The teacher is never
  saved: it is an input of the run, not its result.
* ``optimizer``: ``engine.optimizer.sharded_state_dict(model)``: Adam moments (and the
  DistributedOptimizer's fp32 main params) as tensors of the parameters' shapes under
  ``optimizer.state.<moment>.<model key>``, so they reshard over TP, PP and DP like the model.
  The DistributedOptimizer uses ``fully_reshardable`` (in megatron-core 0.16.1,
  ``fully_sharded_model_space`` is deprecated and fails: its flattened tensors are no longer
  accepted): the DP ranks gather their shards before the save, and at load every rank reads
  its TP/PP part of the state and keeps its DP shard.
* common part (rank 0, ``common.pt``): ``iteration``, ``opt_param_scheduler``, and
  ``distill`` = {config as a dict, parallel layout, ``data_state``, format version}.
* ``rng/ppXX_tpXX_dpXXX.pt``: each rank's RNG states (python, numpy, torch CPU, CUDA when
  present, Megatron's model-parallel RNG tracker); restored only into the same layout.

Saving is atomic (``checkpoint_files.py``: ``.tmp-`` directory, ``COMPLETE`` marker listing
every file and its size, rename). Loading checks the marker and the sizes first, then the
student's architecture against the run's config (a different TP/PP/DP layout is fine), and
never unpickles arbitrary objects (``checkpoint_io.py``): ``common.pt`` and the RNG files are
read with ``torch.load(weights_only=True)``; tensors come through torch.distributed.checkpoint,
whose ``.metadata`` file (a pickle) is first checked by an unpickler that admits only its own
metadata classes; ``ShardedObject`` entries (pickled bytes, e.g. the ``_extra_state`` of
Megatron layers) are written, for Megatron-LM compatibility, but never read back. The LR
schedule follows this run's flags at the checkpoint's step count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_distill import checkpoint_files as files
from megatron_distill import checkpoint_io as cio
from megatron_distill.checkpoint_files import find_latest_complete
from megatron_distill.config import CheckpointConfig, DistillConfig, TrainConfig

__all__ = [
    "CheckpointError",
    "check_config",
    "data_state_of",
    "find_latest_complete",
    "has_pretrained_teacher",
    "load_checkpoint",
    "load_pretrained_teacher",
    "periodic_saver",
    "resume_from",
    "save_checkpoint",
    "save_pretrained_teacher",
]

FORMAT_VERSION = 1
# The DistributedOptimizer's reshardable format (TP, PP and DP may all change at load).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Fields of a ModelShape that do not change what the weights mean.
_NOT_ARCHITECTURE = ("hidden_dropout", "attention_dropout", "init_method_std")
# Config fields whose changes are not worth a note at resume.
_OPERATIONAL = ("checkpoint.", "train.metrics_file", "train.log_interval", "train.device",
                "train.distributed_timeout_minutes")

Log = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, or does not fit this run; the message says which."""


def _print0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


# --------------------------------------------------------------------------- collectives


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and give every rank its result; a ``CheckpointError`` (or any
    failure) there is raised on every rank, so no rank waits for a peer that gave up."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # every rank must learn about it
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckpointError) else str(exc)
    box = [result, error]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return box[0]


def _layout(engine) -> dict[str, int]:
    return {"tp": engine.pg.tp.size(), "pp": engine.pg.pp.size(), "dp": engine.pg.dp.size()}


def _rng_file(pp: int, tp: int, dp: int) -> str:
    return f"rng/pp{pp:02d}_tp{tp:02d}_dp{dp:03d}.pt"


# --------------------------------------------------------------------------- config checks


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flag(field: str) -> str:
    section, name = field.split(".", 1)
    name = "disable_bias_linear" if name == "add_bias_linear" else name
    return ("--teacher-" if section == "teacher" else "--") + name.replace("_", "-")


def check_config(saved: dict, cfg: DistillConfig, path: Path, *, model: str = "student",
                 loading_optimizer: bool = False) -> list[str]:
    """Raise ``CheckpointError`` if the checkpoint's ``model`` architecture differs from ``cfg``.

    The error names every differing field and its flag. A different parallel layout is allowed.
    With ``loading_optimizer``, switching ``--use-distributed-optimizer``, ``--bf16`` or
    ``--use-precision-aware-optimizer`` is an error too (the optimizer state has another
    structure). Returns notes on the other differences (training settings, data, the other
    model), which take effect.
    """
    old, new = _flatten(saved), _flatten(dataclasses.asdict(cfg))
    # Training settings added since the checkpoint was written had their default then.
    for key, value in dataclasses.asdict(TrainConfig()).items():
        old.setdefault(f"train.{key}", value)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    fatal = [k for k in changed if k.startswith(f"{model}.") and k.split(".", 1)[1] not in _NOT_ARCHITECTURE]
    if loading_optimizer:
        fatal += [k for k in changed if k in ("train.use_distributed_optimizer", "train.bf16",
                                                    "train.use_precision_aware_optimizer")]
    if fatal:
        lines = [f"{k} ({_flag(k)}): checkpoint {old.get(k)!r}, this run {new.get(k)!r}" for k in fatal]
        hint = " (or pass --no-load-optim)" if any(k.startswith("train.") for k in fatal) else ""
        raise CheckpointError(f"checkpoint {path} does not fit this run{hint}:\n  " + "\n  ".join(lines))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if not k.startswith(_OPERATIONAL)]


# --------------------------------------------------------------------------- saving


def _distill_info(cfg: DistillConfig, layout: dict, kind: str, **extra: Any) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": kind, "config": dataclasses.asdict(cfg),
            "layout": layout, **extra}


def _save_dir(final: Path, state: dict, dp_group, rank_files: dict[str, dict], expected_rank_files: list[str],
              marker: dict, keep_last: int | None = None) -> Path:
    """Write ``state`` (dist_checkpointing) and this rank's ``rank_files`` into a ``.tmp-``
    directory, then (rank 0) check, mark ``COMPLETE``, rename to ``final`` and prune.

    Tensors replicated over data-parallel ranks are written by one of them, the writes spread
    over the ``dp_group`` (Megatron's fully parallel save)."""

    def make_tmp() -> str:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = files.temporary_name(final)
        tmp.mkdir()
        return str(tmp)

    tmp = Path(_on_rank0(make_tmp))
    strategy = cio.InProcessTorchDistSave()
    if dp_group.size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, dp_group)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
    for rel, obj in rank_files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp / rel)
    dist.barrier()

    def finish() -> None:
        expected = {"metadata.json", COMMON_STATE_FNAME, ".metadata", *expected_rank_files}
        expected |= {item.relative_path for item in cio.read_dcp_metadata(tmp).storage_data.values()}
        missing = sorted(rel for rel in expected if not (tmp / rel).is_file())
        if missing:
            raise CheckpointError(f"save into {tmp} is incomplete, missing: {', '.join(missing)}")
        files.write_complete_marker(tmp, marker)
        files.commit(tmp, final)
        if marker["kind"] == "iteration":
            files.write_pointer(final.parent, marker["iteration"])
            if keep_last is not None:
                files.prune(final.parent, keep_last, marker["iteration"])

    _on_rank0(finish)
    return final


def save_checkpoint(engine, iteration: int, save_dir: str | os.PathLike, *, data_state: dict,
                    keep_last: int | None = None) -> Path:
    """Save the student, optimizer, LR schedule, RNG states, ``iteration`` and ``data_state``.

    Collective: every rank of the job calls it. ``data_state`` is the data position, the same
    on every rank (e.g. ``{"iteration": N}`` for the synthetic source); rank 0's is stored.
    Writes ``save_dir/iter_{iteration:07d}`` atomically (see ``checkpoint_files``), updates
    ``latest_checkpointed_iteration.txt``, then, with ``keep_last``, deletes older checkpoints
    so that ``keep_last`` complete ones remain. Returns the checkpoint's path.
    """
    rng = cio.capture_rng_state()  # before anything else can draw from a generator
    layout = _layout(engine)
    model_sd = engine.stage.student.sharded_state_dict()
    state = {
        "model": model_sd,
        "opt_param_scheduler": engine.scheduler.state_dict(),
        "iteration": iteration,
        "distill": _distill_info(engine.cfg, layout, "iteration", data_state=data_state,
                                 optimizer_metadata=OPTIMIZER_METADATA),
    }
    if engine.optimizer is not None:
        state["optimizer"] = engine.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    pg = engine.pg
    mine = {_rng_file(pg.pp.rank(), pg.tp.rank(), pg.dp.rank()): rng}
    every = [_rng_file(p, t, d) for p in range(layout["pp"]) for t in range(layout["tp"])
             for d in range(layout["dp"])]
    final = files.iteration_dir(save_dir, iteration)
    return _save_dir(final, state, pg.dp, mine, every, {"kind": "iteration", "iteration": iteration}, keep_last)


def save_pretrained_teacher(teacher: torch.nn.Module, cfg: DistillConfig, pg, save_dir: str | os.PathLike) -> Path:
    """Save a teacher trained in this run (the quickstart's pre-training) as ``save_dir/teacher_pretrained``.

    Sharded like a student checkpoint (plain GPTModel keys), so a resumed run at any layout
    loads it instead of pre-training again. Teachers read from elsewhere are never saved.
    """
    layout = {"tp": pg.tp.size(), "pp": pg.pp.size(), "dp": pg.dp.size()}
    state = {"model": teacher.sharded_state_dict(), "distill": _distill_info(cfg, layout, "teacher")}
    return _save_dir(Path(save_dir) / files.TEACHER_DIR, state, pg.dp, {}, [], {"kind": "teacher"})


def data_state_of(data: Any, iteration: int) -> dict:
    """The data position after ``iteration``: ``data.state_dict()`` when the source has one,
    else ``{"iteration": iteration}`` (sources that are a pure function of the iteration)."""
    return data.state_dict() if hasattr(data, "state_dict") else {"iteration": iteration}


def periodic_saver(engine, ckpt: CheckpointConfig, data: Any, train_iters: int,
                   log: Log = _print0) -> Callable[[int], None] | None:
    """A callback for the training loop: saves after every ``save_interval``-th iteration and
    after the last one. None without ``--save``."""
    if not ckpt.save:
        return None

    def after_iteration(iteration: int) -> None:
        if iteration == train_iters or (ckpt.save_interval and iteration % ckpt.save_interval == 0):
            path = save_checkpoint(engine, iteration, ckpt.save, data_state=data_state_of(data, iteration),
                                   keep_last=ckpt.keep_last)
            log(f"saved checkpoint {path}")

    return after_iteration


# --------------------------------------------------------------------------- loading


def _select(load_dir: Path, iteration: int | None, kind: str) -> Path:
    """Rank 0: the checkpoint directory to load, verified; raises ``CheckpointError``."""
    if kind == "teacher":
        path = load_dir / files.TEACHER_DIR
    elif iteration is None:
        found = files.list_checkpoints(load_dir)
        if not found:
            raise CheckpointError(f"no checkpoint (iter_NNNNNNN directory) in {load_dir}")
        path = found[-1][1]
    else:
        path = files.iteration_dir(load_dir, iteration)
        if not path.is_dir():
            have = ", ".join(str(i) for i, _ in files.list_checkpoints(load_dir)) or "none"
            raise CheckpointError(f"no checkpoint for iteration {iteration} in {load_dir} (have: {have})")
    problems = files.verify_checkpoint(path)
    if problems:
        good = files.find_latest_complete(load_dir) if kind == "iteration" else None
        hint = f"; the newest intact checkpoint is iteration {good}" if good is not None else ""
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged{hint}:\n  " + "\n  ".join(problems))
    try:
        cio.read_dcp_metadata(path)
        marker = files.read_marker(path)
        backend = json.loads((path / "metadata.json").read_text())["sharded_backend"]
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {exc}") from exc
    if backend != "torch_dist":
        raise CheckpointError(f"checkpoint {path} uses the {backend!r} backend; only 'torch_dist' is read")
    if marker.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {marker.get('kind')!r} checkpoint, expected {kind!r}")
    return path


def _load_model(model: torch.nn.Module, path: Path, extra_request: Callable[[dict], dict] | None,
                strict: bool) -> dict:
    """Load ``model`` (and whatever ``extra_request`` adds) from ``path``; returns the loaded dict."""
    model_sd = model.sharded_state_dict()
    _, model_sd = extract_matching_values(model_sd, lambda v: isinstance(v, ShardedObject))
    request = {"model": model_sd, **(extra_request(model_sd) if extra_request else {})}
    loaded = dist_checkpointing.load(
        request, str(path), sharded_strategy=TorchDistLoadShardedStrategy(), common_strategy=cio.SafeCommonLoad(),
        strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED,
    )
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint {path}: model keys missing {missing}, unexpected {unexpected}")
    return loaded


def load_checkpoint(engine, load_dir: str | os.PathLike, *, iteration: int | None = None, strict: bool = True,
                    load_optim: bool = True, load_rng: bool = True, data: Any = None,
                    log: Log = _print0) -> tuple[int, dict]:
    """Load the newest checkpoint under ``load_dir`` (or ``iteration``'s) into ``engine``.

    Collective. Returns ``(iteration, data_state)``. Raises ``CheckpointError`` naming the
    directory when the checkpoint is missing, incomplete or truncated (the newest one is not
    silently skipped: ``find_latest_complete`` finds the fallback), or when the student's
    architecture differs (naming the fields). A different TP/PP/DP layout is resharded (model and
    optimizer); RNG states are restored only into the same layout, last (after ``data``'s
    ``load_state_dict``, when a data source is given). ``load_optim=False`` keeps the freshly
    initialised optimizer state. The LR schedule is this run's (its flags) at the checkpoint's
    step count, also with ``load_optim=False``. ``strict=False`` tolerates model keys missing on
    either side (they keep their initial values).
    """
    path = Path(_on_rank0(lambda: str(_select(Path(load_dir), iteration, "iteration"))))
    common = cio.SafeCommonLoad().load_common(path)
    info = common["distill"]
    notes = check_config(info["config"], engine.cfg, path, loading_optimizer=load_optim)
    optimizer = engine.optimizer if load_optim else None

    def optimizer_request(model_sd: dict) -> dict:
        if optimizer is None:
            return {}
        cio.ensure_optimizer_state(optimizer)
        return {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                          metadata=info["optimizer_metadata"])}

    loaded = _load_model(engine.stage.student, path, optimizer_request, strict)
    if optimizer is not None:
        cio.load_optimizer_state(optimizer, loaded["optimizer"])
    elif engine.optimizer is not None:
        engine.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    engine.scheduler.num_steps = 0
    engine.scheduler.step(increment=common["opt_param_scheduler"]["num_steps"])
    if data is not None and hasattr(data, "load_state_dict"):
        data.load_state_dict(info["data_state"])
    if load_rng and info["layout"] == _layout(engine):
        pg = engine.pg
        rng_path = path / _rng_file(pg.pp.rank(), pg.tp.rank(), pg.dp.rank())
        cio.restore_rng_state(torch.load(rng_path, weights_only=True))
    elif load_rng:
        notes.append(f"RNG states not restored: layout {info['layout']} -> {_layout(engine)}")
    log(f"loaded checkpoint {path} (iteration {common['iteration']})")
    for note in notes:
        log(f"  differs from the checkpoint: {note}")
    return common["iteration"], info["data_state"]


def resume_from(engine, load_dir: str | os.PathLike, *, data: Any = None, load_optim: bool = True,
                load_rng: bool = True, log: Log = _print0) -> int:
    """What ``--load DIR`` does: resume from the newest checkpoint in ``load_dir``, if any.

    Returns the iteration to continue after (0 when ``load_dir`` holds no checkpoint yet, so
    ``--save D --load D`` works on the first run too). Restores ``data``'s position through its
    ``load_state_dict`` when it has one. Call it after building the data source: RNG states are
    restored last, so nothing may reseed the generators between this call and training.
    """
    if not _on_rank0(lambda: bool(files.list_checkpoints(load_dir))):
        log(f"no checkpoint in {load_dir}: starting from iteration 0")
        return 0
    iteration, _ = load_checkpoint(engine, load_dir, load_optim=load_optim, load_rng=load_rng, data=data, log=log)
    return iteration


def has_pretrained_teacher(load_dir: str | os.PathLike | None) -> bool:
    """Whether ``load_dir`` holds a complete ``teacher_pretrained`` checkpoint (collective: rank 0 looks)."""
    if not load_dir:
        return False
    return _on_rank0(lambda: not files.verify_checkpoint(Path(load_dir) / files.TEACHER_DIR))


def load_pretrained_teacher(teacher: torch.nn.Module, cfg: DistillConfig, load_dir: str | os.PathLike,
                            log: Log = _print0) -> None:
    """Load ``load_dir/teacher_pretrained`` into ``teacher`` (any layout); collective."""
    path = Path(_on_rank0(lambda: str(_select(Path(load_dir), None, "teacher"))))
    common = cio.SafeCommonLoad().load_common(path)
    check_config(common["distill"]["config"], cfg, path, model="teacher")
    _load_model(teacher, path, None, strict=True)
    log(f"loaded the pre-trained teacher from {path}")
