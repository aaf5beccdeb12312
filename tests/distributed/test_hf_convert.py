"""HF Llama / Qwen2 / Qwen3 checkpoints -> engine stages at TP1, TP2, PP2 -> HF export, on gloo.

Three tiny randomly initialised HF models (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 101:
not a multiple of 2, so TP2 pads the vocabulary; Llama untied with llama3 RoPE scaling, Qwen2
tied with q/k/v biases, Qwen3 untied with q/k norms and head_dim 32 != 64/4) are saved with
``save_pretrained``. One spawn per layout loads all three into Megatron stages, runs a forward
(PP2: stage 0's hidden states sent to stage 1 by hand), gathers the vocab-parallel logits, and
exports back to HF.

Checked: engine logits equal HF's, every exported tensor is bitwise equal to the original, and
the export loads with ``AutoModelForCausalLM.from_pretrained`` and gives the same logits.

Tolerance: fp32 everywhere. The engine computes the same function as HF with other float32
summation orders (fused QKV / gate-up matmuls, SDPA's math kernel vs eager softmax, torch
RMSNorm vs HF's, TP-split reductions): a few ulps per op, accumulating over 2 layers to
max |diff| / max |logit| ~6e-7 (measured; 0.7 with the llama3 RoPE scaling left out). We allow
1e-5: an order of magnitude of headroom, while a wrong QKV grouping, RoPE convention, norm
epsilon or missing bias gives 1e-2 or more. Export is a pure re-layout: torch.equal.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests._dist_utils import run_distributed

RTOL = 1e-5
VOCAB = 101
TOKENS = torch.tensor([[1, 5, 99, 100, 42, 7, 64, 3, 88, 12, 0, 50], [100, 2, 3, 4, 77, 31, 9, 9, 60, 18, 95, 1]])
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6)
ARCHS = {
    "llama": dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(tie_word_embeddings=False, head_dim=32),
}


def _hf_model(arch: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **COMMON, **ARCHS[arch])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random everything (biases, norms too) so every layout detail matters
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """arch -> (saved HF dir, reference logits [b, s, V])."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, arch in enumerate(ARCHS):
        model = _hf_model(arch, seed)
        path = str(root / arch)
        model.save_pretrained(path)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # stands in for tokenizer files
            json.dump({"model_max_length": 64}, f)
        out[arch] = (path, _logits(model))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- spawned ranks


def _forward(model, shape, pg) -> torch.Tensor | None:
    """Full logits [b, s, V] on the last stage's ranks (TP-gathered, padding dropped), else None."""
    import torch.distributed as dist

    from megatron_distill.engine import stage_flags

    pre, post = stage_flags(pg)
    b, s = TOKENS.shape
    pos = torch.arange(s).expand(b, s)
    with torch.no_grad():
        if not pre:
            hidden = torch.empty(s, b, shape.hidden_size)
            dist.recv(hidden, src=dist.get_global_rank(pg.pp, pg.pp.rank() - 1))
            model.set_input_tensor(hidden)
        out = model(TOKENS, pos, None)
        if not post:
            dist.send(out.contiguous(), dst=dist.get_global_rank(pg.pp, pg.pp.rank() + 1))
            return None
    parts = [torch.empty_like(out) for _ in range(pg.tp.size())]
    dist.all_gather(parts, out.contiguous(), group=pg.tp)
    return torch.cat(parts, dim=-1)[..., :shape.vocab_size]


