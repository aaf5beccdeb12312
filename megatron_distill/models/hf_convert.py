"""Hugging Face safetensors checkpoints <-> Megatron GPTModel stages (Llama 3.x, Qwen2, Qwen3).

Name and layout mapping (full TP1 x PP1 Megatron names; ``L`` = ``decoder.layers.<i>.``,
``H`` = ``model.layers.<i>.``):

| Megatron | HF |
| --- | --- |
| ``embedding.word_embeddings.weight`` | ``model.embed_tokens.weight`` |
| ``L input_layernorm.weight`` | ``H input_layernorm.weight`` |
| ``L self_attention.linear_qkv.{weight,bias}`` | ``H self_attn.{q,k,v}_proj.{weight,bias}``, grouped |
| ``L self_attention.{q,k}_layernorm.weight`` | ``H self_attn.{q,k}_norm.weight`` (Qwen3) |
| ``L self_attention.linear_proj.weight`` | ``H self_attn.o_proj.weight`` |
| ``L pre_mlp_layernorm.weight`` | ``H post_attention_layernorm.weight`` |
| ``L mlp.linear_fc1.weight`` | ``[H mlp.gate_proj.weight; H mlp.up_proj.weight]`` |
| ``L mlp.linear_fc2.weight`` | ``H mlp.down_proj.weight`` |
| ``decoder.final_layernorm.weight`` | ``model.norm.weight`` |
| ``output_layer.weight`` (untied only) | ``lm_head.weight`` |

Megatron's fused QKV rows are grouped per query group: for each of the ``ng`` groups,
``heads/ng`` query heads, then that group's key head, then its value head, ``head_dim`` rows each.

Only safetensors are read (lazily, tensor by tensor, with ``safe_open``); pickled
``pytorch_model.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_distill.config import ModelShape
from megatron_distill.models.hf_config import (
    HFConfigError,
    apply_rope_scaling,
    hf_config_from_shape,
    hf_rope_scaling,
    read_hf_config,
    shape_from_hf_config,
)
from megatron_distill.models.sharding import (
    EMBEDDING,
    TIED_OUTPUT,
    is_vocab_param,
    layer_offset,
    param_layouts,
    shard_tensor,
    unshard_tensors,
)

HF_EMBED, HF_LM_HEAD, HF_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "self_attention.linear_qkv.bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointError(ValueError):
    """A problem with an HF checkpoint's files or tensors; the message names the file / tensor."""


# ---------------------------------------------------------------------------- name mapping


def _head_dim(shape: ModelShape) -> int:
    return shape.kv_channels or shape.hidden_size // shape.num_attention_heads


def _layer_names(shape: ModelShape) -> list[str]:
    names = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    names += ["self_attention.linear_qkv.bias"] if shape.add_qkv_bias else []
    names += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] if shape.qk_layernorm else []
    return names + ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                    "mlp.linear_fc2.weight"]


def megatron_names(shape: ModelShape) -> list[str]:
    """Parameter names of the full (TP1 x PP1) GPTModel (no ``output_layer.weight`` when tied)."""
    _require_convertible(shape)
    names = [EMBEDDING]
    for i in range(shape.num_layers):
        names += [f"decoder.layers.{i}.{n}" for n in _layer_names(shape)]
    return names + [FINAL_NORM] + ([TIED_OUTPUT] if shape.untie_embeddings_and_output_weights else [])


def hf_sources(megatron_name: str, shape: ModelShape) -> tuple[str, ...]:
    """HF tensor names one full Megatron parameter is built from (a tied output layer: the embedding)."""
    if megatron_name == EMBEDDING:
        return (HF_EMBED,)
    if megatron_name == FINAL_NORM:
        return (HF_NORM,)
    if megatron_name == TIED_OUTPUT:
        return (HF_LM_HEAD,) if shape.untie_embeddings_and_output_weights else (HF_EMBED,)
    parts = megatron_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in _LAYER_MAP:
        return tuple(f"model.layers.{parts[2]}.{n}" for n in _LAYER_MAP[parts[3]])
    raise KeyError(f"no HF equivalent for Megatron parameter {megatron_name!r}")


