"""Generated multi-step arithmetic with worked solutions, and a tiny char-level tokenizer (no downloads).

A problem is ``a o1 b o2 c o3 d`` with operands in [1, MAX_OPERAND] and operators from ``+ - *``;
the worked solution applies the multiplications left to right, then the additions / subtractions
left to right, one step per clause, and ends with ``answer N``::

    prompt:   "what is 3 + 4 * 5 - 2 ?"
    response: "4 * 5 = 20 , 3 + 20 = 23 , 23 - 2 = 21 , answer 21"

Problems whose intermediate or final values are negative are rejected (so every number is a plain
digit string). Train / held-out splits are drawn from one seed and are disjoint by expression.

A row's ``privileged_context`` (what the self-distillation teacher sees) is the worked steps without
the final ``answer N`` clause: the answer has to come from the response's own last step, so a
teacher that reads the hint never states an answer its student's working does not give.
``near_miss_hint`` gives the steps of the same problem with one operand changed, a hint that only
partly applies (the warm start trains on both kinds, so the model copies a hinted step only where
its operands match the response's own).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

MAX_OPERAND = 9
NUM_OPS = 3
OPS = ("+", "-", "*")

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORD_TOKENS = ["answer", "what", "is"]  # whole-word tokens; everything else is one character
CHAR_TOKENS = [" ", *"0123456789", "+", "-", "*", "=", ",", "?"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def solve(operands: list[int], ops: list[str]) -> tuple[list[str], int] | None:
    """The worked steps and the value, or None when some intermediate value is negative."""
    vals, ops_left, steps = list(operands), list(ops), []
    for stage in (("*",), ("+", "-")):
        i = 0
        while i < len(ops_left):
            if ops_left[i] in stage:
                a, op, b = vals[i], ops_left[i], vals[i + 1]
                r = _apply(a, op, b)
                if r < 0:
                    return None
                steps.append(f"{a} {op} {b} = {r}")
                vals[i : i + 2] = [r]
                del ops_left[i]
            else:
                i += 1
    return steps, vals[0]


def make_problem(rng: random.Random, num_ops: int = NUM_OPS) -> dict[str, Any]:
    """One random problem of ``num_ops`` operators as a data row (prompt, response, reference,
    privileged_context = the worked steps without the answer clause, expression)."""
    while True:
        operands = [rng.randint(1, MAX_OPERAND) for _ in range(num_ops + 1)]
        ops = [rng.choice(OPS) for _ in range(num_ops)]
        solved = solve(operands, ops)
        if solved is not None:
            break
    steps, value = solved
    expr = " ".join(x for pair in zip(map(str, operands), [*ops, ""], strict=True) for x in pair).strip()
    solution = " , ".join([*steps, f"answer {value}"])
    return {"prompt": f"what is {expr} ?", "response": solution, "reference": str(value),
            "privileged_context": " , ".join(steps), "expression": expr}


def near_miss_hint(expression: str, rng: random.Random) -> str:
    """The worked steps (no answer clause) of ``expression`` with one operand changed: the steps
    before that operand is used match the real problem's, the later ones do not."""
    tokens = expression.split()
    operands, ops = [int(x) for x in tokens[0::2]], tokens[1::2]
    while True:
        k, value = rng.randrange(len(operands)), rng.randint(1, MAX_OPERAND)
        if value == operands[k]:
            continue
        solved = solve([*operands[:k], value, *operands[k + 1 :]], ops)
        if solved is not None:
            return " , ".join(solved[0])


def make_splits(n_train: int, n_eval: int, seed: int, num_ops: int = NUM_OPS) -> tuple[list[dict], list[dict]]:
    """Disjoint (by expression) train and held-out rows of ``num_ops`` operators, drawn from ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n_train + n_eval:
        attempts += 1
        if attempts > 100 * (n_train + n_eval):  # far fewer distinct problems exist than asked for
            raise ValueError(f"only {len(rows)} distinct {num_ops}-operator problems found, "
                             f"{n_train} + {n_eval} asked for")
        row = make_problem(rng, num_ops)
        if row["expression"] not in seen:
            seen.add(row["expression"])
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def vocab() -> list[str]:
    return [*SPECIAL_TOKENS, *WORD_TOKENS, *CHAR_TOKENS]


def make_tokenizer(path: str | Path) -> Path:
    """Build and ``save_pretrained`` the char-level tokenizer (with chat template) in ``path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(vocab())}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    pattern = "|".join([*WORD_TOKENS, "."])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[4:], clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    path = Path(path)
    tok.save_pretrained(str(path))
    return path
