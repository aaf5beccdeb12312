"""End-to-end throughput of the engine: distillation step vs. its parts, at given model shapes.

Run with torchrun, one process per GPU (the layout is --tp x --pp x DP):

    torchrun --nproc-per-node 1 benchmarks/e2e.py --preset realistic --modes distill \
        --out benchmarks/results/e2e_h100.json

For every mode it runs ``--warmup`` + ``--iters`` iterations on random tokens and reports the
median iteration time, tokens/s per GPU, MFU, peak memory per GPU, the memory held between
iterations (weights, gradient buffers, optimizer state) and the split between forward+backward
and the optimizer step. Modes:
  distill      student trained on the distillation loss with the frozen teacher (the product)
  student_ce   the student alone trained with cross-entropy (no teacher)
  teacher_fwd  the teacher's forward pass alone (no grad), output layer included
MFU: see megatron_distill/models/flops.py (student 6N + attention, teacher 2N + attention),
over the GPU's dense bf16 peak (--peak-tflops, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpu_profile  # noqa: E402  (benchmarks/, the script's directory)
import memory_breakdown  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from run_record import run_header, write_record  # noqa: E402

from megatron_distill.config import (  # noqa: E402
    DistillConfig,
    LossConfig,
    ModelShape,
    ParallelConfig,
    TrainConfig,
    validate,
)
from megatron_distill.engine import Engine, build_model, init_model_parallel, wrap_stage  # noqa: E402
from megatron_distill.models.builder import padded_vocab_size  # noqa: E402
from megatron_distill.models.flops import (  # noqa: E402
    forward_flops_per_token,
    matmul_parameters,
    training_flops_per_token,
)
from megatron_distill.pipeline.loss_step import VocabShard  # noqa: E402
from megatron_distill.pipeline.stage import DistillStage  # noqa: E402
from megatron_distill.platform import init_distributed, resolve_device  # noqa: E402
from megatron_distill.training import run_iteration  # noqa: E402


def _llama(layers, hidden, heads, groups, ffn, vocab, tied, max_pos=131072, qkv_bias=False):
    return ModelShape(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=ffn, vocab_size=vocab, max_position_embeddings=max_pos, swiglu=True,
        normalization="RMSNorm", norm_epsilon=1e-6, position_embedding_type="rope", rotary_base=500000,
        untie_embeddings_and_output_weights=not tied, add_bias_linear=False, add_qkv_bias=qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


PRESETS = {
    # student 24 x 2048, teacher 32 x 4096 (Llama-3-8B-shaped), the foundation issue's size
    "realistic": (
        _llama(24, 2048, 16, 8, 5632, 128256, tied=False),
        _llama(32, 4096, 32, 8, 14336, 128256, tied=False),
    ),
    "qwen2.5-0.5b_from_1.5b": (
        _llama(24, 896, 14, 2, 4864, 151936, tied=True, qkv_bias=True),
        _llama(28, 1536, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    ),
    "llama-1b_from_8b": (
        _llama(16, 2048, 32, 8, 8192, 128256, tied=True),
        _llama(32, 4096, 32, 8, 14336, 128256, tied=False),
    ),
    "tiny": (
        _llama(2, 256, 4, 2, 512, 4096, tied=True),
        _llama(4, 512, 8, 4, 1024, 4096, tied=False),
    ),
}


def random_batches(vocab: int, seq: int, micro_batch: int, count: int, seed: int) -> list[dict]:
    """``count`` micro-batches of uniform random tokens (every token counted in the loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        toks = torch.randint(vocab, (micro_batch, seq + 1), generator=gen)
        out.append({
            "tokens": toks[:, :-1].contiguous(), "labels": toks[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(micro_batch, -1).contiguous(),
        })
    return out


def build_engine(mode: str, cfg: DistillConfig, pg, device) -> Engine:
    if mode == "distill":
        student = build_model(cfg.student, cfg, pg, trainable=True, device=device)
        teacher = build_model(cfg.teacher, cfg, pg, trainable=False, device=device)
        output_mode = "hidden" if cfg.loss.impl == "fused" else "logits"
        return wrap_stage(DistillStage(student, teacher, output_mode=output_mode), cfg, pg)
    if mode == "student_ce":
        ce_cfg = replace(cfg, loss=LossConfig(kd_weight=0.0, ce_weight=1.0))
        student = build_model(cfg.student, ce_cfg, pg, trainable=True, device=device)
        return wrap_stage(DistillStage(student, None), ce_cfg, pg)
    if mode == "teacher_fwd":
        ce_cfg = replace(cfg, student=cfg.teacher, loss=LossConfig(kd_weight=0.0, ce_weight=1.0))
        teacher = build_model(cfg.teacher, ce_cfg, pg, trainable=False, device=device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        stage = DistillStage(teacher, None)
        tp = pg.tp.size()
        vocab = cfg.teacher.vocab_size
        shard = VocabShard.for_rank(vocab, padded_vocab_size(vocab, tp), pg.tp.rank(), tp)
        return Engine(ce_cfg, pg, stage, stage, None, None, shard)
    raise ValueError(f"unknown mode {mode!r}")


def run_mode(mode: str, cfg: DistillConfig, pg, device, args, world: int) -> dict:
    torch.cuda.empty_cache() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    engine = build_engine(mode, cfg, pg, device)
    n_micro = cfg.num_microbatches(world)
    forward_only = mode == "teacher_fwd"
    times, fb, opt = [], [], []
    if args.manual_gc:
        gc.disable()
    for it in range(args.warmup + args.iters):
        if args.manual_gc:
            gc.collect()  # between iterations, outside the timed region
        batches = random_batches(cfg.student.vocab_size, cfg.train.seq_length, cfg.train.micro_batch_size,
                                 n_micro, seed=1000 * it + pg.dp.rank())
        stats = run_iteration(engine, batches, it + 1, device, forward_only=forward_only)
        if it >= args.warmup:
            times.append(stats.seconds)
            fb.append(stats.extra["forward_backward_seconds"])
            opt.append(stats.extra["optimizer_seconds"])
        if dist.get_rank() == 0:
            print(f"  [{mode}] iter {it + 1}: {stats.seconds * 1e3:.1f} ms, loss {stats.loss:.4f}", flush=True)
    if args.manual_gc:
        gc.enable()
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    median = statistics.median(times)
    seq = cfg.train.seq_length
    if mode == "distill":
        flops_tok = training_flops_per_token(cfg.student, seq) + forward_flops_per_token(cfg.teacher, seq)
    elif mode == "student_ce":
        flops_tok = training_flops_per_token(cfg.student, seq)
    else:
        flops_tok = forward_flops_per_token(cfg.teacher, seq)
    tok_s_gpu = tokens / median / world
    peak = held = None
    if device.type == "cuda":
        # held: what stays allocated between iterations (weights, gradient buffers, optimizer state);
        # peak - held is what an iteration adds on top (activations, loss buffers, temporaries).
        mem = torch.tensor([torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base],
                           dtype=torch.float64, device=device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        peak, held = (mem / 2**30).tolist()

    def untimed_iteration(k: int):
        """The k-th iteration after the timed ones, as a call: for the tools that slow it down."""
        it = args.warmup + args.iters + k
        batches = random_batches(cfg.student.vocab_size, cfg.train.seq_length, cfg.train.micro_batch_size,
                                 n_micro, seed=1000 * it + pg.dp.rank())
        return functools.partial(run_iteration, engine, batches, it + 1, device, forward_only=forward_only)

    breakdown = profile = None
    if args.memory_breakdown and device.type == "cuda":
        breakdown = memory_breakdown.record(untimed_iteration(0), device.index or 0)
        if dist.get_rank() == 0:
            print(memory_breakdown.format_breakdown(breakdown), flush=True)
    if args.profile and device.type == "cuda":
        profile = gpu_profile.record(untimed_iteration(1))
        if dist.get_rank() == 0:
            print(gpu_profile.format_summary(profile), flush=True)
    if args.trace and device.type == "cuda":
        gpu_profile.export_trace(untimed_iteration(2), os.path.join(args.trace, f"trace_{mode}.json.gz"))
    result = {
        "mode": mode,
        "iteration_seconds": times,
        "median_iteration_seconds": median,
        "forward_backward_seconds_median": statistics.median(fb),
        "optimizer_seconds_median": statistics.median(opt),
        "tokens_per_iteration": tokens,
        "tokens_per_sec_per_gpu": tok_s_gpu,
        "model_flops_per_token": flops_tok,
        "mfu": tok_s_gpu * flops_tok / (args.peak_tflops * 1e12),
        "peak_memory_gib_max_over_ranks": peak,
        "held_memory_gib_max_over_ranks": held,
        "final_loss": stats.loss,
        **({"memory_at_peak_rank0": breakdown} if breakdown is not None else {}),
        **({"gpu_profile_rank0": profile} if profile is not None else {}),
    }
    engine = None  # freed before the next mode builds its own
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--modes", default="distill,student_ce,teacher_fwd")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--kd-loss", default="forward_kl")
    parser.add_argument("--kd-loss-impl", default="reference", choices=["reference", "fused"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--use-precision-aware-optimizer", action="store_true",
                        help="the engine's flag: fp32 master weights as bf16 weight + 16-bit remainder")
    parser.add_argument("--no-bias-swiglu-fusion", action="store_true", help="the engine's flag")
    parser.add_argument("--no-output-layer-grad-accumulation-fusion", action="store_true", help="the engine's flag")
    parser.add_argument("--no-rope-fusion", action="store_true", help="the engine's flag")
    parser.add_argument("--recompute-modules", nargs="+", default=[], choices=["layernorm", "swiglu"],
                        help="the engine's flag (the student's)")
    for name in ("main-grads-dtype", "exp-avg-dtype", "exp-avg-sq-dtype"):
        parser.add_argument(f"--{name}", choices=["fp32", "bf16"], default="fp32", help="the engine's flag")
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="after the timed iterations, one more under the CUDA allocator history: what was "
                             "allocated at its peak, by the line that allocated it (benchmarks/memory_breakdown.py)")
    parser.add_argument("--manual-gc", action="store_true",
                        help="Python's garbage collector off during iterations, run between them instead")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed iterations, one more under torch.profiler: GPU busy / idle time and "
                             "kernel time by kind (benchmarks/gpu_profile.py)")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="after the timed iterations, one more under torch.profiler (CPU and CUDA), written as "
                             "DIR/trace_<mode>.json.gz (Chrome trace; one process only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON results file (rank 0 writes it)")
    args = parser.parse_args()

    student, teacher = PRESETS[args.preset]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.trace and world > 1:
        parser.error("--trace needs a single process (the traced iteration runs on rank 0 only)")
    device_name = resolve_device(args.device)
    cfg = DistillConfig(
        student=replace(student, max_position_embeddings=max(student.max_position_embeddings, args.seq_length)),
        teacher=replace(teacher, max_position_embeddings=max(teacher.max_position_embeddings, args.seq_length)),
        parallel=ParallelConfig(args.tp, args.pp, sequence_parallel=False),
        loss=LossConfig(kind=args.kd_loss, impl=args.kd_loss_impl),
        train=TrainConfig(
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size, train_iters=args.warmup + args.iters, lr=1e-5,
            lr_decay_style="constant", bf16=device_name == "cuda", device=device_name,
            use_distributed_optimizer=args.distributed_optimizer,
            use_precision_aware_optimizer=args.use_precision_aware_optimizer,
            main_grads_dtype=args.main_grads_dtype, exp_avg_dtype=args.exp_avg_dtype,
            exp_avg_sq_dtype=args.exp_avg_sq_dtype, bias_swiglu_fusion=not args.no_bias_swiglu_fusion,
            output_layer_grad_accumulation_fusion=not args.no_output_layer_grad_accumulation_fusion,
            rope_fusion=not args.no_rope_fusion,
            recompute_modules=list(args.recompute_modules),
        ),
    )
    validate(cfg, world)
    ctx = init_distributed(device_name)
    pg = init_model_parallel(cfg, 1234)
    results = []
    for mode in args.modes.split(","):
        if dist.get_rank() == 0:
            print(f"mode {mode} ...", flush=True)
        try:
            results.append(run_mode(mode, cfg, pg, ctx.device, args, world))
        except torch.OutOfMemoryError as err:
            results.append({"mode": mode, "error": f"out of memory: {str(err)[:200]}"})
            gc.collect()
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        record = {
            **run_header("e2e", world),
            "preset": args.preset,
            "student": asdict(cfg.student),
            "teacher": asdict(cfg.teacher),
            "student_matmul_params": matmul_parameters(cfg.student),
            "teacher_matmul_params": matmul_parameters(cfg.teacher),
            "layout": {"tp": args.tp, "pp": args.pp, "dp": cfg.data_parallel_size(world)},
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
            "global_batch_size": args.global_batch_size, "kd_loss": args.kd_loss,
            "kd_loss_impl": args.kd_loss_impl, "peak_tflops": args.peak_tflops,
            "optimizer": {"use_precision_aware_optimizer": args.use_precision_aware_optimizer,
                          "main_grads_dtype": args.main_grads_dtype, "exp_avg_dtype": args.exp_avg_dtype,
                          "exp_avg_sq_dtype": args.exp_avg_sq_dtype,
                          "distributed_optimizer": args.distributed_optimizer},
            "bias_swiglu_fusion": cfg.train.bias_swiglu_fusion and ctx.device.type == "cuda",
            "recompute_modules": list(args.recompute_modules),
            "output_layer_grad_accumulation_fusion": cfg.train.output_layer_grad_accumulation_fusion,
            "rope_fusion": cfg.train.rope_fusion and ctx.device.type == "cuda",
            "results": results,
        }
        print("| mode | ms/iter | tokens/s/GPU | MFU | peak GiB | held GiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results:
            if "error" in r:
                print(f"| {r['mode']} | {r['error'][:60]} | | | | |")
            else:
                peak, held = r["peak_memory_gib_max_over_ranks"], r["held_memory_gib_max_over_ranks"]
                print(f"| {r['mode']} | {r['median_iteration_seconds'] * 1e3:.1f} | "
                      f"{r['tokens_per_sec_per_gpu']:,.0f} | {r['mfu'] * 100:.1f}% | "
                      f"{'-' if peak is None else f'{peak:.1f}'} | {'-' if held is None else f'{held:.1f}'} |")
        write_record(args.out, record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
