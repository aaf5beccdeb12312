"""--recompute-modules layernorm / swiglu: the same training, less kept for backward.

Real Megatron-Core on gloo (fp32, CPU). Reference: the same run without recompute, at TP2 and at
PP2. Recomputing an element-wise function from the same inputs gives the same values: with swiglu
the losses, grad norms and final weights are bitwise equal. Megatron's norm recompute runs a nested
backward for the norm and hands the residual stream's gradient back, so that gradient and the norm
weight's are summed in another order: fp32 rounding (observed: losses 3e-8 relative, grad norms
9e-8, weights 5e-7 norm-wise after 3 Adam steps; a wrong recompute, e.g. of another input, moves
them by orders of magnitude more). The memory the forward keeps for
backward is counted directly: the storages of every tensor autograd saved, measured after the
forward pass (a discarded output has storage size 0). The saving must be exactly the tensors the
recompute drops: per layer, for swiglu the MLP activation's; for
layernorm, for each of the two norms. Each is what the function keeps besides its input (which
stays: it is the recompute's input), plus its output (kept by the next linear), measured on the
standalone torch function at the same shape: on the CPU, RMSNorm's composite kernel also keeps
the normalised input and 1/rms, and Megatron's unfused SwiGLU (fc1's bias added first) keeps the
biased input, silu's output and the linear half beside the product; the recompute keeps fc1's
output instead. Parameters are not counted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_distill.config import DistillConfig
from tests._dist_utils import run_distributed
from tests.distributed.engine_cases import STUDENT, make_config, run_keeping_engine

ITERS = 3
MODES = {"none": [], "layernorm": ["layernorm"], "swiglu": ["swiglu"], "both": ["layernorm", "swiglu"]}


def _config(tp: int, pp: int, modules: list[str], sequence_parallel: bool = False) -> DistillConfig:
    cfg = make_config(tp, pp, train_iters=ITERS, sequence_parallel=sequence_parallel)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute_modules=modules))


def _run(cfg: DistillConfig) -> dict:
    history, engine = run_keeping_engine(cfg)
    weights = torch.cat([p.detach().flatten() for p in engine.stage.student.parameters()])
    return {"losses": [s.loss for s in history], "grad_norms": [s.grad_norm for s in history],
            "weights": weights}


def _kept_bytes(modules: list[str], tokens_shape: tuple[int, int]) -> int:
    """Bytes of the distinct storages autograd keeps after one student forward (TP1, one process)."""
    import torch

    from megatron_distill.engine import build_model, init_model_parallel

    cfg = _config(1, 1, modules)
    pg = init_model_parallel(cfg, 11)
    student = build_model(STUDENT, cfg, pg, trainable=True)
    b, s = tokens_shape
    tokens = torch.randint(0, STUDENT.vocab_size, (b, s))
    position_ids = torch.arange(s).expand(b, s)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(tokens, position_ids, None)
    storages = {}
    for t in saved:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.size()
    for param in student.parameters():  # kept anyway: not activation memory
        storages.pop(param.untyped_storage().data_ptr(), None)
    del out
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return sum(storages.values())


def _bytes_besides_input(fn, x, params=()) -> int:
    """What ``fn(x)`` keeps for backward, plus its output, minus ``x``'s and ``params``' storages."""
    import torch

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().size() for t in [*saved, y]}
    for t in (x, *params):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def _standalone_bytes(tokens_shape: tuple[int, int]) -> dict:
    """The norm and the (unfused, CPU) SwiGLU activation on their own, at the model's shapes."""
    import torch

    b, s = tokens_shape
    norm = torch.nn.RMSNorm(STUDENT.hidden_size, eps=STUDENT.norm_epsilon)
    x = torch.randn(s, b, STUDENT.hidden_size, requires_grad=True)
    fc1_out = torch.randn(s, b, 2 * STUDENT.ffn_hidden_size, requires_grad=True)
    fc1_bias = torch.randn(2 * STUDENT.ffn_hidden_size, requires_grad=True)

    def swiglu(t):  # Megatron's unfused MLP activation with fc1's bias (megatron/core/transformer/mlp.py)
        gate, linear = torch.chunk(t + fc1_bias, 2, dim=-1)
        return torch.nn.functional.silu(gate) * (linear + 0.0)

    return {"norm": _bytes_besides_input(norm, x, list(norm.parameters())),
            "swiglu": _bytes_besides_input(swiglu, fc1_out, [fc1_bias])}


def worker() -> dict:
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    out = {}
    for layout, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        for name, modules in MODES.items():
            out[f"{layout}_{name}"] = _run(_config(tp, pp, modules))
    # Sequence parallelism: linear_fc2 reduce-scatters, the recompute hook sits on its output.
    for name in ("none", "both"):
        out[f"tp2sp_{name}"] = _run(_config(2, 1, MODES[name], sequence_parallel=True))
    return out


def kept_bytes_worker() -> dict:
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    kept = {name: _kept_bytes(modules, (2, 16)) for name, modules in MODES.items()}
    return {"kept": kept, "standalone": _standalone_bytes((2, 16))}


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_distributed(worker, 2, init_process_group=False, timeout=600)[0]


@pytest.mark.parametrize(("layout", "name"), [(layout, name) for layout in ("tp2", "pp2")
                                               for name in ("layernorm", "swiglu", "both")] + [("tp2sp", "both")])
def test_recompute_trains_like_keeping(runs, layout, name):
    ours, reference = runs[f"{layout}_{name}"], runs[f"{layout}_none"]
    assert len(ours["losses"]) == ITERS
    if name == "swiglu":
        assert ours["losses"] == reference["losses"]
        assert ours["grad_norms"] == reference["grad_norms"]
        assert bool((ours["weights"] == reference["weights"]).all())
        return
    torch.testing.assert_close(ours["losses"], reference["losses"], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours["grad_norms"], reference["grad_norms"], rtol=1e-6, atol=0)
    moved = (ours["weights"] - reference["weights"]).norm() / reference["weights"].norm()
    assert moved < 1e-5, moved


def test_recompute_keeps_exactly_the_dropped_tensors_less():
    result = run_distributed(kept_bytes_worker, 1, init_process_group=False, timeout=300)[0]
    kept, alone = result["kept"], result["standalone"]
    tokens, layers, fp32 = 2 * 16, STUDENT.num_layers, 4
    # At least the outputs themselves: [tokens, hidden] per norm, [tokens, ffn] per activation.
    assert alone["norm"] >= tokens * STUDENT.hidden_size * fp32
    assert alone["swiglu"] >= tokens * STUDENT.ffn_hidden_size * fp32
    # The recompute keeps fc1's output instead (its input), which the unfused path let go after
    # adding the bias.
    norms = layers * 2 * alone["norm"]
    activation = layers * (alone["swiglu"] - tokens * 2 * STUDENT.ffn_hidden_size * fp32)
    assert kept["none"] - kept["layernorm"] == norms
    assert kept["none"] - kept["swiglu"] == activation
    assert kept["none"] - kept["both"] == norms + activation
