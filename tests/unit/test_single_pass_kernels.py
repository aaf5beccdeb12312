"""The single-launch element-wise kernels (TP = 1) against float64, under the CPU interpreter.

``single_pass_loss_grad_`` writes each row's divergence (as partials) and dz = grad_scale *
d loss / d z over the student logits. The reference is ``distill_loss_per_token`` evaluated in
float64 on the same (already rounded) logits, differentiated by autograd. The interpreter runs
one program at a time, so the programs of a row never meet there: with one segment per row
nobody waits; with several, the "reread" kernel's first program of each row gives up waiting
and marks the row, and the repair launch redoes it (the path that keeps a launch from hanging
when peers are not resident). The meeting of concurrent programs, and rows that time out at
JSD's second meeting, are checked on the GPU (tests/gpu/test_fused_gpu.py). What this covers:
the formulas of every variant, masked lanes of a segment wider than the row (V = 301 in a
register tile of 512), the loop over rows (4 programs, 9 rows) including the next-row
prefetch, and the give-up and repair path.

Tolerances: fp32 logits 1e-5 (fp32 rounding of exp2 / log2 and sums of 301 terms lands near
1e-7; a wrong term shows at 1e-3 or more); bf16 logits: the loss is computed in fp32 from the
same bf16 logits (1e-5), dz is stored in bf16 (2^-9 relative per element: 8e-3 bounds it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_distill.losses import fused_linear_distill_loss
from megatron_distill.losses.kernels import distill_elementwise as ew
from megatron_distill.losses.reference import distill_loss_per_token

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("variant", ew.SP_VARIANTS)
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_pass_variants_match_float64(variant, kind, beta, dtype):
    g = torch.Generator().manual_seed(11)
    rows, v, tau, grad_scale = 9, 301, 1.3, 0.25
    zs = (torch.randn(rows, v, generator=g) * 3).to(dtype)
    zt = (torch.randn(rows, v, generator=g) * 3).to(dtype)
    s64 = zs.double().requires_grad_()
    ref = distill_loss_per_token(s64, zt.double(), kind, beta=beta, temperature=tau)
    ref.sum().backward()
    out = zs.clone()
    loss = torch.full((1, rows), float("nan"))
    ew.single_pass_loss_grad_(out, zt, loss, kind=kind, beta=beta, temperature=tau, grad_scale=grad_scale,
                              variant=variant)
    assert torch.isfinite(loss).all() and torch.isfinite(out.float()).all()
    assert _rel(loss[0], ref.detach()) <= 1e-5
    assert _rel(out, grad_scale * s64.grad) <= (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("n_parts", [2, 3])
def test_reread_rows_whose_programs_give_up_are_redone(kind, beta, n_parts):
    # 5 slices of 64 over V = 301 in 2 or 3 segments (the last one partial): every row times
    # out at its first meeting, no program writes its dz or loss, and the repair launch does
    # each row whole, writing the loss into partial 0 and zeros (over the NaNs) into the others
    g = torch.Generator().manual_seed(12)
    rows, v, tau, grad_scale = 9, 301, 0.9, 0.5
    zs = torch.randn(rows, v, generator=g) * 3
    zt = torch.randn(rows, v, generator=g) * 3
    s64 = zs.double().requires_grad_()
    ref = distill_loss_per_token(s64, zt.double(), kind, beta=beta, temperature=tau)
    ref.sum().backward()
    out = zs.clone()
    loss = torch.full((n_parts, rows), float("nan"))
    counters = ew.single_pass_loss_grad_(out, zt, loss, kind=kind, beta=beta, temperature=tau,
                                         grad_scale=grad_scale, variant="reread", block_v=64)
    assert (counters[0] < 0).all()  # every row was redone
    assert torch.isfinite(loss).all()
    assert _rel(loss.sum(0), ref.detach()) <= 1e-5
    assert _rel(out, grad_scale * s64.grad) <= 1e-5


def test_pipelined_kernel_needs_one_segment_in_the_interpreter():
    zs, zt = torch.zeros(2, 8), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="pipelined"):
        ew.single_pass_loss_grad_(zs, zt, torch.zeros(2, 2), kind="jsd", beta=0.5, temperature=1.0,
                                  grad_scale=1.0, variant="pipelined")


@pytest.mark.parametrize("variant", ew.SP_VARIANTS)
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.7)])
def test_fused_loss_with_single_pass_variant(variant, kind, beta, monkeypatch):
    # the whole fused path with the single launch switched on, against the multi-pass path
    g = torch.Generator().manual_seed(5)
    h = torch.randn(21, 16, generator=g)
    w = torch.randn(203, 16, generator=g) / 4
    ht = torch.randn(21, 24, generator=g)
    wt = torch.randn(203, 24, generator=g) / 5
    mask = (torch.rand(21, generator=g) > 0.3).float()
    results = []
    for single in (False, True):
        monkeypatch.setitem(ew.KERNEL_CONFIG, "single_pass", single)
        monkeypatch.setitem(ew.KERNEL_CONFIG, "sp_variant", variant)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_distill_loss(hh, ww, ht, wt, kind, beta=beta, temperature=0.8, loss_mask=mask,
                                         chunk_tokens=6, teacher_chunk_tokens=4, impl="triton")
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    assert abs(l1.item() - l0.item()) <= 1e-6 * abs(l0.item())
    assert _rel(gh1, gh0.double()) <= 1e-5 and _rel(gw1, gw0.double()) <= 1e-5


def test_unknown_variant_is_refused():
    zs, zt = torch.zeros(2, 8), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="variant"):
        ew.single_pass_loss_grad_(zs, zt, torch.zeros(1, 2), kind="jsd", beta=0.5, temperature=1.0,
                                  grad_scale=1.0, variant="fastest")


@pytest.mark.parametrize("single", [True, False])
def test_single_pass_switch_routes_every_kind(single, monkeypatch):
    # on (the default) every kind at TP = 1 takes the single launch, off none does
    monkeypatch.setitem(ew.KERNEL_CONFIG, "single_pass", single)
    calls = []
    real = ew.single_pass_loss_grad_
    monkeypatch.setattr(ew, "single_pass_loss_grad_", lambda *a, **k: calls.append(k["kind"]) or real(*a, **k))
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        calls.clear()
        fused_linear_distill_loss(h, w.clone().requires_grad_(), h, w, kind, impl="triton")
        assert calls == ([kind] if single else [])


@pytest.mark.parametrize("value,expected", [("", True), ("1", True), ("0", False)])
def test_single_pass_environment_flag(value, expected, monkeypatch):
    monkeypatch.setenv("MEGATRON_DISTILL_SINGLE_PASS", value)
    assert ew._env_flag("MEGATRON_DISTILL_SINGLE_PASS", default=True) is expected
    monkeypatch.setenv("MEGATRON_DISTILL_SINGLE_PASS", "yes")
    with pytest.raises(ValueError, match="MEGATRON_DISTILL_SINGLE_PASS"):
        ew._env_flag("MEGATRON_DISTILL_SINGLE_PASS", default=True)


def test_cluster_kernel_geometry_and_switch(monkeypatch):
    # The cluster kernel's segments are whole 16-byte vectors covering the row, and both stages
    # of the benchmark vocabularies fit an H100 block's 227 KB of shared memory; it never runs
    # on the CPU (the interpreter takes the Triton kernels), and $MEGATRON_DISTILL_CLUSTER_KERNEL
    # accepts only 0 / 1.
    from megatron_distill.losses.kernels import cluster_single_pass as cluster

    for v in (72, 5008, 128256, 151936):
        seg = cluster.seg_len(v)
        assert seg % 8 == 0 and seg * cluster.CLUSTER >= v and (seg - 8) * cluster.CLUSTER < v
    two_stages = cluster.parse_build("c8t256")
    assert cluster.shared_bytes(151936, two_stages) == 151936 * 2 * 2 / cluster.CLUSTER * 2 <= 227 * 1024
    # the default builds keep one row stage: three blocks of 76 KB fit a multiprocessor's 228 KB
    for group in ("kl", "jsd"):
        build = cluster.parse_build(ew.CLUSTER_BUILDS[group])
        assert 3 * (cluster.shared_bytes(151936, build) + 1024) <= 228 * 1024
    zs = torch.zeros(4, 4096, dtype=torch.bfloat16)
    assert not cluster.usable(zs, zs)
    assert ew.single_pass_split(4096, torch.device("cpu"), kind="jsd", variant="cluster") == 1
    # builds: names round-trip, bad names and settings are refused with the setting named, and
    # the per-kind setting picks each kind's build
    for name in ("c8t512", "c16t256m2or", "c8t256s1m2ou2", "c4t128o", "c8t256s1m2p", "c8t128s1m5opl", "c8t128s1m2h",
                 "c8t128s1m2hq", "c8t256s1m2a", "c8t128s1m2hqa", "c8t256s1m3av", "c8t256s1m2ab", "c8t128s1m2hqavb",
                 "c8t128s1m2abnf", "c8t256n", "c8t128s1m2hqanfe", "c8t256fe"):
        assert cluster.parse_build(name).name == name
    assert cluster.parse_build("c8t128s1m2abnf") == cluster.DEFAULT_BUILD
    assert cluster.shared_bytes(151936, cluster.parse_build("c16t256s1m4")) * 4 <= 227 * 1024
    # a block that reads the student segment from L2 holds only the teacher's: five fit
    in_l2 = cluster.parse_build("c8t128s1m5opl")
    assert in_l2.student_in_l2 and in_l2.prefetch and in_l2.defines()["HOLD_STUDENT"] == 0
    assert cluster.shared_bytes(151936, in_l2) == cluster.seg_len(151936) * 2
    assert 5 * (cluster.shared_bytes(151936, in_l2) + 1024) <= 228 * 1024
    assert cluster.parse_build("c8t128s1m2h").defines()["STORE_R"] == 1
    assert cluster.parse_build("c8t128s1m2hq").defines()["STORE_P"] == 1
    assert cluster.parse_build("c8t256s1m2a").defines()["RELAXED"] == 1
    assert cluster.parse_build("c8t256s1m3av").defines()["PIPE"] == 1
    assert cluster.parse_build("c8t256s1m2ab").defines()["LOAD_BEHIND"] == 1
    nf = cluster.parse_build("c8t128s1m2abnf").defines()
    assert nf["OWN_COPIES"] == 1 and nf["FAST_STATS"] == 1 and nf["LOAD_BEHIND"] == 1 and nf["FMA_LOGP"] == 0
    assert cluster.parse_build("c8t128s1m2hqanfe").defines()["FMA_LOGP"] == 1
    # every build field reaches the source as a macro the source declares
    source = cluster._SOURCE.read_text()
    for macro in cluster.parse_build("c8t256").defines():
        assert f"#ifndef {macro}\n#define {macro} " in source, macro
    assert len(cluster.Build().defines()) == len(dataclasses.fields(cluster.Build))
    # p_S over the student segment needs the log-ratio pass and the segment in shared memory; the
    # next row's copy during the dz pass needs the one row stage it refills
    for bad in ("c32t256", "c8t100", "c8t512s3", "cluster", "c8t128s1m2q", "c8t128s1m2lhq", "c8t256ab", "c8t256s2ab",
                "c8t128s1m2abne"):
        with pytest.raises(ValueError, match="cluster kernel build"):
            cluster.parse_build(bad)
    monkeypatch.setitem(ew.KERNEL_CONFIG, "cluster_build", "kl:c8t256,jsd:c16t256m2or")
    assert ew.cluster_build("reverse_kl") == cluster.Build(threads=256)
    assert ew.cluster_build("jsd", num_warps=4).name == "c16t128m2or"
    monkeypatch.setitem(ew.KERNEL_CONFIG, "cluster_build", "kl=c8t256")
    with pytest.raises(ValueError, match="MEGATRON_DISTILL_CLUSTER_BUILD"):
        ew.cluster_build("jsd")
    monkeypatch.setitem(ew.KERNEL_CONFIG, "sp_variant", "clusters")
    with pytest.raises(ValueError, match="MEGATRON_DISTILL_SP_VARIANT"):
        ew._variant(None, "jsd")
    name = "MEGATRON_DISTILL_CLUSTER_KERNEL"  # read into KERNEL_CONFIG["cluster_kernel"]
    monkeypatch.setenv(name, "0")
    assert ew._env_flag(name, default=True) is False
    monkeypatch.setenv(name, "on")
    with pytest.raises(ValueError, match=name):
        ew._env_flag(name, default=True)
