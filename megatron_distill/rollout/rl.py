"""Rewards, group-relative advantages and the REINFORCE-with-baseline term of on-policy training.

Sign convention: the policy-gradient term is a loss to *minimise*,
``L_pg = - sum_{i, t in response_i} A_i * log pi(y_{i,t} | y_{i,<t})``; its gradient step raises
the log-probability of responses with positive advantage and lowers it for negative ones.
It is a *sum* over response tokens; the engine divides by the global token count, like the
distillation term.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

import torch

RewardFn = Callable[[str, str, str], float]

# A number: optional minus (not after a word character or a closing bracket, so "3-5" is 3 and 5),
# digits with properly grouped thousands commas or plain digits, optional decimals; or ".5".
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-\u2212])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def final_number(text: str) -> Fraction | None:
    """The last number in ``text`` as an exact fraction (``"1,234.50"`` -> 2469/2), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "").replace("\u2212", "-")
    return Fraction(raw)


def exact_match_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 when the response's final number equals the reference's final number, else 0.0.

    Numbers are compared exactly as values: ``"1,000"``, ``"1000"`` and ``"1000.0"`` match;
    negatives and decimals are parsed; a text without a number never matches. ``prompt`` is
    unused (it is part of the reward-function signature).
    """
    del prompt
    expected = final_number(reference)
    got = final_number(response)
    return 1.0 if expected is not None and got is not None and got == expected else 0.0


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"package.module:function"``; the function is called ``fn(prompt, response, reference)``.

    Raises ValueError for a malformed spec, ImportError when the module cannot be imported,
    AttributeError when it has no such name, TypeError when the name is not callable; each
    message names the spec.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"reward function spec must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO-style advantages: each reward minus the mean of its prompt's group.

    ``rewards`` ``[n_prompts * G]`` with each prompt's ``G = group_size`` samples contiguous
    (``[p0 s0, ..., p0 s(G-1), p1 s0, ...]``). Returns ``[n_prompts * G]`` in the rewards' float
    dtype. With ``normalize_std`` (GRPO, DeepSeekMath) the centred rewards are divided by the
    group's unbiased standard deviation plus ``eps``; off by default (Dr. GRPO: the division
    up-weights groups whose rewards barely differ). A group with equal rewards gets zeros.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [n_prompts * group_size], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if normalize_std and group_size < 2:
        raise ValueError("normalize_std needs group_size >= 2 (the std of one sample is undefined)")
    grouped = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def policy_gradient_loss_sum(logprobs: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE with baseline: ``-sum_{i,t} A_i * logprobs[i, t] * response_mask[i, t]``.

    ``logprobs`` ``[b, s]`` (differentiable, e.g. ``token_logprobs`` of the sampled tokens),
    ``advantages`` ``[b]`` (treated as constants), ``response_mask`` ``[b, s]`` (nonzero on the
    generated tokens). Returns a scalar sum; d/dz of it is ``-sum_t A (onehot - softmax)``.
    """
    if logprobs.shape != response_mask.shape or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"shapes: logprobs {tuple(logprobs.shape)}, advantages {tuple(advantages.shape)} "
            f"(must be [b]), response_mask {tuple(response_mask.shape)} (must equal logprobs)"
        )
    weights = advantages.detach().to(logprobs.dtype).unsqueeze(1) * response_mask.to(logprobs.dtype)
    return -(weights * logprobs).sum()
