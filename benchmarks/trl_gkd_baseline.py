"""The alternative users run today, as they run it: TRL's own ``GKDTrainer`` (trl 1.x,
``trl.experimental.gkd``) on the same models and shapes as ``benchmarks/e2e.py``, timed step by step.

``benchmarks/hf_gkd_baseline.py`` reproduces TRL's GKD step by hand; this script runs the real
trainer class: random-init student and teacher built with transformers
(``AutoConfig.for_model`` + ``from_config``, sdpa attention), a synthetic chat dataset whose rows
tokenize to exactly ``--seq-length`` tokens, ``GKDTrainer.train()`` for ``--warmup-steps +
--steps`` optimizer steps, and a ``TrainerCallback`` that times every step and reads the peak
CUDA memory after the warm-up. Tokens/s counts ``batch x seq`` tokens per step per device.

    python benchmarks/trl_gkd_baseline.py --preset qwen2.5-0.5b_from_1.5b --batch-size 2 --seq-length 1024 \\
        --steps 10 --warmup-steps 3 --out benchmarks/results/trl_gkd_baseline_qwen_1024_h100.json

Trainer settings (what a user gets from ``GKDConfig`` plus the few settings a benchmark needs):
AdamW (``adamw_torch_fused`` on CUDA, transformers' default), lr 1e-5, linear schedule without
warm-up, ``max_grad_norm`` 1.0 (the default: gradients are clipped), no evaluation, no saving,
no logging, ``report_to="none"``, bf16 on CUDA. Both models are built in bf16 on CUDA (as in
hf_gkd_baseline.py); ``--fp32-student`` keeps the student in fp32 instead (what TRL does when it
loads the model itself from a path: fp32 weights and AdamW state under bf16 autocast).
``max_length = --seq-length`` (no truncation: the collator's output is checked to be exactly
``batch x seq`` before training) and ``max_new_tokens = seq - prompt`` (at lambda > 0 a generated
sequence is at most ``--seq-length`` tokens). ``--lmbda 0`` (the default) never generates: every
step is offline distillation on the dataset's sequences, the comparison our engine's e2e.py makes.
``--beta 0.5`` is the beta of hf_gkd_baseline.py, TRL's default and our ``--kd-loss jsd`` default.
TRL's default ``gradient_checkpointing=True`` is turned off unless ``--gradient-checkpointing``
(hf_gkd_baseline.py does not checkpoint either).

One step of ``GKDTrainer`` at lambda = 0 (trl 1.16.0, ``trl/experimental/gkd/gkd_trainer.py``):
``DataCollatorForChatML`` applies the chat template to each row and tokenizes it (in the training
loop, on the CPU, included in the step time here); ``training_step`` draws
``random.random() <= lmbda`` (false at 0), so no generation and no ``seq_kd``; ``compute_loss``
runs the student forward, then the teacher forward under ``torch.no_grad()`` in eval mode, both
through accelerate's bf16 autocast wrapper, which returns the full-vocabulary logits converted
to fp32; drops the last position (causal shift); ``generalized_jsd_loss`` (log-softmax of both,
logsumexp mixture, two ``kl_div``s, all ``(batch, seq - 1, vocab)`` fp32 tensors) keeps only
completion positions (labels != -100) and divides by the number of completion tokens; then
``torch.cuda.empty_cache()`` (every step); backward; grad-norm clipping; AdamW step; scheduler.
Differences from our engine's step: the loss covers completion tokens only (prompt positions are
computed, then masked out; the prompt here is ``--prompt-length`` tokens, 8 by default, so
nearly all positions count); the loss is computed on materialised fp32 logits (ours is a fused
vocab-parallel kernel that never materialises them); the loss temperature is always 1 (TRL's
``temperature`` only sets the sampling temperature at lambda > 0); the student's weights,
gradients and AdamW state are bf16 (ours: fp32 master weights and gradients) unless
``--fp32-student``; the caching allocator is emptied every step; each step already syncs the
host (Trainer's NaN/Inf check of the step's loss, ``logging_nan_inf_filter``), so the callback's
per-step ``torch.cuda.synchronize`` adds little. Running out of CUDA memory is recorded as
``"error": "out of memory"`` (exit status 0), as in hf_gkd_baseline.py.

On the GPU machine (Python 3.12; torch, transformers, accelerate, pandas, pyarrow, xxhash,
fsspec, huggingface-hub, requests, tqdm, psutil, pyyaml, jinja2 already there) carry these wheels
in ``.whl/`` (``benchmarks/device_setup.sh`` installs every ``.whl`` there without deps):

    pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl \\
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

(trl 948 kB, datasets 608 kB, dill 120 kB, multiprocess 150 kB: 1.8 MB.) datasets 5.2.0 wants
pyarrow>=24, huggingface-hub>=1.31 and fsspec<=2026.9.0, which ``--no-deps`` does not check; the
H100 image has pyarrow 25.0.1, huggingface-hub 1.33.0, fsspec 2026.7.0, psutil 7.2.2, PyYAML,
Jinja2 (checked 2026-11-23 with torch 2.11.0, transformers 5.17.0, accelerate 1.15.0).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from hf_gkd_baseline import PRESETS as HF_PRESETS  # benchmarks/, the script's directory
from run_record import run_header, write_record

# (architecture, student kwargs, teacher kwargs). "tiny" runs on the CPU in seconds (tests);
# the others are benchmarks/hf_gkd_baseline.py's (= benchmarks/e2e.py's) shapes.
PRESETS = {
    "tiny": (
        "qwen2",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
        dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, vocab_size=512, tie_word_embeddings=True),
    ),
    **HF_PRESETS,
}

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# One turn renders as "<|role|> w1 ... wn </s>": the prompt (user turn + generation prompt) is
# user words + 3 tokens, the whole conversation user + assistant words + 4 tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_tokenizer(vocab_size: int, seq_length: int):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (nothing downloaded) whose ids cover
    ``range(vocab_size)``: the special tokens, then the words ``t0``, ``t1``, ... (one token each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"t{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[4:], model_max_length=seq_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_rows(n: int, vocab_size: int, seq_length: int, prompt_length: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"messages": [user, assistant]}`` of random words that tokenize (with the chat
    template) to ``prompt_length`` prompt tokens and ``seq_length`` tokens in all."""
    if not 4 <= prompt_length <= seq_length - 2:
        raise ValueError(f"--prompt-length must be in [4, seq_length - 2], got {prompt_length}")
    rng = random.Random(seed)
    n_words = vocab_size - len(SPECIAL_TOKENS)
    n_user, n_assistant = prompt_length - 3, seq_length - prompt_length - 1

    def text(k: int) -> str:
        return " ".join(f"t{rng.randrange(n_words)}" for _ in range(k))

    return [{"messages": [{"role": "user", "content": text(n_user)},
                          {"role": "assistant", "content": text(n_assistant)}]} for _ in range(n)]


