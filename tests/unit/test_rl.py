"""RL building blocks of on-policy distillation: rewards, advantages, the policy-gradient term,
per-token log-probs under vocab-parallel logits, and the sampler's distribution.

CPU, single process (one small gloo run for the TP=2 log-prob case); no Megatron-Core needed.
"""

from __future__ import annotations

import pytest
import torch

from megatron_distill.rollout.logprobs import token_logprobs
from megatron_distill.rollout.rl import (
    exact_match_reward,
    group_advantages,
    load_reward_fn,
    policy_gradient_loss_sum,
)
from megatron_distill.rollout.sampling import SamplingParams, sample_vocab_parallel
from tests._dist_utils import run_distributed


def test_policy_gradient_grad_equals_hand_computed_reinforce():
    """2 prompts x 3 samples: d/dz of the PG term is -sum_t A (onehot - softmax), in float64."""
    gen = torch.Generator().manual_seed(0)
    n_prompts, group, s, vocab = 2, 3, 4, 5
    b = n_prompts * group
    logits = torch.randn(b, s, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 0, 1]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, group)
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 1 / 3, -1 / 3, -1 / 3, 2 / 3], dtype=torch.float64))

    loss = policy_gradient_loss_sum(token_logprobs(logits, tokens, None, 0), adv, mask)
    loss.backward()

    z = logits.detach()
    softmax = z.softmax(-1)
    onehot = torch.nn.functional.one_hot(tokens, vocab).to(torch.float64)
    weight = adv.view(b, 1, 1) * mask.to(torch.float64).unsqueeze(-1)
    expected_grad = -weight * (onehot - softmax)
    expected_loss = -(weight.squeeze(-1) * z.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)).sum()
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)


def test_policy_gradient_checks_shapes_and_detaches_advantages():
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.ones(2, requires_grad=True)
    policy_gradient_loss_sum(lp, adv, torch.ones(2, 3)).backward()
    assert adv.grad is None
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss_sum(lp, torch.ones(3), torch.ones(2, 3))


@pytest.mark.parametrize(
    "response,reference,expected",
    [
        ("The answer is 42.", "#### 42", 1.0),
        ("so 3 + 4 = 7", "7", 1.0),
        ("It costs $1,234.50 in total", "1234.5", 1.0),
        ("we get 1,000", "The result: 1000.0", 1.0),
        ("the temperature is -5 degrees", "-5", 1.0),
        ("from 3-5 we get", "-5", 0.0),  # a range, not a negative number: final number is 5
        ("from 3-5 we get", "5", 1.0),
        ("answer: 41", "42", 0.0),
        ("no number here", "42", 0.0),
        ("42", "no number", 0.0),
        ("values 1,2,3", "3", 1.0),
        ("0.5", ".5", 1.0),
        ("\u22127", "-7", 1.0),
    ],
)
def test_exact_match_reward(response, reference, expected):
    assert exact_match_reward("prompt 99", response, reference) == expected


