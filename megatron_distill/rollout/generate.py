"""Batched autoregressive generation from the live weights of one GPTModel pipeline stage.

Runs in place on the model being trained (no weight copy), under the training TP x PP layout,
with Megatron-Core's ``StaticInferenceContext`` as the KV cache: ``GPTModel.forward(...,
inference_context=ctx)`` stores each layer's keys/values and, after the prompt, feeds one token
per step. Megatron's own engine/controller (``StaticInferenceEngine``,
``TextGenerationController``) is not used: it gathers full-vocabulary logits on every rank and
broadcasts them between stages; here only sampled token ids travel (see ``sampling.py``).

One step: the first stage embeds the tokens, each stage receives the previous stage's hidden
states ``[s, b, h]`` (Megatron's inference p2p helpers over the PP group), runs its layers and
sends on; the last stage computes its vocab shard of the last position's logits, samples
vocab-parallel, and broadcasts the ``[b]`` token ids over the PP group, so every rank (all TP
and PP ranks) holds identical token tensors and takes the same stop decisions.

Prompt layout: callers pass right-padded prompts (``prompts[i, :prompt_lengths[i]]``) and get
right-padded outputs (prompt, response, then ``pad_token_id``), the layout training uses.
Internally the KV cache is left-padded (all prompts end at the same cache position, so one
decode step serves the whole batch); padding keys are masked in attention and position ids
start at 0 at each prompt's first real token (RoPE depends only on relative positions, so its
cache-index offset cancels).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_distill.rollout.sampling import SamplingParams, sample_vocab_parallel

# Decode steps between checks that every row has stopped; the output is the same for any value
# (the steps after the last row stopped are trimmed), a larger one costs at most that many wasted
# steps per call and saves that many host syncs.
STOP_CHECK_INTERVAL = 8

_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@dataclass
class GenerationOutput:
    """Right-padded results, identical on every rank of the model-parallel group.

    ``tokens`` ``[b, P + n]`` (``P`` the prompt width, ``n`` the steps run, at most
    ``max_new_tokens``): row ``i`` is its prompt, its response, then ``pad_token_id``.
    ``response_mask`` ``[b, P + n]`` is True exactly on generated tokens (up to and including
    a stop token). ``prompt_lengths``, ``response_lengths`` ``[b]`` int64; ``truncated`` ``[b]``
    True where ``max_new_tokens`` ran out before a stop token.
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    truncated: torch.Tensor
    seconds: float

    @property
    def lengths(self) -> torch.Tensor:
        """Prompt + response length per sequence, ``[b]``."""
        return self.prompt_lengths + self.response_lengths

    @property
    def num_generated_tokens(self) -> int:
        return int(self.response_lengths.sum())

    @property
    def tokens_per_sec(self) -> float:
        """Generated (non-padding) tokens per second of this call, on this rank's clock."""
        return self.num_generated_tokens / max(self.seconds, 1e-9)


@contextlib.contextmanager
def _inference_mode(model: GPTModel):
    """eval(), no grad, sequence parallelism off, and the stage returning hidden states.

    Static-batch decoding feeds one token per step, which cannot be split over TP ranks, so
    sequence parallelism is switched off for the duration (as Megatron's controller does for
    dense models) and restored after. ``post_process`` off makes the last stage return its final
    hidden states ``[s, b, h]`` instead of gathered logits; the output layer is applied here,
    per vocab shard. Everything is restored on exit, even on error.
    """
    was_training = model.training
    saved = [(m, a, getattr(m, a)) for m in model.modules() for a in _SP_ATTRS if hasattr(m, a)]
    saved_cfg_sp = model.config.sequence_parallel
    saved_post = model.post_process
    try:
        model.eval()
        for module, attr, _ in saved:
            setattr(module, attr, False)
        model.config.sequence_parallel = False
        model.post_process = False
        with torch.no_grad():
            yield
    finally:
        model.post_process = saved_post
        model.config.sequence_parallel = saved_cfg_sp
        for module, attr, value in saved:
            setattr(module, attr, value)
        model.set_input_tensor(None)
        model.train(was_training)