def build_model(arch: str, kwargs: dict, seq_length: int, device: torch.device, dtype: torch.dtype, tokenizer):
    """A random-init causal LM of ``arch`` with ``kwargs`` (sdpa attention), built on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, max_position_embeddings=max(seq_length, 4096), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    config._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the GPU: an 8B model's CPU init takes minutes
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _make_timer_callback(device: torch.device, warmup_steps: int):
    from transformers import TrainerCallback

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        """Per optimizer step: ``step_seconds`` (previous step's end to this one's: collation, forward,
        backward, optimizer; the first from ``on_train_begin``) and ``compute_seconds`` (from
        ``on_step_begin``, i.e. without fetching and collating the batch). Peak CUDA memory is reset
        after the warm-up steps and read at the end of training."""

        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self.compute_seconds: list[float] = []
            self.peak_allocated: int | None = None
            self.peak_reserved: int | None = None
            self._last = self._begin = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self.compute_seconds.append(now - self._begin)
            if state.global_step == warmup_steps and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._last = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            sync()
            if device.type == "cuda":
                self.peak_allocated = torch.cuda.max_memory_allocated(device)
                self.peak_reserved = torch.cuda.max_memory_reserved(device)

    return StepTimer()


def _instrument(trainer, probe: dict[str, Any]) -> None:
    """Wrap the trainer instance's loss and generation methods (same calls, same results) to record
    what the first loss call saw and how many generations ran (0 at lambda = 0)."""
    loss_fn, generate_fn = trainer.generalized_jsd_loss, trainer.generate_on_policy_outputs

    def generalized_jsd_loss(student_logits, teacher_logits, labels=None, **kwargs):
        if "student_logits_dtype" not in probe:
            probe.update(student_logits_dtype=str(student_logits.dtype), teacher_logits_dtype=str(teacher_logits.dtype),
                         logits_shape=list(student_logits.shape),
                         loss_positions=None if labels is None else int((labels != -100).sum()))
        return loss_fn(student_logits, teacher_logits, labels=labels, **kwargs)

    def generate_on_policy_outputs(model, inputs, generation_config):
        out = generate_fn(model, inputs, generation_config)
        probe["generations"] += 1
        probe["generated_sequence_tokens"] += int(out[1].sum())
        return out

    probe.update(generations=0, generated_sequence_tokens=0)
    trainer.generalized_jsd_loss = generalized_jsd_loss
    trainer.generate_on_policy_outputs = generate_on_policy_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--seq-length", type=int, default=1024, help="tokens per sequence, prompt + completion")
    parser.add_argument("--prompt-length", type=int, default=8,
                        help="prompt tokens per sequence (chat template included)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step per device")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--lmbda", type=float, default=0.0, help="GKD's on-policy fraction (0: offline, no generation)")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (0.5 = hf_gkd_baseline.py's)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature at lmbda > 0 (TRL's loss always uses 1)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 models + bf16 autocast (default: on with CUDA, off on the CPU)")
    parser.add_argument("--fp32-student", action="store_true",
                        help="keep the student (weights, grads, AdamW state) in fp32 under bf16 autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing of the student (TRL's default; off here by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")
    if not 4 <= args.prompt_length <= args.seq_length - 2:
        parser.error("--prompt-length must be in [4, seq_length - 2] (the chat template takes 4 tokens)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and (with ``--out``) write the results record, and return it. Running out
    of CUDA memory is a result (``"error": "out of memory"``), not a failure."""
    args = parse_args(argv)
    from datasets import Dataset
    from transformers import set_seed
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    set_seed(args.seed)

    arch, s_kw, t_kw = PRESETS[args.preset]
    tokenizer = make_tokenizer(s_kw["vocab_size"], args.seq_length)
    half = torch.bfloat16 if args.bf16 else torch.float32
    student = build_model(arch, s_kw, args.seq_length, device, torch.float32 if args.fp32_student else half, tokenizer)
    teacher = build_model(arch, t_kw, args.seq_length, device, half, tokenizer)
    total_steps = args.warmup_steps + args.steps
    rows = make_rows(total_steps * args.batch_size * world_size, s_kw["vocab_size"], args.seq_length,
                     args.prompt_length, seed=args.seed)

    timer = _make_timer_callback(device, args.warmup_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        config = GKDConfig(
            output_dir=output_dir, max_steps=total_steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
            bf16=args.bf16, fp16=False, use_cpu=device.type == "cpu",
            gradient_checkpointing=args.gradient_checkpointing,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            max_length=args.seq_length, max_new_tokens=args.seq_length - args.prompt_length,
            lmbda=args.lmbda, beta=args.beta, temperature=args.temperature, seed=args.seed,
            dataloader_num_workers=0,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), callbacks=[timer])
        # The sequences are exactly --seq-length tokens, --prompt-length of them prompt.
        batch = trainer.data_collator(rows[: args.batch_size])
        expected = (args.batch_size, args.seq_length)
        if tuple(batch["input_ids"].shape) != expected or int(batch["attention_mask"].sum()) != math.prod(expected):
            raise RuntimeError(f"collated batch is {tuple(batch['input_ids'].shape)}, expected {expected} unpadded")
        if tuple(batch["prompts"].shape) != (args.batch_size, args.prompt_length):
            raise RuntimeError(f"collated prompts are {tuple(batch['prompts'].shape)}, expected prompt length "
                               f"{args.prompt_length}")
        probe: dict[str, Any] = {}
        _instrument(trainer, probe)
        try:
            train_output = trainer.train()
        except torch.OutOfMemoryError:
            train_output = None
        settings = {k: getattr(trainer.args, k) for k in (
            "optim", "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "bf16",
            "gradient_checkpointing", "max_length", "max_new_tokens", "lmbda", "beta", "temperature", "seq_kd",
            "disable_dropout", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps")}
        settings = {k: getattr(v, "value", v) for k, v in settings.items()}  # enums -> their strings

    result: dict[str, Any] = {"mode": "trl_gkd", "batch_size": args.batch_size}
    if train_output is None:
        result["error"] = "out of memory"
    else:
        timed = timer.step_seconds[args.warmup_steps:]
        tokens_per_step = args.batch_size * args.seq_length
        median = statistics.median(timed)
        result.update({
            "step_seconds": timer.step_seconds, "timed_step_seconds": timed, "median_step_seconds": median,
            "median_compute_seconds": statistics.median(timer.compute_seconds[args.warmup_steps:]),
            "tokens_per_step_per_device": tokens_per_step, "tokens_per_sec_per_device": tokens_per_step / median,
            "peak_memory_gib": None if timer.peak_allocated is None else timer.peak_allocated / 2**30,
            "peak_memory_reserved_gib": None if timer.peak_reserved is None else timer.peak_reserved / 2**30,
            "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "train_loss": train_output.training_loss, "global_steps": train_output.global_step,
            **probe,
        })
    record = {
        **run_header("trl_gkd_baseline", world_size, transformers=_version("transformers"), trl=_version("trl"),
                     accelerate=_version("accelerate"), datasets=_version("datasets")),
        "preset": args.preset, "seq_length": args.seq_length, "prompt_length": args.prompt_length,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "fp32_student": args.fp32_student,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "trainer_settings": settings, "results": [result],
    }
    summary = {k: v for k, v in result.items() if k not in ("step_seconds", "timed_step_seconds")}
    print(summary, flush=True)
    write_record(args.out, record)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