def hf_tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model and its expected shape (``lm_head`` only when untied)."""
    h, d, v, f = shape.hidden_size, _head_dim(shape), shape.vocab_size, shape.ffn_hidden_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if shape.add_qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
    if shape.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    out = {HF_EMBED: (v, h), HF_NORM: (h,)}
    for i in range(shape.num_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if shape.untie_embeddings_and_output_weights:
        out[HF_LM_HEAD] = (v, h)
    return out


def _require_convertible(shape: ModelShape) -> None:
    if not (shape.swiglu and shape.normalization == "RMSNorm" and shape.position_embedding_type == "rope"
            and not shape.add_bias_linear):
        raise HFConfigError(
            "HF conversion needs swiglu, RMSNorm, rope and add_bias_linear=False (Llama / Qwen2 / Qwen3 shapes)"
        )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """HF ``q [heads*d, ...]``, ``k``/``v [ng*d, ...]`` -> Megatron ``[ng*(heads/ng + 2)*d, ...]`` (grouped)."""
    ng, d = shape.num_query_groups, _head_dim(shape)
    rest = q.shape[1:]
    return torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)],
                     dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: ``(q, k, v)``, each a new contiguous tensor."""
    ng, d = shape.num_query_groups, _head_dim(shape)
    rest = fused.shape[1:]
    q_rows = shape.num_attention_heads // ng * d
    q, k, v = fused.reshape(ng, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).clone() for t in (q, k, v))


def _to_megatron(name: str, parts: list[torch.Tensor], shape: ModelShape) -> torch.Tensor:
    if ".linear_qkv." in name:
        return fuse_qkv(*parts, shape)
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    return parts[0]


def _to_hf(name: str, tensor: torch.Tensor, shape: ModelShape) -> dict[str, torch.Tensor]:
    """HF tensors of one full Megatron parameter (vocab padding rows dropped)."""
    sources = hf_sources(name, shape)
    if is_vocab_param(name):
        tensor = tensor[: shape.vocab_size]
    if ".linear_qkv." in name:
        parts = split_qkv(tensor, shape)
    elif name.endswith("mlp.linear_fc1.weight"):
        parts = tuple(t.clone() for t in tensor.chunk(2, dim=0))
    else:
        parts = (tensor,)
    return dict(zip(sources, parts, strict=True))


def _check_hf_shapes(names: list[str], shape_of: Callable[[str], tuple[int, ...] | None],
                     expected: dict[str, tuple[int, ...]], where: str) -> None:
    problems = []
    for name in names:
        found = shape_of(name)
        if found is None:
            problems.append(f"missing tensor {name!r}")
        elif tuple(found) != expected[name]:
            problems.append(f"tensor {name!r} has shape {tuple(found)}, expected {expected[name]}")
    if problems:
        raise HFCheckpointError(f"{where}: " + "; ".join(problems))


def hf_to_megatron_state_dict(hf_tensors: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Full TP1 x PP1 Megatron state dict from HF tensors (``[out, in]`` weights, dtype kept).

    Fused QKV ``[ng*(heads/ng+2)*d, h]``, SwiGLU fc1 ``[2*ffn, h]`` = ``[gate; up]``; no vocab
    padding; ``output_layer.weight`` only when untied. Extra HF tensors are ignored; a missing
    one or a wrong shape raises ``HFCheckpointError`` naming the tensor (expected vs found).
    """
    names = megatron_names(shape)
    expected = hf_tensor_shapes(shape)
    needed = [s for n in names for s in hf_sources(n, shape)]
    _check_hf_shapes(needed, lambda n: tuple(hf_tensors[n].shape) if n in hf_tensors else None, expected,
                     "HF state dict")
    return {n: _to_megatron(n, [hf_tensors[s] for s in hf_sources(n, shape)], shape) for n in names}


def megatron_to_hf_state_dict(full: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Exact inverse of ``hf_to_megatron_state_dict`` (vocab rows beyond ``vocab_size`` dropped).

    A tied model yields no ``lm_head.weight`` (as HF's ``save_pretrained`` writes it).
    """
    missing = [n for n in megatron_names(shape) if n not in full]
    if missing:
        raise KeyError(f"Megatron state dict lacks {missing}")
    out: dict[str, torch.Tensor] = {}
    for name in megatron_names(shape):
        out.update(_to_hf(name, full[name], shape))
    return out


# ---------------------------------------------------------------------------- reading


class HFCheckpoint:
    """Lazy reader of an HF dir's safetensors (``model.safetensors`` or an index + shards).

    Only opened headers are read at construction; tensors are read one by one on ``get``.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"HF checkpoint dir {self.dir} does not exist")
        index, single = (os.path.join(self.dir, n) for n in ("model.safetensors.index.json", "model.safetensors"))
        self._handles: dict[str, Any] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err!r})") from err
            for fname in sorted(set(self.weight_map.values())):
                if not os.path.isfile(os.path.join(self.dir, fname)):
                    raise FileNotFoundError(f"{index} references shard {fname!r}, which does not exist in {self.dir}")
        elif os.path.isfile(single):
            self.weight_map = dict.fromkeys(self._open("model.safetensors").keys(), "model.safetensors")
        elif any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json"))
                 for n in os.listdir(self.dir)):
            raise HFCheckpointError(
                f"{self.dir} holds only pickled pytorch_model*.bin weights, which are not loaded (unsafe). "
                "Convert them to safetensors first, e.g. AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(out_dir, safe_serialization=True)"
            )
        else:
            raise FileNotFoundError(f"{self.dir} has no model.safetensors or model.safetensors.index.json")

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            path = os.path.join(self.dir, fname)
            try:
                self._handles[fname] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise HFCheckpointError(f"{path}: cannot read safetensors file ({err}); truncated or corrupt?") from err
        return self._handles[fname]

    def _file_of(self, name: str) -> Any:
        handle = self._open(self.weight_map[name])
        if name not in handle.keys():
            raise HFCheckpointError(f"{os.path.join(self.dir, self.weight_map[name])}: has no tensor {name!r} "
                                    "although the index says so")
        return handle

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """Shape of tensor ``name`` from its file header, None when the checkpoint lacks it."""
        if name not in self.weight_map:
            return None
        return tuple(self._file_of(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from its file (CPU, stored dtype)."""
        try:
            return self._file_of(name).get_tensor(name)
        except SafetensorError as err:
            raise HFCheckpointError(f"{self.weight_map[name]}: cannot read tensor {name!r} ({err})") from err

    def close(self) -> None:
        """Release the open file handles."""
        self._handles.clear()


_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "vocab_size", "norm_epsilon", "rotary_base", "add_qkv_bias", "qk_layernorm",
                 "untie_embeddings_and_output_weights")