def _output_weight(model: GPTModel) -> torch.Tensor:
    """This TP rank's output-layer rows ``[V_local, h]`` (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _stage_step(model: GPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, ctx: StaticInferenceContext,
                pg: ProcessGroupCollection) -> torch.Tensor | None:
    """One forward of this stage on ``[b, s]`` new tokens; the last stage returns ``[b, h]``."""
    b, s = input_ids.shape
    pp = pg.pp
    first, last = pp.rank() == 0, pp.rank() == pp.size() - 1
    recv = None
    if not first:
        cfg = model.config
        dtype = cfg.pipeline_dtype or cfg.params_dtype
        recv = torch.empty(s, b, cfg.hidden_size, dtype=dtype, device=input_ids.device)
        recv_from_prev_pipeline_rank_(recv, pp)
    model.set_input_tensor(recv)
    out = model(input_ids, position_ids, attention_mask, inference_context=ctx, runtime_gather_output=True)
    if not last:
        send_to_next_pipeline_rank(out.contiguous(), pp)
    ctx.increment_sequence_len_offset(s)
    return out[-1] if last else None


def _left_pad(prompts: torch.Tensor, lengths: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Right-padded ``[b, P]`` -> left-padded ``[b, P]`` (each prompt ends at column P - 1)."""
    width = prompts.shape[1]
    src = torch.arange(width, device=prompts.device) - (width - lengths).unsqueeze(1)
    left = prompts.gather(1, src.clamp(min=0))
    return left.masked_fill(src < 0, pad_token_id)


def _check_inputs(model: GPTModel, prompts: torch.Tensor, lengths: torch.Tensor,
                  params: SamplingParams, vocab_size: int) -> None:
    if prompts.dim() != 2 or prompts.dtype != torch.int64:
        raise ValueError(f"prompts must be a [b, P] int64 tensor, got {tuple(prompts.shape)} {prompts.dtype}")
    if lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompt_lengths must be [b]={prompts.shape[0]}, got {tuple(lengths.shape)}")
    if prompts.shape[1] == 0 or int(lengths.min()) < 1 or int(lengths.max()) > prompts.shape[1]:
        raise ValueError(f"prompt lengths must be in [1, {prompts.shape[1]}], got {lengths.tolist()}")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size}), got {params.stop_token_ids}")
    total = prompts.shape[1] + params.max_new_tokens
    if model.position_embedding_type == "learned_absolute" and total > model.max_sequence_length:
        raise ValueError(f"prompt width + max_new_tokens = {total} exceeds the model's "
                         f"max_position_embeddings ({model.max_sequence_length})")


