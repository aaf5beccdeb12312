"""The alternative users run today: a Hugging Face distillation step computed as TRL's GKD trainer does.

With lambda = 0 (no generation) TRL's GKDTrainer step is: teacher forward without grad, student
forward, both models' full-vocabulary logits upcast to fp32, TRL's ``generalized_jsd_loss`` (beta
0.5, temperature 1, "batchmean" over tokens), backward, fused AdamW on the student. This script
runs exactly that step with transformers models (random init, bf16, sdpa attention) so it can be
timed beside the engine on the same GPU; ``generalized_jsd_loss`` below is TRL's formula
(trl/trainer/gkd_trainer.py) reproduced without importing trl.

    python benchmarks/hf_gkd_baseline.py --preset qwen2.5-0.5b_from_1.5b --batch 2 --seq-length 1024 \
        --out benchmarks/results/hf_gkd_baseline.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (architecture, student kwargs, teacher kwargs): the shapes of benchmarks/e2e.py's presets.
PRESETS = {
    "qwen2.5-0.5b_from_1.5b": (
        "qwen2",
        dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
        dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    ),
    "llama-1b_from_8b": (
        "llama",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    ),
}


def generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (labels=None, reduction="batchmean")."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / (jsd.size(0) * jsd.size(1))


def build(arch: str, kwargs: dict, seq: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, max_position_embeddings=max(seq, 4096), **kwargs)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):  # initialise on the GPU: an 8B model's CPU init takes minutes
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def time_steps(step, iters: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    arch, s_kw, t_kw = PRESETS[args.preset]
    torch.manual_seed(0)
    student = build(arch, s_kw, args.seq_length)
    teacher = build(arch, t_kw, args.seq_length).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    results = []
    for batch in args.batch:
        ids = torch.randint(s_kw["vocab_size"], (batch, args.seq_length), device="cuda")

        def distill_step(ids=ids):
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits.float()
            student_logits = student(input_ids=ids).logits.float()
            loss = generalized_jsd_loss(student_logits, teacher_logits, beta=args.beta)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def ce_step(ids=ids):
            loss = student(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def teacher_step(ids=ids):
            with torch.no_grad():
                teacher(input_ids=ids).logits.float()

        for name, step in (("distill", distill_step), ("student_ce", ce_step), ("teacher_fwd", teacher_step)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                times = time_steps(step, args.iters, args.warmup)
                median = statistics.median(times)
                row = {"mode": name, "batch": batch, "iteration_seconds": times, "median_seconds": median,
                       "tokens_per_sec": batch * args.seq_length / median,
                       "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
            except torch.OutOfMemoryError:
                row = {"mode": name, "batch": batch, "error": "out of memory"}
                optimizer.zero_grad(set_to_none=True)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "iteration_seconds"}), flush=True)
    record = {
        "benchmark": "hf_gkd_baseline", "preset": args.preset,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": __import__("transformers").__version__},
        "seq_length": args.seq_length, "beta": args.beta, "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
