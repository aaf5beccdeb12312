"""Map a full (TP=1, PP=1) GPT state dict to one rank's TP/PP shard and back.

Megatron marks each tensor-parallel parameter with ``tensor_model_parallel`` and
``partition_dim``; pipeline stages renumber their layers from 0. Two layouts need care:
the SwiGLU ``linear_fc1`` weight is ``[gate; up]`` and each TP rank holds
``[gate_shard; up_shard]``; vocabulary rows are padded to a TP multiple. With tied embeddings
the last stage's ``output_layer.weight`` is a copy of ``embedding.word_embeddings.weight``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class ParamLayout:
    """How one local parameter relates to its full tensor."""

    global_name: str
    tp_split: bool
    partition_dim: int
    glu: bool


def layer_offset(num_layers: int, pp_rank: int, pp_size: int) -> int:
    """Index of the first transformer layer held by pipeline stage ``pp_rank``."""
    return pp_rank * (num_layers // pp_size)


def global_name(local_name: str, offset: int) -> str:
    """``decoder.layers.<i>.x`` on a stage -> ``decoder.layers.<i + offset>.x`` in the full model."""
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def param_layouts(model: torch.nn.Module, offset: int, gated_mlp: bool) -> dict[str, ParamLayout]:
    """Layout of every parameter of ``model`` (one GPTModel stage), keyed by local name."""
    layouts = {}
    for name, param in model.named_parameters():
        tp_split = bool(getattr(param, "tensor_model_parallel", False))
        layouts[name] = ParamLayout(
            global_name=global_name(name, offset),
            tp_split=tp_split,
            partition_dim=int(getattr(param, "partition_dim", 0)) if tp_split else -1,
            glu=gated_mlp and "mlp.linear_fc1." in name,
        )
    return layouts


def shard_tensor(full: torch.Tensor, layout: ParamLayout, local_shape: torch.Size, tp_rank: int,
                 tp_size: int) -> torch.Tensor:
    """This TP rank's slice of ``full`` with shape ``local_shape`` (zero-padding vocab rows)."""
    if not layout.tp_split:
        return full
    dim = layout.partition_dim
    if layout.glu:
        gate, up = torch.chunk(full, 2, dim=dim)
        gate_shard = gate.chunk(tp_size, dim=dim)[tp_rank]
        return torch.cat([gate_shard, up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    per_rank = local_shape[dim]
    needed = per_rank * tp_size
    if full.shape[dim] < needed:  # vocab padding rows
        pad_shape = list(full.shape)
        pad_shape[dim] = needed - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.narrow(dim, tp_rank * per_rank, per_rank)


def unshard_tensors(
    shards: list[torch.Tensor], layout: ParamLayout, full_rows: int | None = None
) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from the TP shards in rank order.

    ``full_rows`` trims vocab padding along the partition dim (for vocab-sized params).
    """
    if not layout.tp_split:
        return shards[0]
    dim = layout.partition_dim
    if layout.glu:
        gates, ups = zip(*(torch.chunk(s, 2, dim=dim) for s in shards), strict=True)
        return torch.cat([torch.cat(gates, dim=dim), torch.cat(ups, dim=dim)], dim=dim)
    full = torch.cat(shards, dim=dim)
    if full_rows is not None:
        full = full.narrow(dim, 0, full_rows)
    return full


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], *, num_layers: int,
                         pp_rank: int, pp_size: int, tp_rank: int, tp_size: int, gated_mlp: bool) -> None:
    """Copy this rank's shard of the full state dict ``full`` into ``model`` (one GPTModel stage).

    Raises KeyError naming the parameter when ``full`` lacks one the stage needs.
    """
    offset = layer_offset(num_layers, pp_rank, pp_size)
    layouts = param_layouts(model, offset, gated_mlp)
    with torch.no_grad():
        for name, param in model.named_parameters():
            layout = layouts[name]
            key = layout.global_name
            if key not in full and key == TIED_OUTPUT:
                key = EMBEDDING  # tied embeddings: the last stage holds a copy
            if key not in full:
                raise KeyError(f"full state dict has no tensor for parameter {layout.global_name!r}")
            local = shard_tensor(full[key], layout, param.shape, tp_rank, tp_size)
            if local.shape != param.shape:
                raise ValueError(
                    f"shape mismatch for {layout.global_name!r}: shard {tuple(local.shape)} vs "
                    f"parameter {tuple(param.shape)}"
                )
            param.copy_(local)


def is_vocab_param(global_param_name: str) -> bool:
    """Whether the parameter's partition dim is the (padded) vocabulary."""
    return global_param_name in _VOCAB_PARAMS