def _bad_loads(model, shape, hf_dir: str, scratch: str) -> dict[str, str]:
    """Load broken copies of ``hf_dir``; return each error message; the stage must stay untouched."""
    import shutil

    from megatron_distill.models.hf_convert import load_hf_into_stage

    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    cases = {
        "truncated": lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(1000),
        "wrong_shape": lambda d: save_file(
            {**tensors, "model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)},
            os.path.join(d, "model.safetensors"), metadata={"format": "pt"}),
        "missing_tensor": lambda d: save_file(
            {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"},
            os.path.join(d, "model.safetensors"), metadata={"format": "pt"}),
        "bin_only": lambda d: os.replace(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")),
        "shape_mismatch": None,
    }
    errors = {}
    for case, breaker in cases.items():
        d = os.path.join(scratch, case)
        shutil.copytree(hf_dir, d)
        given = shape
        if breaker is None:
            given = type(shape)(**{**shape.__dict__, "norm_epsilon": 1e-5})
        else:
            breaker(d)
        try:
            load_hf_into_stage(model, d, given, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
            errors[case] = "no error"
        except (ValueError, FileNotFoundError) as err:
            errors[case] = f"{type(err).__name__}: {err}"
    errors["untouched"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v))
    return errors


def layout_worker(tp: int, pp: int, hf_dirs: dict[str, str], out_root: str, check_bad_inputs: bool) -> dict:
    """Spawned rank: load each HF model at TP=tp x PP=pp, forward, export; report logits / errors."""
    from megatron_distill.platform import init_distributed

    init_distributed("cpu")
    import torch.distributed as dist

    from megatron_distill.config import DistillConfig, ParallelConfig, TrainConfig
    from megatron_distill.engine import build_model, init_model_parallel
    from megatron_distill.models.hf_config import shape_from_hf_config
    from megatron_distill.models.hf_convert import export_hf, load_hf_into_stage

    result: dict = {"logits": {}, "errors": {}}
    for arch, hf_dir in hf_dirs.items():
        shape = shape_from_hf_config(hf_dir)
        cfg = DistillConfig(student=shape, teacher=shape, parallel=ParallelConfig(tp, pp),
                            train=TrainConfig(seq_length=TOKENS.shape[1], device="cpu"))
        pg = init_model_parallel(cfg, seed=1)
        model = build_model(shape, cfg, pg, trainable=False).eval()
        load_hf_into_stage(model, hf_dir, shape, tp_rank=pg.tp.rank(), tp_size=tp, pp_rank=pg.pp.rank(), pp_size=pp)
        logits = _forward(model, shape, pg)
        if logits is not None and pg.tp.rank() == 0:
            result["logits"][arch] = logits
        out = os.path.join(out_root, arch)
        export_hf(model, shape, out, pg=pg, tokenizer_dir=hf_dir, source_config=hf_dir)
        try:  # a second export into the now non-empty dir must be refused on every rank
            export_hf(model, shape, out, pg=pg)
            result["errors"]["overwrite"] = "no error"
        except ValueError as err:
            result["errors"]["overwrite"] = str(err)
        if arch == "qwen3":  # several shard files + index; then replace that export in place
            sharded = os.path.join(out_root, "qwen3_sharded")
            export_hf(model, shape, sharded, pg=pg, source_config=hf_dir, max_shard_bytes=60_000)
            export_hf(model, shape, sharded, pg=pg, source_config=hf_dir, max_shard_bytes=60_000, overwrite=True)
        if check_bad_inputs and arch == "qwen2":
            result["errors"].update(_bad_loads(model, shape, hf_dir, os.path.join(out_root, "bad")))
        dist.barrier()
    return result


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_load_forward_export(hf_models, tmp_path, tp, pp):
    from transformers import AutoModelForCausalLM

    from megatron_distill.models.hf_convert import HFCheckpoint

    dirs = {arch: path for arch, (path, _) in hf_models.items()}
    results = run_distributed(layout_worker, tp * pp, tp, pp, dirs, str(tmp_path), tp * pp == 1,
                              init_process_group=False, timeout=300)
    logits = {arch: lg for res in results for arch, lg in res["logits"].items()}
    for arch, (path, ref) in hf_models.items():
        assert _rel(logits[arch], ref) < RTOL, arch
        original = load_file(os.path.join(path, "model.safetensors"))
        exported = load_file(os.path.join(tmp_path, arch, "model.safetensors"))
        assert set(exported) == set(original), arch
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), (arch, name)
        assert os.path.isfile(os.path.join(tmp_path, arch, "tokenizer_config.json"))
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, arch), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
        assert torch.equal(_logits(reloaded), ref), arch
    sharded = os.path.join(tmp_path, "qwen3_sharded")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temp dirs left behind"
    ckpt, original = HFCheckpoint(sharded), load_file(os.path.join(hf_models["qwen3"][0], "model.safetensors"))
    assert set(ckpt.weight_map) == set(original)
    assert all(torch.equal(ckpt.get(n), t) for n, t in original.items())
    reloaded = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32, attn_implementation="eager")
    assert torch.equal(_logits(reloaded.eval()), hf_models["qwen3"][1])
    errors = results[0]["errors"]
    assert "not empty" in errors["overwrite"] and "overwrite=True" in errors["overwrite"]
    if tp * pp == 1:
        assert errors["untouched"], "a failed load modified the stage"
        assert "truncated/model.safetensors" in errors["truncated"]
        assert "model.layers.1.mlp.up_proj.weight" in errors["wrong_shape"]
        assert "(95, 64), expected (96, 64)" in errors["wrong_shape"]
        assert "missing tensor 'model.layers.1.self_attn.k_proj.weight'" in errors["missing_tensor"]
        assert "pytorch_model" in errors["bin_only"] and "safetensors" in errors["bin_only"]
        assert "norm_epsilon" in errors["shape_mismatch"] and "config.json" in errors["shape_mismatch"]