def test_load_reward_fn():
    fn = load_reward_fn("megatron_distill.rollout.rl:exact_match_reward")
    assert fn("", "x = 3", "3") == 1.0
    with pytest.raises(ValueError, match="package.module:function"):
        load_reward_fn("megatron_distill.rollout.rl.exact_match_reward")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(AttributeError, match="nothing_here"):
        load_reward_fn("megatron_distill.rollout.rl:nothing_here")
    with pytest.raises(TypeError, match="not a callable"):
        load_reward_fn("megatron_distill.rollout.rl:_NUMBER")


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantages(rewards, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    normed = group_advantages(rewards, 3, normalize_std=True, eps=0.0)
    torch.testing.assert_close(normed[:3], torch.tensor([-1.0, 0.0, 1.0]))  # unbiased std of 1,2,3 is 1
    assert torch.isfinite(group_advantages(rewards, 3, normalize_std=True)).all()  # equal rewards -> 0
    assert group_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(rewards, 1, normalize_std=True)


def _reference_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    logp = logits.double()[..., :vocab].log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_token_logprobs_tp1_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    vocab = 11
    logits = torch.randn(3, 5, vocab + 1, generator=gen) * 4  # one padding row at the end
    tokens = torch.randint(0, vocab, (3, 5), generator=gen)
    got = token_logprobs(logits, tokens, None, 0, vocab_size=vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference_logprobs(logits, tokens, vocab), rtol=1e-6, atol=1e-6)


def _tp2_logprobs_worker(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, vocab: int):
    import torch.distributed as dist

    rank = dist.get_rank()
    v_local = logits.shape[-1] // 2
    shard = logits[..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_(True)
    lp = token_logprobs(shard, tokens, dist.group.WORLD, rank * v_local, vocab_size=vocab)
    (lp * weights).sum().backward()
    return lp.detach(), shard.grad


def test_token_logprobs_tp2_values_and_grads_match_tp1():
    gen = torch.Generator().manual_seed(2)
    vocab = 13  # padded to 14 over TP=2: the last row of rank 1 is padding
    logits = torch.randn(2, 4, vocab + 1, generator=gen, dtype=torch.float64) * 3
    tokens = torch.randint(0, vocab, (2, 4), generator=gen)
    tokens[0, 0], tokens[0, 1] = 0, vocab - 1  # first id of rank 0, last real id of rank 1
    weights = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    full = logits.clone().requires_grad_(True)
    expected = token_logprobs(full, tokens, None, 0, vocab_size=vocab)
    (expected * weights).sum().backward()
    torch.testing.assert_close(expected, _reference_logprobs(logits, tokens, vocab), rtol=1e-12, atol=1e-12)
    results = run_distributed(_tp2_logprobs_worker, 2, logits, tokens, weights, vocab, timeout=180)
    for lp, _ in results:
        torch.testing.assert_close(lp, expected.detach(), rtol=1e-12, atol=1e-12)
    grad = torch.cat([g for _, g in results], dim=-1)
    torch.testing.assert_close(grad, full.grad, rtol=1e-12, atol=1e-12)
    assert (grad[..., vocab:] == 0).all()


def _frequencies(logits_row: torch.Tensor, params: SamplingParams, n: int, vocab: int) -> torch.Tensor:
    logits = logits_row.expand(n, -1)
    samples = sample_vocab_parallel(logits, params, step=0, vocab_start=0, vocab_size=vocab)
    return torch.bincount(samples, minlength=logits_row.numel()).double() / n


def test_sampler_distribution_top_k_top_p_and_padding():
    """Gumbel-max with hashed noise draws softmax(z / T); filters keep the right support."""
    n, vocab = 40000, 6
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.0, 9.0])  # id 6 is a TP padding row
    sigma = 4.5 / n**0.5  # > 4 standard deviations of any frequency
    probs = (z[:vocab] / 0.7).softmax(-1).double()
    freq = _frequencies(z, SamplingParams(temperature=0.7, seed=1), n, vocab)
    assert freq[vocab] == 0
    torch.testing.assert_close(freq[:vocab], probs, rtol=0, atol=sigma)
    freq = _frequencies(z, SamplingParams(temperature=0.7, top_k=2, seed=2), n, vocab)
    torch.testing.assert_close(freq[:2], probs[:2] / probs[:2].sum(), rtol=0, atol=sigma)
    assert freq[2:].sum() == 0
    # top-p 0.88 at T=0.7: the mass before id 2 is below 0.88 and before id 3 above: ids 0-2 stay.
    assert probs[:2].sum() < 0.88 < probs[:3].sum()
    freq = _frequencies(z, SamplingParams(temperature=0.7, top_p=0.88, seed=3), n, vocab)
    torch.testing.assert_close(freq[:3], probs[:3] / probs[:3].sum(), rtol=0, atol=sigma)
    assert freq[3:].sum() == 0
    greedy = _frequencies(z, SamplingParams(temperature=0.0), 4, vocab)
    assert greedy[0] == 1.0