def load_hf_into_stage(model: torch.nn.Module, hf_dir: str | os.PathLike, shape: ModelShape, *, tp_rank: int,
                       tp_size: int, pp_rank: int, pp_size: int) -> None:
    """Copy this rank's TP/PP shard of an HF safetensors checkpoint into ``model`` (one GPTModel stage).

    Reads only the tensors this stage needs, one at a time (each full tensor, then its TP slice);
    vocab rows are padded with zeros to the stage's TP multiple; dtype is converted to the
    parameters'. Also applies the config's ``llama3`` RoPE scaling to the stage. Everything is
    checked (config fields vs ``shape``, presence and shape of every needed tensor, readable
    files) before the first parameter is written; errors name the file, field or tensor.
    """
    where = read_hf_config(hf_dir)[1]
    expected_shape = shape_from_hf_config(hf_dir)
    diffs = [f"{f}: config {getattr(expected_shape, f)!r} vs given {getattr(shape, f)!r}"
             for f in _SHAPE_FIELDS if getattr(expected_shape, f) != getattr(shape, f)]
    if diffs:
        raise HFConfigError(f"{where} does not match the model shape: " + "; ".join(diffs))
    ckpt = HFCheckpoint(hf_dir)
    try:
        layouts = param_layouts(model, layer_offset(shape.num_layers, pp_rank, pp_size), shape.swiglu)
        sources = {name: hf_sources(layout.global_name, shape) for name, layout in layouts.items()}
        needed = list(dict.fromkeys(s for srcs in sources.values() for s in srcs))
        _check_hf_shapes(needed, ckpt.shape_of, hf_tensor_shapes(shape), ckpt.dir)
        with torch.no_grad():
            for name, param in model.named_parameters():
                layout = layouts[name]
                full = _to_megatron(layout.global_name, [ckpt.get(s) for s in sources[name]], shape)
                local = shard_tensor(full, layout, param.shape, tp_rank, tp_size)
                if local.shape != param.shape:
                    raise HFCheckpointError(f"{layout.global_name}: shard {tuple(local.shape)} does not fit "
                                            f"parameter {tuple(param.shape)} (TP {tp_rank}/{tp_size})")
                param.copy_(local)
    finally:
        ckpt.close()
    apply_rope_scaling(model, hf_rope_scaling(hf_dir))


# ---------------------------------------------------------------------------- writing


