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
