"""Choose and build this rank's data source from the config.

Every source serves ``get(batch_index) -> list of micro-batch dicts`` for this DP rank (global
batch ``batch_index``, 0-based) and ``state_dict()`` / ``load_state_dict()`` for exact resume:
* ``synthetic``: the built-in Markov source (the quickstart);
* ``chat``: prompt/response or chat rows from local files (``--train-data``), HF tokenizer;
* ``indexed``: Megatron ``.bin/.idx`` blends (``--data-path``), as Megatron-LM reads them.
"""

from __future__ import annotations

from typing import Any

from megatron_distill.config import DistillConfig
from megatron_distill.data.synthetic import MarkovSource, SyntheticBatches


def data_source_kind(cfg: DistillConfig) -> str:
    """``synthetic``, ``chat`` or ``indexed``: ``--data-source``, or with ``auto`` from which data flags are set."""
    if cfg.data.source != "auto":
        return cfg.data.source
    if cfg.data.train_data:
        return "chat"
    if cfg.data.data_path:
        return "indexed"
    return "synthetic"


def privileged_template(cfg: DistillConfig) -> str | None:
    """The teacher's privileged-context template, or None when the teacher sees the student's input."""
    from megatron_distill.data.privileged import DEFAULT_PRIVILEGED_TEMPLATE

    if cfg.data.privileged_template:
        return cfg.data.privileged_template
    return DEFAULT_PRIVILEGED_TEMPLATE if cfg.checkpoint.teacher_mode != "separate" else None


def load_tokenizers(cfg: DistillConfig):
    """The student tokenizer (``--tokenizer-model``), checked against the teacher's when given.

    Returns None when no tokenizer is configured (synthetic data). Raises ValueError naming
    the flag when a tokenizer cannot be loaded, does not fit ``--vocab-size``, or the teacher's
    tokenizer differs (the message lists where).
    """
    from megatron_distill.data.tokenizer import check_tokenizer_fits_model, check_tokenizers_agree, load_tokenizer

    data = cfg.data
    if not data.tokenizer_model:
        return None
    student = load_tokenizer(data.tokenizer_type, data.tokenizer_model, flag="--tokenizer-model")
    check_tokenizer_fits_model(student, cfg.student.vocab_size, flag="--vocab-size")
    if data.teacher_tokenizer_model and data.teacher_tokenizer_model != data.tokenizer_model:
        teacher = load_tokenizer(data.tokenizer_type, data.teacher_tokenizer_model, flag="--teacher-tokenizer-model")
        check_tokenizers_agree(student, teacher)
    return student


def build_data_source(cfg: DistillConfig, dp_rank: int, dp_size: int, tokenizer: Any = None,
                      stream_offset: int = 0):
    """This DP rank's data source for the run (see module docstring)."""
    train, data = cfg.train, cfg.data
    kind = data_source_kind(cfg)
    if kind == "synthetic":
        source = MarkovSource(cfg.student.vocab_size, data.synthetic_branching, data.data_seed)
        return SyntheticBatches(source, train.seq_length, train.global_batch_size, train.micro_batch_size,
                                dp_rank, dp_size, stream_offset=stream_offset)
    if tokenizer is None:
        raise ValueError(f"--{'train-data' if kind == 'chat' else 'data-path'} needs --tokenizer-model")
    if kind == "chat":
        from megatron_distill.data.chat import ChatBatches

        return ChatBatches(
            data.train_data, tokenizer, train.seq_length, train.global_batch_size, train.micro_batch_size,
            dp_rank=dp_rank, dp_size=dp_size, seed=data.data_seed, skip_malformed=data.skip_malformed_rows,
            pack=data.pack_sequences, cache_dir=data.data_cache_path,
            privileged_template=privileged_template(cfg),
        )
    from megatron_distill.data.indexed import IndexedBatches

    eod = tokenizer.eos_token_id
    if eod is None:
        raise ValueError("--data-path needs a tokenizer with an EOS token (used as the document separator)")
    return IndexedBatches(
        data.data_path, train.seq_length, train.global_batch_size, train.micro_batch_size,
        num_samples=max(train.train_iters, 1) * train.global_batch_size, eod_token_id=eod,
        dp_rank=dp_rank, dp_size=dp_size, seed=data.data_seed,
        reset_at_document_boundaries=data.reset_at_document_boundaries, cache_dir=data.data_cache_path,
    )
