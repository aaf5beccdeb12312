"""The generated arithmetic task of benchmarks/quality/ (answers, splits, tokenizer, reward format)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_distill.rollout.rl import exact_match_reward
from tests._modules import load_file_module

_TASK = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "task.py"


@pytest.fixture(scope="module")
def task():
    return load_file_module("quality_task", _TASK)


@pytest.fixture(scope="module")
def splits(task):
    return task.make_splits(400, 100, seed=7)


def test_answers_are_correct(splits):
    for row in [*splits[0], *splits[1]]:
        expected = eval(row["expression"], {"__builtins__": {}})  # noqa: S307 - digits and + - * only
        assert re.fullmatch(r"[0-9 +*-]+", row["expression"])
        assert row["reference"] == str(expected)
        assert row["response"].endswith(f"answer {expected}")
        assert row["privileged_context"] + f" , answer {expected}" == row["response"]
        for step in row["response"].split(" , ")[:-1]:  # every worked step is true
            lhs, rhs = step.split(" = ")
            assert eval(lhs, {"__builtins__": {}}) == int(rhs)  # noqa: S307


def test_splits_disjoint_and_seeded(task, splits):
    train, held_out = splits
    assert len(train) == 400 and len(held_out) == 100
    assert not {r["expression"] for r in train} & {r["expression"] for r in held_out}
    assert len({r["expression"] for r in train}) == len(train)
    again = task.make_splits(400, 100, seed=7)
    assert again == splits
    assert task.make_splits(400, 100, seed=8) != splits


def test_tokenizer_round_trips_every_row(task, splits, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(task.make_tokenizer(tmp_path / "tok")))
    assert len(tok) == len(task.vocab())
    for row in [*splits[0], *splits[1]]:
        for text in (row["prompt"], row["response"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        chat = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}],
            tokenize=False,
        )
        assert chat == f"<|user|>{row['prompt']}</s><|assistant|>{row['response']}</s>"
        assert tok.decode(tok(chat, add_special_tokens=False)["input_ids"]) == chat


def test_exact_match_recognises_answer_format(splits):
    for row in splits[1][:20]:
        assert exact_match_reward(row["prompt"], row["response"], row["reference"]) == 1.0
        wrong = row["response"].rsplit(" ", 1)[0] + f" {int(row['reference']) + 1}"
        assert exact_match_reward(row["prompt"], wrong, row["reference"]) == 0.0
        assert exact_match_reward(row["prompt"], "", row["reference"]) == 0.0


def test_two_operator_problems_and_an_impossible_split(task):
    train, held_out = task.make_splits(200, 50, seed=1, num_ops=2)
    assert all(r["expression"].count(" ") == 4 for r in [*train, *held_out])  # a o b o c
    with pytest.raises(ValueError, match="distinct 2-operator problems"):
        task.make_splits(6000, 0, seed=1, num_ops=2)  # fewer than 4,900 exist


def test_near_miss_hint_changes_exactly_one_operand(task, splits):
    import random

    rng = random.Random(3)
    for row in splits[0][:50]:
        hint = task.near_miss_hint(row["expression"], rng)
        assert hint != row["privileged_context"] and " answer " not in f" {hint} "
        for step in hint.split(" , "):  # a true worked solution of some problem
            lhs, rhs = step.split(" = ")
            assert eval(lhs, {"__builtins__": {}}) == int(rhs) >= 0  # noqa: S307
        n_steps = len(row["privileged_context"].split(" , "))
        assert len(hint.split(" , ")) == n_steps  # same operators, so the same number of steps
