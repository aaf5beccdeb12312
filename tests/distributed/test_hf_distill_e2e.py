"""Distill one Hugging Face model into another, end to end, through the entry point.

A tiny HF Qwen2 teacher (tied embeddings, q/k/v biases) and a tiny HF Llama student (untied,
grouped-query attention) sharing a local tokenizer, chat rows in a .jsonl file; TP=2 on 2 CPU
processes: ``--load STUDENT_HF --teacher-load TEACHER_HF --train-data FILE --export-hf OUT``.
The export must load with transformers, hold trained (changed) weights of the same shapes, and
carry the tokenizer files. An architecture flag that contradicts the HF config and a teacher
tokenizer that differs are refused with exit code 2 and a message naming the problem.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.test_launcher import _torchrun
from tests.unit.data_fixtures import make_tiny_tokenizer, sample_rows, write_rows


def _save_hf(arch: str, path, vocab: int, tok_dir, **overrides) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(arch, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-6,
                                  **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf_e2e")
    tok_dir = make_tiny_tokenizer(root / "tok")
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    teacher = root / "teacher"
    student = root / "student"
    _save_hf("qwen2", teacher, vocab, tok_dir, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=True)
    initial = _save_hf("llama", student, vocab, tok_dir, hidden_size=32, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64, tie_word_embeddings=False)
    data = write_rows(root / "train.jsonl", sample_rows(16))
    return root, teacher, student, data, initial


def test_hf_student_from_hf_teacher_trains_and_exports(setup):
    from transformers import AutoModelForCausalLM

    root, teacher, student, data, initial = setup
    out, metrics = root / "exported", root / "metrics.jsonl"
    proc = _torchrun(
        2, "--load", str(student), "--teacher-load", str(teacher), "--train-data", str(data),
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "1e-2", "--lr-decay-style", "constant", "--tensor-model-parallel-size", "2", "--device", "cpu",
        "--kd-loss", "forward_kl", "--export-hf", str(out), "--metrics-file", str(metrics),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "student: loaded Hugging Face weights" in proc.stdout and "data: chat" in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["kd_loss"] > 0 and r["num_tokens"] > 0 for r in records)
    assert records[-1]["kd_loss"] < records[0]["kd_loss"]
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert set(exported) == set(initial)
    assert all(exported[k].shape == initial[k].shape for k in initial)
    changed = [k for k in initial if not torch.equal(exported[k], initial[k])]
    assert "lm_head.weight" in changed and len(changed) > len(initial) // 2
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_flag_contradicting_hf_config_is_refused(setup):
    root, teacher, student, data, _ = setup
    proc = _torchrun(
        1, "--load", str(student), "--teacher-load", str(teacher), "--train-data", str(data),
        "--seq-length", "32", "--hidden-size", "48", "--device", "cpu", timeout=120,
    )
    assert proc.returncode != 0  # the rank exits 2; torchrun reports a failed child as 1
    assert "--hidden-size 48 disagrees with" in proc.stderr and "which gives 32" in proc.stderr


def test_teacher_tokenizer_mismatch_is_refused(setup):
    root, teacher, student, data, _ = setup
    other = make_tiny_tokenizer(root / "other_tok", extra_words=["zebra"])
    proc = _torchrun(
        1, "--load", str(student), "--teacher-load", str(teacher), "--train-data", str(data),
        "--seq-length", "32", "--teacher-tokenizer-model", str(other), "--device", "cpu", timeout=120,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "vocab" in proc.stderr.lower()


def test_indexed_data_and_packed_chat_data_run_through_the_engine(setup):
    """--data-path (preprocessed .bin/.idx, two prefixes blended) and --pack-sequences at PP=2."""
    import subprocess
    import sys

    root, teacher, student, data, _ = setup
    words = "the cat sat on the mat and the dog ran under the tree".split()
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(12)))
    for prefix in ("p1", "p2"):
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_distill.data.preprocess", "--input", str(docs), "--tokenizer-model",
             str(student), "--output-prefix", str(root / prefix), "--append-eod"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    common = ["--load", str(student), "--teacher-load", str(teacher), "--seq-length", "16",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--device", "cpu",
              "--pipeline-model-parallel-size", "2", "--data-cache-path", str(root / "cache")]
    indexed = _torchrun(2, *common, "--data-path", "0.3", str(root / "p1"), "0.7", str(root / "p2"))
    assert indexed.returncode == 0, indexed.stdout[-2000:] + indexed.stderr[-3000:]
    assert "data: indexed" in indexed.stdout and "[distill] iter     3/3" in indexed.stdout
    packed = _torchrun(2, *common, "--train-data", str(data), "--pack-sequences")
    assert packed.returncode == 0, packed.stdout[-2000:] + packed.stderr[-3000:]
    assert "data: chat" in packed.stdout and "[distill] iter     3/3" in packed.stdout
