"""SDPACoreAttention equals Megatron-Core's own unfused DotProductAttention.

Megatron's ``DotProductAttention`` (explicit scores, causal mask, softmax, probs @ V) is the
independent reference: same inputs, including grouped-query attention and an explicit mask.
Runs in a spawned process with the CPU runtime (Megatron needs its parallel state).
Float32 on both sides; the kernels differ only in summation order: tolerance 1e-5.
"""

from __future__ import annotations

import torch

from tests._dist_utils import run_distributed


def _compare_worker() -> list[float]:
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_distill.config import DistillConfig, ModelShape
    from megatron_distill.models.builder import transformer_config
    from megatron_distill.models.sdpa_attention import SDPACoreAttention
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    errors = []
    for heads, groups in ((4, 4), (8, 2)):
        shape = ModelShape(num_layers=1, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                           vocab_size=16, max_position_embeddings=32, hidden_dropout=0.0,
                           attention_dropout=0.0)
        cfg = transformer_config(shape, DistillConfig(shape, shape).parallel, bf16=False, for_training=False)
        ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        ours = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self")
        gen = torch.Generator().manual_seed(heads)
        s, b, hd = 12, 3, 64 // heads
        q = torch.randn(s, b, heads, hd, generator=gen)
        k = torch.randn(s, b, groups, hd, generator=gen)
        v = torch.randn(s, b, groups, hd, generator=gen)
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
        expected = ref(q, k, v, causal)
        for mask in (None, causal):
            got = ours(q, k, v, mask)
            errors.append(((got - expected).norm() / expected.norm()).item())
        # Causality: changing the last token must not change earlier outputs.
        k2, v2 = k.clone(), v.clone()
        k2[-1] += 1.0
        v2[-1] += 1.0
        changed = ours(q, k2, v2, None)
        errors.append((changed[:-1] - ours(q, k, v, None)[:-1]).abs().max().item())
    return errors


def test_sdpa_matches_megatron_dot_product_attention():
    errors = run_distributed(_compare_worker, 1, init_process_group=False, timeout=120)[0]
    assert max(errors) < 1e-5, errors


def _value_view_worker() -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_distill.config import DistillConfig, ModelShape
    from megatron_distill.models.builder import transformer_config
    from megatron_distill.models.sdpa_attention import SDPACoreAttention
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    parallel_state.initialize_model_parallel(1, 1)
    heads, groups, hd, s, b = 8, 2, 8, 12, 3
    shape = ModelShape(num_layers=1, hidden_size=heads * hd, num_attention_heads=heads, num_query_groups=groups,
                       vocab_size=16, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = transformer_config(shape, DistillConfig(shape, shape).parallel, bf16=False, for_training=True)
    attention = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    # As Megatron builds them: one linear_qkv output, value a view into it; query and key new
    # tensors (RoPE's outputs).
    qkv = torch.randn(s, b, (heads + 2 * groups) * hd, generator=gen).requires_grad_()
    value = qkv.view(s, b, heads + 2 * groups, hd)[:, :, heads + groups:]
    query = torch.randn(s, b, heads, hd, generator=gen).requires_grad_()
    key = torch.randn(s, b, groups, hd, generator=gen).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attention(query, key, value, None)
    kept_qkv = any(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in saved)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (query, key, qkv), grad_out)
    # Reference: the same attention on a value that is not a view (nothing to copy).
    v_alone = value.detach().clone().requires_grad_()
    ref = attention(query, key, v_alone, None)
    ref_grads = torch.autograd.grad(ref, (query, key, v_alone), grad_out)
    value_grad = grads[2].view(s, b, heads + 2 * groups, hd)[:, :, heads + groups:]
    return {"kept_qkv": kept_qkv, "out_equal": bool(torch.equal(out, ref)),
            "grads_equal": all(bool(torch.equal(a, b)) for a, b in
                               zip((grads[0], grads[1], value_grad), ref_grads, strict=True))}


def test_a_value_view_does_not_keep_the_whole_qkv_buffer():
    result = run_distributed(_value_view_worker, 1, init_process_group=False, timeout=120)[0]
    assert not result["kept_qkv"]
    assert result["out_equal"] and result["grads_equal"]
