"""On-policy distillation (GKD), sequence-level KD and the RL term: rollouts between data and schedule.

``OnPolicyData`` wraps this data-parallel rank's chat data source. ``get(i)``, called right
before iteration ``i + 1`` trains, so rollouts always come from the student's current weights:

1. reads the source's micro-batches of global batch ``i`` (prompts and dataset responses);
2. picks the generated samples (``on_policy_groups``): the global batch is cut into groups of
   ``--rollouts-per-prompt`` consecutive samples; ``round(lambda * groups)`` of them, spread
   evenly over the batch and the same whatever the layout, are on-policy: every sample of such
   a group gets a response sampled by the student from the prompt of the group's first row (the
   group's other rows are not used this time). With ``--seq-kd`` the other groups get responses
   generated the same way by the teacher; otherwise they keep the dataset's responses;
3. generates in place (``rollout/generate.py``) with the student's (teacher's) stage under the
   training TP x PP layout: every rank of this DP group calls ``generate`` with the same prompts
   and gets the same tokens. With ``--rollout-backend sglang`` the student's rollouts come from an
   sglang server instead (``rollout/sglang_rollout.py``: the student is exported and loaded by the
   server every ``--sglang-sync-interval`` iterations, then the DP group's first model-parallel
   rank sends the prompts and broadcasts the answers); ``--seq-kd``'s teacher rollouts stay in place;
4. with the RL term, decodes prompt and response (identically on every rank), calls the reward
   function and turns the rewards into group-baseline advantages (``rollout/rl.py``);
5. rebuilds the micro-batches: ``tokens`` = prompt + response (inputs), ``labels`` shifted by one,
   ``loss_mask`` = 1 exactly on labels that are generated tokens (prompt and padding never count),
   right-padded to ``--seq-length``; plus ``on_policy`` [b] (1 = student-generated) and
   ``advantages`` [b] (0 outside the student's rollouts) for the loss (pipeline/loss_step.py);
   under privileged-context self-distillation also the teacher's view of the new sequence
   (privileged block + prompt + generated response, data/privileged.py).

With ``lambda = 0`` and no ``--seq-kd`` nothing is generated: the source's tensors are passed on
unchanged (the flags added are zeros), no RNG is touched, and the losses equal offline KD bitwise.
Sampling noise is a counter-based hash (rollout/sampling.py) keyed by ``--rollout-seed``, the
iteration, the DP rank and the row: the same under any TP / PP layout, but a different DP size
draws different samples (greedy rollouts do not depend on the layout at all).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_distill.config import RolloutConfig
from megatron_distill.rollout.generate import GenerationOutput, generate
from megatron_distill.rollout.rl import group_advantages, load_reward_fn
from megatron_distill.rollout.sampling import SamplingParams
from megatron_distill.rollout.sglang_rollout import SglangRollouts

_MARKER = "MDISTILLMARKER"
_TENSOR_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "teacher_tokens", "teacher_position_ids",
                "teacher_index")


def on_policy_groups(num_groups: int, fraction: float) -> list[bool]:
    """Which of a global batch's ``num_groups`` sample groups are on-policy.

    ``round(fraction * num_groups)`` groups (halves round up), spread evenly: group ``j`` is on
    when ``floor((j + 1) f + 1/2) > floor(j f + 1/2)`` (for ``f = 1/2``: groups 0, 2, 4, ...).
    Each data-parallel rank's contiguous slice thus gets its share.
    """
    return [math.floor((j + 1) * fraction + 0.5) > math.floor(j * fraction + 0.5) for j in range(num_groups)]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The chat template's end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ...), or None.

    Found by rendering a two-turn conversation whose assistant content is a marker: the first
    special token the template writes after the marker closes the assistant turn. None without a
    chat template, when rendering fails, or when no special token follows the content.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that rejects this conversation: fall back to EOS alone
        return None
    if _MARKER not in text:
        return None
    suffix = text[text.rindex(_MARKER) + len(_MARKER):]
    special = _special_ids(tokenizer)
    for tid in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if int(tid) in special:
            return int(tid)
    return None


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Rollouts stop after the tokenizer's EOS or the chat template's end-of-turn token."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    eot = end_of_turn_token_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return tuple(ids)


def rollout_seed(seed: int, iteration: int, dp_rank: int, teacher: bool) -> int:
    """The sampling seed of one ``generate`` call (distinct per iteration, DP rank and generator)."""
    return (((seed * 1_000_003 + iteration) * 1_009 + dp_rank) * 2 + int(teacher)) % 2**62


@dataclass
class Rollout:
    """One ``generate`` call of an iteration: who generated, which local samples, the output."""

    who: str  # "student" or "teacher"
    slots: list[int]  # local sample index (DP-rank order) of each generated row
    output: GenerationOutput
    rewards: list[float] | None = None


class OnPolicyData:
    """A data source serving micro-batches whose responses are generated in place (module docstring).

    ``data``: this DP rank's ``ChatBatches``; ``engine``: the training engine (its
    ``stage.student`` / ``stage.teacher`` generate); ``tokenizer``: the student tokenizer (stop
    tokens, decoding for the reward). ``reward_fn`` overrides ``rollout.reward_fn`` (tests).
    ``state_dict`` / ``load_state_dict`` are the wrapped source's (rollouts are a function of the
    iteration and the weights, so a resumed run regenerates the same ones; with the sglang backend
    only greedy ones: the server samples with its own RNG). ``sglang``: the sglang backend's
    ``SglangRollouts`` (default: built from ``rollout`` when ``rollout.backend == "sglang"``).
    """

    def __init__(self, data: Any, engine: Any, tokenizer: Any, rollout: RolloutConfig, *,
                 device: torch.device, reward_fn: Callable[[str, str, str], float] | None = None,
                 sglang: SglangRollouts | None = None):
        self.data, self.engine, self.tokenizer, self.cfg, self.device = data, engine, tokenizer, rollout, device
        self.dp_rank, self.dp_size = engine.pg.dp.rank(), engine.pg.dp.size()
        self.group_size = rollout.rollouts_per_prompt
        self.stop_ids = stop_token_ids(tokenizer)
        self.rl = rollout.rl_loss_weight > 0
        self.reward_fn = reward_fn if reward_fn is not None else (
            load_reward_fn(rollout.reward_fn) if self.rl else None)
        self.last_rollouts: list[Rollout] = []
        self._metrics: dict[str, float] = {}
        self.sglang = sglang if sglang is not None or rollout.backend != "sglang" else SglangRollouts(
            rollout, engine, device, stop_token_ids=self.stop_ids)

    # ------------------------------------------------------------------ data-source interface

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)

    def get(self, index: int) -> list[dict]:
        """This DP rank's micro-batches of global batch ``index``, with generated responses."""
        start = time.perf_counter()
        # Every rank, whatever its share of rollouts: the export is collective.
        sync_seconds = self.sglang.maybe_sync(index) if self.sglang is not None else 0.0
        micro = self.data.get(index)
        samples = [(m, j) for m, mb in enumerate(micro) for j in range(mb["tokens"].shape[0])]
        n_local, n = len(samples), self.group_size
        chosen = on_policy_groups(n_local * self.dp_size // n, self.cfg.on_policy_fraction)
        jobs: dict[str, list[int]] = {"student": [], "teacher": []}
        for first in range(0, n_local, n):
            if chosen[(self.dp_rank * n_local + first) // n]:
                jobs["student"].append(first)
            elif self.cfg.seq_kd:
                jobs["teacher"].append(first)
        on_policy = torch.zeros(n_local)
        advantages = torch.zeros(n_local)
        self.last_rollouts = []
        if jobs["student"] or jobs["teacher"]:
            micro = [{k: (v.clone() if k in _TENSOR_KEYS else list(v) if k == "meta" else v) for k, v in mb.items()}
                     for mb in micro]
        for who, firsts in jobs.items():
            if not firsts:
                continue
            slots = [first + r for first in firsts for r in range(n)]
            rollout = self._generate(who, index, micro, samples, slots)
            self._write(rollout, micro, samples)
            self.last_rollouts.append(rollout)
            if who == "student":
                on_policy[slots] = 1.0
                if self.rl:
                    rollout.rewards = self._rewards(rollout, micro, samples)
                    adv = group_advantages(torch.tensor(rollout.rewards, dtype=torch.float64), n)
                    advantages[slots] = adv.to(advantages.dtype)
        offset = 0
        for mb in micro:
            b = mb["tokens"].shape[0]
            mb["on_policy"], mb["advantages"] = on_policy[offset:offset + b], advantages[offset:offset + b]
            offset += b
        self._record(time.perf_counter() - start, sync_seconds)
        return micro

    def add_metrics(self, stats) -> None:
        """Put the last ``get``'s rollout metrics into ``stats.extra``; ``stats.seconds`` then covers
        rollout + training (``train_seconds`` / ``rollout_seconds`` split it)."""
        train = stats.seconds
        stats.extra.update(self._metrics)
        stats.extra["train_seconds"] = train
        stats.seconds = train + self._metrics["rollout_seconds"]
        stats.tokens_per_sec = stats.tokens_per_sec * train / max(stats.seconds, 1e-12)

    # ------------------------------------------------------------------ steps

    def _generate(self, who: str, index: int, micro: list[dict], samples: list[tuple[int, int]],
                  slots: list[int]) -> Rollout:
        """Sample a response for each slot from its group's prompt (all ranks of the DP group)."""
        prompts = []
        for slot in slots:
            m, j = samples[slot - slot % self.group_size]  # the group's first row holds the prompt
            prompts.append(micro[m]["tokens"][j, : micro[m]["meta"][j]["prompt_length"]])
        lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
        width = int(lengths.max())
        pad = self.data.pad_token_id
        batch = torch.full((len(prompts), width), pad, dtype=torch.int64)
        for r, p in enumerate(prompts):
            batch[r, : p.numel()] = p
        model = self.engine.stage.student if who == "student" else self.engine.stage.teacher
        room = self.data.seq_length + 1 - width  # prompt + response = tokens + the last label
        if model.position_embedding_type == "learned_absolute":
            room = min(room, model.max_sequence_length - width)
        params = SamplingParams(
            max_new_tokens=max(0, min(self.cfg.max_new_tokens, room)), temperature=self.cfg.temperature,
            top_k=self.cfg.top_k, top_p=self.cfg.top_p, stop_token_ids=self.stop_ids,
            seed=rollout_seed(self.cfg.seed, index, self.dp_rank, who == "teacher"),
        )
        vocab = self.engine.cfg.student.vocab_size
        if who == "student" and self.sglang is not None:
            out = self.sglang.generate(batch.to(self.device), lengths.to(self.device), params, vocab_size=vocab,
                                       pad_token_id=pad)
        else:
            out = generate(model, batch.to(self.device), params, vocab_size=vocab, pg=self.engine.pg,
                           prompt_lengths=lengths.to(self.device), pad_token_id=pad)
        return Rollout(who, slots, out)

    def _write(self, rollout: Rollout, micro: list[dict], samples: list[tuple[int, int]]) -> None:
        """Replace each slot's sample by prompt + generated response (loss on the response only).

        The slot takes the metadata of its group's first row, whose prompt it answers (its
        ``reference`` for the reward, its ``context_ids`` for the teacher). With privileged
        context (data/privileged.py) the teacher's view is rebuilt around the generated response:
        the block is spliced before the prompt, so the response stays aligned token for token.
        """
        out = rollout.output
        tokens, response_mask, lengths = out.tokens.cpu(), out.response_mask.cpu(), out.lengths.cpu()
        seq = self.data.seq_length
        for r, slot in enumerate(rollout.slots):
            m, j = samples[slot]
            fm, fj = samples[slot - slot % self.group_size]
            mb, length = micro[m], int(lengths[r])
            ids = tokens[r, :length]
            mb["tokens"][j] = self.data.pad_token_id
            mb["labels"][j] = 0
            mb["loss_mask"][j] = 0
            mb["tokens"][j, : length - 1] = ids[:-1]
            mb["labels"][j, : length - 1] = ids[1:]
            mb["loss_mask"][j, : length - 1] = response_mask[r, 1:length].to(mb["loss_mask"].dtype)
            assert length - 1 <= seq, "a rollout longer than --seq-length"
            mb["meta"][j] = {**micro[fm]["meta"][fj], "rollout": rollout.who}
            if "teacher_tokens" in mb:
                self._write_teacher_view(mb, j)

    def _write_teacher_view(self, mb: dict, j: int) -> None:
        """Row ``j``'s privileged-context teacher tensors for its (new) tokens; positions whose
        teacher counterpart falls past ``--seq-length`` leave the loss."""
        from megatron_distill.data.privileged import teacher_fields

        block = mb["meta"][j].get("context_ids") or []
        fields = teacher_fields(mb["tokens"][j], mb["labels"][j], mb["loss_mask"][j], block,
                                self.tokenizer.bos_token_id, self.data.pad_token_id)
        for key, value in fields.items():
            mb[key][j] = value
        mb["loss_mask"][j] *= (fields["teacher_index"] >= 0).to(mb["loss_mask"].dtype)

    def _rewards(self, rollout: Rollout, micro: list[dict], samples: list[tuple[int, int]]) -> list[float]:
        """The reward of each row: ``reward_fn(prompt, response, reference)`` on decoded text."""
        out = rollout.output
        tokens = out.tokens.cpu()
        rewards = []
        for r, slot in enumerate(rollout.slots):
            m, j = samples[slot]
            p, length = int(out.prompt_lengths[r]), int(out.lengths[r])
            prompt = self.tokenizer.decode(tokens[r, :p].tolist(), skip_special_tokens=True)
            response = self.tokenizer.decode(tokens[r, p:length].tolist(), skip_special_tokens=True)
            reference = micro[m]["meta"][j].get("reference") or ""
            reward = float(self.reward_fn(prompt, response, reference))
            micro[m]["meta"][j]["reward"] = reward
            rewards.append(reward)
        return rewards

    def _record(self, seconds: float, sync_seconds: float = 0.0) -> None:
        """Global rollout metrics of this iteration (same on every rank; one all-reduce of each kind)."""
        local = torch.zeros(7, dtype=torch.float64)
        gen_seconds = 0.0
        for ro in self.last_rollouts:
            base = 0 if ro.who == "student" else 3
            local[base] += len(ro.slots)
            local[base + 1] += ro.output.num_generated_tokens
            local[base + 2] += float(ro.output.truncated.sum())
            gen_seconds += ro.output.seconds
            if ro.rewards is not None:
                local[6] += sum(ro.rewards)
        sums = local.to(self.device)
        dist.all_reduce(sums)
        sums = (sums / (self.engine.pg.tp.size() * self.engine.pg.pp.size())).tolist()
        times = torch.tensor([seconds, gen_seconds, sync_seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        seconds, gen_seconds, sync_seconds = times.tolist()
        rows, gen_tokens, truncated = sums[0] + sums[3], sums[1] + sums[4], sums[2] + sums[5]
        metrics = {"rollout_seconds": seconds, "generate_seconds": gen_seconds, "on_policy_samples": int(sums[0]),
                   "rollout_samples": int(rows), "rollout_tokens": int(gen_tokens),
                   "rollout_tokens_per_sec": gen_tokens / gen_seconds if gen_seconds > 0 else 0.0}
        if rows > 0:
            metrics["rollout_mean_response_length"] = gen_tokens / rows
            metrics["rollout_truncated_fraction"] = truncated / rows
        if self.rl and sums[0] > 0:
            metrics["reward_mean"] = sums[6] / sums[0]
        if self.sglang is not None:  # export + server reload time (0 when no sync was due), in rollout_seconds
            metrics["weight_sync_seconds"] = sync_seconds
        self._metrics = metrics
