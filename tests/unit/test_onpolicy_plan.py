"""onpolicy.py without a process group: which samples are generated, stop tokens, seeds."""

from __future__ import annotations

import pytest

from megatron_distill.onpolicy import end_of_turn_token_id, on_policy_groups, rollout_seed, stop_token_ids
from tests.unit.data_fixtures import make_tiny_tokenizer


@pytest.mark.parametrize("groups", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.6, 1.0])
def test_on_policy_groups_count_and_spread(groups, fraction):
    chosen = on_policy_groups(groups, fraction)
    assert len(chosen) == groups
    assert sum(chosen) == int(fraction * groups + 0.5)  # round, halves up
    # Spread evenly: every prefix holds its share, to within one group.
    for k in range(1, groups + 1):
        assert abs(sum(chosen[:k]) - fraction * k) <= 1.0


def test_on_policy_groups_examples():
    assert on_policy_groups(4, 0.5) == [True, False, True, False]
    assert on_policy_groups(4, 0.0) == [False] * 4
    assert on_policy_groups(4, 1.0) == [True] * 4
    assert on_policy_groups(8, 0.25) == [False, True, False, False, False, True, False, False]


def test_stop_tokens_eos_and_end_of_turn(tmp_path):
    from transformers import AutoTokenizer

    # The fixture's template closes each turn with </s>, the EOS: one stop id.
    tok = AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "a")))
    assert stop_token_ids(tok) == (tok.eos_token_id,)
    # A template whose turns end with another special token (like <|eot_id|> / <|im_end|>).
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|system|> {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok = AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "b", chat_template=template)))
    eot = tok.convert_tokens_to_ids("<|system|>")
    assert end_of_turn_token_id(tok) == eot
    assert stop_token_ids(tok) == (tok.eos_token_id, eot)
    # No template: EOS only.
    tok = AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "c", chat_template=None)))
    assert end_of_turn_token_id(tok) is None and stop_token_ids(tok) == (tok.eos_token_id,)


def test_rollout_seeds_differ_per_iteration_rank_and_generator():
    seeds = {rollout_seed(1234, it, dp, teacher) for it in range(50) for dp in range(8) for teacher in (False, True)}
    assert len(seeds) == 50 * 8 * 2 and all(0 <= s < 2**62 for s in seeds)
