#!/usr/bin/env python
"""What the privileged-context self-teacher tells the student, position by position (a diagnosis).

    python benchmarks/quality/pcsd_signal.py --model DIR --data TRAIN.jsonl [--rows 16] [--show 3]

With transformers only (no engine): for each row, sample a response from ``--model`` without the
hint (temperature 1, as pcsd's rollouts), then score it twice with the same model: as the student
(prompt + response) and as the teacher (the hint block "<|user|>HINT</s>" + prompt + response,
benchmarks/quality/run.py's PRIVILEGED_TEMPLATE, HINT = the row's privileged_context). Prints, for
``--show`` rows, the sample, the teacher's and the student's argmax at every response position and
the per-position forward KL, then the mean forward KL per response token (the engine's pcsd kd_loss
at its first iteration measures the same quantity on its own samples) and where the KL mass lies:
before the sample's first token that differs from the reference response, at that token (the
correction the student should learn), after it up to the answer clause, and in the answer clause
after it (where a teacher that copies its hint contradicts the student's own working).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF dir exported by the benchmark (e.g. its warm start)")
    ap.add_argument("--data", required=True, help="the benchmark's train.jsonl (rows with privileged_context)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [json.loads(line) for _, line in zip(range(args.rows), open(args.data), strict=False)]
    torch.manual_seed(args.seed)
    total_kl, total_tokens = 0.0, 0
    parts = {"before the first wrong token": [0.0, 0], "at the first wrong token": [0.0, 0],
             "after it, before the answer clause": [0.0, 0], "answer clause after it": [0.0, 0]}
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        block = tok(f"<|user|>{row['privileged_context']}</s>", add_special_tokens=False, return_tensors="pt")
        block = block["input_ids"]
        with torch.no_grad():
            out = model.generate(p_ids, do_sample=True, temperature=1.0, max_new_tokens=60,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            log_s = torch.log_softmax(model(out).logits[0], -1)
            log_t = torch.log_softmax(model(torch.cat([block, out], dim=1)).logits[0], -1)
        p, b = p_ids.shape[1], block.shape[1]
        response = out[0, p:]
        n = response.numel()
        s_pos, t_pos = log_s[p - 1: p - 1 + n], log_t[b + p - 1: b + p - 1 + n]  # both predict response[k]
        kl = (t_pos.exp() * (t_pos - s_pos)).sum(-1)
        total_kl, total_tokens = total_kl + float(kl.sum()), total_tokens + n
        reference = tok(row["response"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        wrong = next((k for k in range(n) if k >= len(reference) or int(response[k]) != reference[k]), n)
        answer = next((k for k in range(wrong + 1, n) if tok.decode(response[k - 1 : k]).strip() == "answer"), n)
        for name, (lo, hi) in zip(parts, [(0, wrong), (wrong, min(wrong + 1, n)), (wrong + 1, answer), (answer, n)],
                                  strict=True):
            parts[name][0] += float(kl[lo:hi].sum()) if hi > lo else 0.0
            parts[name][1] += max(0, hi - lo)
        if i < args.show:
            print(f"prompt:  {row['prompt']}   reference: {row['response']}")
            print(f"sample:           {tok.decode(response)}")
            print(f"teacher argmax:   {tok.decode(t_pos.argmax(-1))}")
            print(f"student argmax:   {tok.decode(s_pos.argmax(-1))}")
            print(f"forward KL per position: {[round(x, 2) for x in kl.tolist()]}\n")
    print(f"mean forward KL per response token over {len(rows)} samples: {total_kl / total_tokens:.4f}")
    for name, (kl_sum, count) in parts.items():
        print(f"  {name:36s} KL {kl_sum:8.2f} over {count:5d} tokens ({kl_sum / total_kl:6.1%} of the total)")


if __name__ == "__main__":
    main()
