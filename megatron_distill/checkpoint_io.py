"""Reading and writing checkpoint pieces safely, and megatron-core 0.16.1 workarounds.

* ``InProcessTorchDistSave``: Megatron's ``torch_dist`` format written by this process.
* ``SafeCommonLoad`` / ``read_dcp_metadata``: the only unpickling a load does, restricted to
  ``torch.load(weights_only=True)`` and an allow-list of torch.distributed.checkpoint classes.
* ``capture_rng_state`` / ``restore_rng_state``: every RNG a training step draws from.
* ``load_optimizer_state`` / ``ensure_optimizer_state``: loading the DistributedOptimizer's
  ``fully_reshardable`` state with torch's Adam.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed import checkpoint as dcp


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks for something a safe load does not do."""


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """Megatron's ``torch_dist`` format, written synchronously by this process's own threads.

    Megatron's strategy writes through forked helper processes (and needs psutil); this one
    hands the same translated state dict and planner to ``torch.distributed.checkpoint.save``,
    so the files are the same format and load with Megatron's ``torch_dist`` loader.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        dcp.save(
            mcore_to_pyt_state_dict(flat, False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=2),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
        )


class SafeCommonLoad(TorchCommonLoadStrategy):
    """Reads ``common.pt`` with ``weights_only=True``; refuses pickled ``ShardedObject`` files."""

    def load_common(self, checkpoint_dir):
        return torch.load(Path(checkpoint_dir) / COMMON_STATE_FNAME, map_location="cpu", weights_only=True)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise UnsafeCheckpointError("refusing to unpickle ShardedObject files")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes torch.distributed.checkpoint's ``.metadata`` is made of."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
        "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata"},
    }

    def find_class(self, module: str, name: str) -> Any:
        torch_value = getattr(torch, name, None) if module == "torch" else None
        if name in self._ALLOWED.get(module, ()) or name == "Size" and module == "torch" or isinstance(
            torch_value, (torch.dtype, torch.layout, torch.memory_format)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


def read_dcp_metadata(path: Path):
    """torch.distributed.checkpoint's ``Metadata`` of ``path``, unpickled with an allow-list."""
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def capture_rng_state() -> dict:
    """This rank's RNG states as tensors and ints (loadable with ``weights_only=True``).

    On the CPU, Megatron's model-parallel tracker keeps its streams as CPU generator states
    (``platform.py`` redirects it); on CUDA they are CUDA generator states. Both are byte tensors.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch_cpu": torch.get_rng_state(),
        "tracker": {name: s.cpu() for name, s in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, working around two megatron-core 0.16.1 issues of the
    DistributedOptimizer with torch's Adam (no TE / apex), where ``step`` is per-parameter state:
    ``load_parameter_state_from_fully_reshardable`` copies every state key, ``step`` included,
    from tensors that have no ``step`` (KeyError); and ``load_state_dict`` gives every parameter
    the same ``step`` tensor object, which torch's Adam then increments once per parameter."""
    inners = _distributed_optimizers(optimizer)
    for inner in inners:
        original = inner._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, inner=inner, original=original):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        inner._set_main_param_and_optimizer_states = without_step
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for inner in inners:
            del inner._set_main_param_and_optimizer_states  # the instance patch; the method remains
    for inner in inners:
        for state in inner.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def ensure_optimizer_state(optimizer) -> None:
    """Give a DistributedOptimizer that has not stepped yet its state tensors, to be overwritten.

    Its ``sharded_state_dict(is_loading=True)`` reads the current state (torch's Adam creates
    it at the first step). Megatron's own dummy step does it; the parameters it touches are
    loaded right after.
    """
    for inner in _distributed_optimizers(optimizer):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