def generate(model: GPTModel, prompts: torch.Tensor, params: SamplingParams, *, vocab_size: int,
             pg: ProcessGroupCollection, prompt_lengths: torch.Tensor | None = None,
             pad_token_id: int = 0) -> GenerationOutput:
    """Sample continuations of ``prompts`` with this rank's stage of ``model`` (call on all ranks).

    Args:
        model: this rank's unwrapped ``GPTModel`` stage (e.g. ``engine.stage.student``), built
            with ``parallel_output=True``; its train/eval mode and sequence-parallel setting are
            restored on return.
        prompts: ``[b, P]`` int64 on the model's device, right-padded; identical on every TP
            and PP rank of the model-parallel group (data-parallel replicas may differ).
        params: sampling settings; ``params.seed`` should differ per data-parallel rank and per
            call when independent samples are wanted.
        vocab_size: the real vocabulary size (TP padding rows above it are never sampled).
        pg: process groups; ``pg.tp`` and ``pg.pp`` are used.
        prompt_lengths: ``[b]`` real prompt lengths (default: all ``P``).
        pad_token_id: fills padding in the inputs and the outputs.

    Returns:
        ``GenerationOutput`` (right-padded ``tokens``, ``response_mask``, lengths, truncation
        flags, timing), the same on every rank.
    """
    device = prompts.device
    b, width = prompts.shape
    lengths = (torch.full((b,), width, dtype=torch.int64, device=device) if prompt_lengths is None
               else prompt_lengths.to(device=device, dtype=torch.int64))
    _check_inputs(model, prompts, lengths, params, vocab_size)
    start = time.perf_counter()
    max_new = params.max_new_tokens
    pad = width - lengths  # [b] left padding in the cache
    cache_len = width + max_new
    cache_pos = torch.arange(cache_len, device=device)
    positions = (cache_pos.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [b, cache_len]
    key_is_pad = cache_pos.unsqueeze(0) < pad.unsqueeze(1)  # [b, cache_len]
    any_pad = bool((pad > 0).any())
    prefill_mask = None
    if any_pad:  # True = masked; a padding query sees only itself (no all-masked rows)
        q, k = cache_pos[:width].view(width, 1), cache_pos[:width].view(1, width)
        prefill_mask = ((k > q) | (key_is_pad[:, None, :width] & (k != q))).unsqueeze(1)

    generated = torch.full((b, max_new), pad_token_id, dtype=torch.int64, device=device)
    response_lengths = torch.zeros(b, dtype=torch.int64, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.int64, device=device)
    tp, pp = pg.tp, pg.pp
    last_stage = pp.rank() == pp.size() - 1
    pp_last_rank = dist.get_process_group_ranks(pp)[-1] if pp.size() > 1 else None
    steps = 0
    weight = _output_weight(model) if last_stage else None  # before post_process is switched off
    vocab_start = tp.rank() * weight.shape[0] if last_stage else 0
    with _inference_mode(model):
        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=cache_len)
        input_ids = _left_pad(prompts, lengths, pad_token_id)
        pos, mask = positions[:, :width], prefill_mask
        for step in range(max_new):
            hidden = _stage_step(model, input_ids, pos, mask, ctx, pg)
            ctx.enable_decode_mode()
            if last_stage:
                logits = F.linear(hidden, weight)  # [b, V_local], this shard only
                tokens = sample_vocab_parallel(logits, params, step=step, vocab_start=vocab_start,
                                               vocab_size=vocab_size, tp_group=tp)
            else:
                tokens = torch.empty(b, dtype=torch.int64, device=device)
            if pp_last_rank is not None:
                dist.broadcast(tokens, src=pp_last_rank, group=pp)
            tokens = tokens.masked_fill(finished, pad_token_id)
            generated[:, step] = tokens
            response_lengths += (~finished).long()
            finished |= torch.isin(tokens, stop_ids)
            steps = step + 1
            # Looking at `finished` is a device -> host sync: done every step it would keep the host
            # from queueing the next step's kernels while the device runs this one.
            if steps % STOP_CHECK_INTERVAL == 0 and bool(finished.all()):
                break
            c = width + step  # cache position of the token fed next
            input_ids, pos = tokens.unsqueeze(1), positions[:, c : c + 1]
            mask = key_is_pad[:, None, None, : c + 1] if any_pad else None
    steps = min(steps, int(response_lengths.max()))  # the steps run after every row had stopped are all padding
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return assemble_output(prompts, lengths, generated[:, :steps], response_lengths, finished,
                           pad_token_id, time.perf_counter() - start)


def assemble_output(prompts: torch.Tensor, lengths: torch.Tensor, generated: torch.Tensor,
                    response_lengths: torch.Tensor, finished: torch.Tensor, pad_token_id: int,
                    seconds: float) -> GenerationOutput:
    """Right-padded ``[b, P + n]`` tokens and response mask from prompts and generated ids.

    ``prompts`` ``[b, P]`` right-padded with ``lengths`` ``[b]``; ``generated`` ``[b, n]`` the
    responses left-aligned (row ``i`` valid on its first ``response_lengths[i]`` columns);
    ``finished`` ``[b]`` True where a stop token ended the response. Shared by the in-place
    generator and the sglang backend (``sglang_backend.py``), so both give the same layout.
    """
    b, width = prompts.shape
    n = generated.shape[1]
    cols = torch.arange(width + n, device=prompts.device).unsqueeze(0)
    rel = cols - lengths.unsqueeze(1)  # index into the response
    in_prompt = rel < 0
    response_mask = (rel >= 0) & (rel < response_lengths.unsqueeze(1))
    tokens = torch.full((b, width + n), pad_token_id, dtype=torch.int64, device=prompts.device)
    prompt_part = prompts.gather(1, cols.clamp(max=width - 1).expand(b, -1))
    tokens = torch.where(in_prompt, prompt_part, tokens)
    if n > 0:
        response_part = generated.gather(1, rel.clamp(0, n - 1))
        tokens = torch.where(response_mask, response_part, tokens)
    return GenerationOutput(
        tokens=tokens,
        response_mask=response_mask,
        prompt_lengths=lengths,
        response_lengths=response_lengths,
        truncated=~finished,
        seconds=seconds,
    )