class _ShardWriter:
    """Accumulates tensors and writes safetensors files of at most ~``max_bytes`` each."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.total_bytes = 0, 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last file; name the files as ``save_pretrained`` does (+ index when several)."""
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.rename(os.path.join(self.out_dir, self.files[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, (fname, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.rename(os.path.join(self.out_dir, fname), os.path.join(self.out_dir, final))
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def _full_tensors(model: torch.nn.Module, shape: ModelShape, pg: Any) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(global name, full tensor)`` per parameter of this stage, TP-gathered; the tensor only on TP rank 0.

    Every TP rank of the stage must iterate in step (one all-gather per TP-split parameter). The
    tied output-layer copy of the last stage is skipped; vocab padding rows are dropped.
    """
    tp = pg.tp.size()
    layouts = param_layouts(model, layer_offset(shape.num_layers, pg.pp.rank(), pg.pp.size()), shape.swiglu)
    for name, param in model.named_parameters():
        layout = layouts[name]
        if layout.global_name == TIED_OUTPUT and not shape.untie_embeddings_and_output_weights:
            continue
        local = param.detach().contiguous()
        if layout.tp_split and tp > 1:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local, group=pg.tp)
        else:
            shards = [local]
        rows = shape.vocab_size if is_vocab_param(layout.global_name) else None
        yield layout.global_name, unshard_tensors(shards, layout, rows) if pg.tp.rank() == 0 else None


def _prepare_target(out_dir: str, overwrite: bool, tokenizer_dir: str | None) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"export target {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"export target {out_dir} exists and is not empty; pass overwrite=True to replace it")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist")


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` dir to ``out_dir``, replacing an existing one only at the end."""
    backup = None
    if os.path.isdir(out_dir):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(backup)
        os.rename(out_dir, backup)
    os.rename(tmp, out_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _agree(status: str | None, src: int) -> None:
    """Broadcast ``src``'s error message (or None) to every rank; raise it everywhere."""
    box = [status]
    dist.broadcast_object_list(box, src=src)
    if box[0] is not None:
        raise HFCheckpointError(box[0])


def export_hf(stage_model: torch.nn.Module, shape: ModelShape, hf_out_dir: str | os.PathLike, *, pg: Any,
              tokenizer_dir: str | os.PathLike | None = None, source_config: Any = None, overwrite: bool = False,
              dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the whole model, gathered from every TP/PP rank, as an HF checkpoint dir (collective).

    Call on every rank of the world with this rank's GPTModel stage (unwrapped: not DDP or
    DistillStage). TP shards are all-gathered within each stage (DP rank 0 only); each stage's
    TP rank 0 sends its full tensors to the rank with pp=tp=dp=0, which converts them to HF names
    and writes, in a temp dir next to ``hf_out_dir`` then renamed: ``config.json``
    (``hf_config_from_shape`` of ``source_config``, dtype and the stage's RoPE scaling),
    ``model.safetensors`` or ``max_shard_bytes`` shards + index, and ``TOKENIZER_FILES`` found in
    ``tokenizer_dir``. ``dtype``: default the parameters'. An existing non-empty ``hf_out_dir`` is
    only replaced with ``overwrite=True``. Errors are raised on every rank.
    """
    out_dir = os.path.abspath(os.fspath(hf_out_dir))
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (pg.pp.rank(), pg.tp.rank(), pg.dp.rank()))
    dst = ranks.index((0, 0, 0))
    senders = {pp: ranks.index((pp, 0, 0)) for pp in range(1, pg.pp.size())}
    is_dst = dist.get_rank() == dst
    dtype = dtype or next(stage_model.parameters()).dtype
    status, tmp, config = None, None, None
    if is_dst:
        try:
            _prepare_target(out_dir, overwrite, tokenizer_dir)
            config = hf_config_from_shape(shape, source_config=source_config, dtype=dtype,
                                          rope_scaling=getattr(stage_model, "hf_rope_scaling", None))
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
        except (OSError, ValueError) as err:
            status = f"export to {out_dir} failed: {err}"
    _agree(status, dst)
    device = next(stage_model.parameters()).device
    writer = _ShardWriter(tmp, max_shard_bytes) if is_dst else None

    def sink(name: str, full: torch.Tensor) -> None:  # on dst; keeps receiving after a failure
        nonlocal status
        if status is None:
            try:
                for hf_name, t in _to_hf(name, full, shape).items():
                    writer.add(hf_name, t.to(device="cpu", dtype=dtype))
            except (OSError, ValueError, RuntimeError) as err:
                status = f"export to {out_dir} failed writing {name}: {err}"

    if pg.dp.rank() == 0:
        for name, full in _full_tensors(stage_model, shape, pg):
            if is_dst:
                sink(name, full)
            elif full is not None:  # TP rank 0 of a later stage
                dist.send_object_list([(name, tuple(full.shape), full.dtype)], dst=dst)
                dist.send(full, dst=dst)
        if pg.tp.rank() == 0 and not is_dst:
            dist.send_object_list([None], dst=dst)
        for src in senders.values() if is_dst else ():
            while True:
                box = [None]
                dist.recv_object_list(box, src=src)
                if box[0] is None:
                    break
                full = torch.empty(box[0][1], dtype=box[0][2], device=device)
                dist.recv(full, src=src)
                sink(box[0][0], full)
    if is_dst:
        try:
            if status is None:
                writer.finish()
                with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                for fname in TOKENIZER_FILES if tokenizer_dir is not None else ():
                    if os.path.isfile(os.path.join(tokenizer_dir, fname)):
                        shutil.copy2(os.path.join(tokenizer_dir, fname), os.path.join(tmp, fname))
                _publish(tmp, out_dir)
        except (OSError, ValueError) as err:
            status = f"export to {out_dir} failed: {err}"
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    _agree(status, dst)