def test_state_dict_round_trip(hf_models):
    from megatron_distill.models.hf_config import shape_from_hf_config
    from megatron_distill.models.hf_convert import hf_to_megatron_state_dict, megatron_to_hf_state_dict

    for path, _ in hf_models.values():
        shape = shape_from_hf_config(path)
        original = load_file(os.path.join(path, "model.safetensors"))
        full = hf_to_megatron_state_dict(original, shape)
        assert ("output_layer.weight" in full) == shape.untie_embeddings_and_output_weights
        back = megatron_to_hf_state_dict(full, shape)
        assert set(back) == set(original)
        assert all(torch.equal(back[k], v) for k, v in original.items())


def test_qkv_grouping():
    """Megatron's fused QKV rows: per query group, its q heads, then its k head, then its v head."""
    from megatron_distill.config import ModelShape
    from megatron_distill.models.hf_convert import fuse_qkv, split_qkv

    shape = ModelShape(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=1,
                       vocab_size=4, max_position_embeddings=4)
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    fused = fuse_qkv(q, k, v, shape)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, shape), (q, k, v), strict=True))


def test_bad_checkpoint_dirs(hf_models, tmp_path):
    import shutil

    from megatron_distill.models.hf_config import HFConfigError, shape_from_hf_config
    from megatron_distill.models.hf_convert import HFCheckpoint, HFCheckpointError, hf_to_megatron_state_dict

    path = hf_models["qwen3"][0]
    shape = shape_from_hf_config(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    # sharded checkpoint whose index references a missing file
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(sharded / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {n: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, n in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        HFCheckpoint(sharded)
    # the complete sharded checkpoint reads back every tensor
    save_file({n: tensors[n] for n in names[5:]}, str(sharded / "model-00002-of-00002.safetensors"))
    ckpt = HFCheckpoint(sharded)
    assert all(torch.equal(ckpt.get(n), tensors[n]) for n in names)
    # no config.json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        shape_from_hf_config(empty)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HFCheckpoint(empty)
    # wrong architecture in a real dir: the error names the file
    mixtral = tmp_path / "mixtral"
    shutil.copytree(path, mixtral)
    cfg = json.loads((mixtral / "config.json").read_text())
    (mixtral / "config.json").write_text(json.dumps({**cfg, "architectures": ["MixtralForCausalLM"],
                                                     "model_type": "mixtral", "num_local_experts": 8}))
    with pytest.raises(HFConfigError, match=r"mixtral/config.json.*MixtralForCausalLM"):
        shape_from_hf_config(mixtral)
    # in-memory conversion: wrong shape and missing tensor name the tensor
    bad = {**tensors, "model.norm.weight": torch.ones(63)}
    with pytest.raises(HFCheckpointError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        hf_to_megatron_state_dict(bad, shape)
    with pytest.raises(HFCheckpointError, match="missing tensor 'lm_head.weight'"):
        hf_to_megatron_state_dict({k: v for k, v in tensors.items() if k != "lm_head.weight"}, shape)
