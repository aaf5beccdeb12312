"""arguments.py: flags + YAML recipe -> DistillConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_distill.arguments import (
    REQUIRED_FLAGS,
    build_parser,
    config_to_dict,
    format_flag_reference,
    load_recipe,
    parse_config,
)
from megatron_distill.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelShape,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

BASE = [
    "--num-layers", "2",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--vocab-size", "256",
    "--seq-length", "32",
]  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def parse_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        parse_config(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- defaults


def test_minimal_command_line_gives_dataclass_defaults():
    cfg = parse_config(BASE)
    s = cfg.student
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.vocab_size) == (2, 64, 4, 256)
    assert s.max_position_embeddings == 32  # defaults to --seq-length
    assert s.ffn_hidden_size == 256 and s.num_query_groups == 4 and s.kv_channels is None
    ref = ModelShape(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=32
    )
    assert s == ref
    assert cfg.teacher == ref
    assert cfg.parallel == ParallelConfig()
    assert cfg.loss == LossConfig()
    assert cfg.train == TrainConfig(seq_length=32)
    assert cfg.data == DataConfig()
    assert cfg.rollout == RolloutConfig()


# --------------------------------------------------------------------------- every flag


def every_flag_argv() -> tuple[list[str], list[tuple[str, str, object]]]:
    """A command line setting every flag to a non-default value, and the expected fields."""
    student = [
        ("--num-layers", "6", "num_layers", 6),
        ("--hidden-size", "96", "hidden_size", 96),
        ("--ffn-hidden-size", "200", "ffn_hidden_size", 200),
        ("--num-attention-heads", "6", "num_attention_heads", 6),
        ("--num-query-groups", "2", "num_query_groups", 2),
        ("--kv-channels", "24", "kv_channels", 24),
        ("--max-position-embeddings", "512", "max_position_embeddings", 512),
        ("--normalization", "RMSNorm", "normalization", "RMSNorm"),
        ("--norm-epsilon", "1e-6", "norm_epsilon", 1e-6),
        ("--swiglu", None, "swiglu", True),
        ("--position-embedding-type", "rope", "position_embedding_type", "rope"),
        ("--rotary-base", "500000", "rotary_base", 500000),
        ("--untie-embeddings-and-output-weights", None, "untie_embeddings_and_output_weights", True),
        ("--disable-bias-linear", None, "add_bias_linear", False),
        ("--add-qkv-bias", None, "add_qkv_bias", True),
        ("--qk-layernorm", None, "qk_layernorm", True),
        ("--vocab-size", "1000", "vocab_size", 1000),
        ("--init-method-std", "0.01", "init_method_std", 0.01),
        ("--hidden-dropout", "0.2", "hidden_dropout", 0.2),
        ("--attention-dropout", "0.3", "attention_dropout", 0.3),
    ]
    teacher = [
        ("--teacher-num-layers", "12", "num_layers", 12),
        ("--teacher-hidden-size", "192", "hidden_size", 192),
        ("--teacher-ffn-hidden-size", "700", "ffn_hidden_size", 700),
        ("--teacher-num-attention-heads", "12", "num_attention_heads", 12),
        ("--teacher-group-query-attention", None, "num_query_groups", 3),
        ("--teacher-num-query-groups", "3", "num_query_groups", 3),
        ("--teacher-kv-channels", "16", "kv_channels", 16),
        ("--teacher-max-position-embeddings", "1024", "max_position_embeddings", 1024),
        ("--teacher-normalization", "LayerNorm", "normalization", "LayerNorm"),
        ("--teacher-norm-epsilon", "1e-4", "norm_epsilon", 1e-4),
        ("--teacher-no-swiglu", None, "swiglu", False),
        ("--teacher-position-embedding-type", "none", "position_embedding_type", "none"),
        ("--teacher-rotary-base", "1000", "rotary_base", 1000),
        (
            "--teacher-no-untie-embeddings-and-output-weights",
            None,
            "untie_embeddings_and_output_weights",
            False,
        ),
        ("--teacher-no-disable-bias-linear", None, "add_bias_linear", True),
        ("--teacher-no-add-qkv-bias", None, "add_qkv_bias", False),
        ("--teacher-no-qk-layernorm", None, "qk_layernorm", False),
        ("--teacher-vocab-size", "1001", "vocab_size", 1001),
        ("--teacher-init-method-std", "0.03", "init_method_std", 0.03),
        ("--teacher-hidden-dropout", "0.05", "hidden_dropout", 0.05),
        ("--teacher-attention-dropout", "0.06", "attention_dropout", 0.06),
    ]
    rest = [
        ("--save", "/ckpt/out", "checkpoint", "save", "/ckpt/out"),
        ("--auto-resume", None, "checkpoint", "auto_resume", True),
        ("--max-skipped-steps", "3", "train", "max_skipped_steps", 3),
        ("--save-interval", "50", "checkpoint", "save_interval", 50),
        ("--load", "/ckpt/in", "checkpoint", "load", "/ckpt/in"),
        ("--keep-last", "3", "checkpoint", "keep_last", 3),
        ("--no-load-optim", None, "checkpoint", "load_optim", False),
        ("--no-load-rng", None, "checkpoint", "load_rng", False),
        ("--tensor-model-parallel-size", "4", "parallel", "tensor_model_parallel_size", 4),
        ("--pipeline-model-parallel-size", "3", "parallel", "pipeline_model_parallel_size", 3),
        ("--sequence-parallel", None, "parallel", "sequence_parallel", True),
        ("--use-distributed-optimizer", None, "train", "use_distributed_optimizer", True),
        ("--seq-length", "256", "train", "seq_length", 256),
        ("--micro-batch-size", "3", "train", "micro_batch_size", 3),
        ("--global-batch-size", "48", "train", "global_batch_size", 48),
        ("--train-iters", "77", "train", "train_iters", 77),
        ("--lr", "0.002", "train", "lr", 0.002),
        ("--min-lr", "0.0002", "train", "min_lr", 0.0002),
        ("--lr-decay-style", "linear", "train", "lr_decay_style", "linear"),
        ("--lr-warmup-iters", "7", "train", "lr_warmup_iters", 7),
        ("--weight-decay", "0.1", "train", "weight_decay", 0.1),
        ("--clip-grad", "0.5", "train", "clip_grad", 0.5),
        ("--adam-beta1", "0.8", "train", "adam_beta1", 0.8),
        ("--adam-beta2", "0.95", "train", "adam_beta2", 0.95),
        ("--adam-eps", "1e-6", "train", "adam_eps", 1e-6),
        ("--bf16", None, "train", "bf16", True),
        ("--use-precision-aware-optimizer", None, "train", "use_precision_aware_optimizer", True),
        ("--no-bias-swiglu-fusion", None, "train", "bias_swiglu_fusion", False),
        ("--no-output-layer-grad-accumulation-fusion", None, "train", "output_layer_grad_accumulation_fusion", False),
        ("--no-rope-fusion", None, "train", "rope_fusion", False),
        ("--recompute-modules", ["layernorm", "swiglu"], "train", "recompute_modules", ["layernorm", "swiglu"]),
        ("--main-grads-dtype", "bf16", "train", "main_grads_dtype", "bf16"),
        ("--exp-avg-dtype", "bf16", "train", "exp_avg_dtype", "bf16"),
        ("--exp-avg-sq-dtype", "bf16", "train", "exp_avg_sq_dtype", "bf16"),
        ("--seed", "7", "train", "seed", 7),
        ("--log-interval", "9", "train", "log_interval", 9),
        ("--transformer-impl", "transformer_engine", "train", "transformer_impl", "transformer_engine"),
        ("--device", "cpu", "train", "device", "cpu"),
        ("--metrics-file", "out/m.jsonl", "train", "metrics_file", "out/m.jsonl"),
        ("--distributed-timeout-minutes", "30", "train", "distributed_timeout_minutes", 30.0),
        ("--teacher-pretrain-iters", "11", "train", "teacher_pretrain_iters", 11),
        ("--teacher-pretrain-lr", "0.005", "train", "teacher_pretrain_lr", 0.005),
        ("--kd-loss", "jsd", "loss", "kind", "jsd"),
        ("--kd-beta", "0.25", "loss", "beta", 0.25),
        ("--kd-temperature", "2.0", "loss", "temperature", 2.0),
        ("--kd-loss-weight", "0.7", "loss", "kd_weight", 0.7),
        ("--kd-ce-weight", "0.3", "loss", "ce_weight", 0.3),
        ("--kd-loss-impl", "reference", "loss", "impl", "reference"),
        ("--data-source", "synthetic", "data", "source", "synthetic"),
        ("--train-data", ["a.jsonl", "b.parquet"], "data", "train_data", ["a.jsonl", "b.parquet"]),
        ("--data-path", ["0.3", "p1", "0.7", "p2"], "data", "data_path", ["0.3", "p1", "0.7", "p2"]),
        ("--tokenizer-type", "HuggingFaceTokenizer", "data", "tokenizer_type", "HuggingFaceTokenizer"),
        ("--tokenizer-model", "/tok", "data", "tokenizer_model", "/tok"),
        ("--teacher-tokenizer-model", "/ttok", "data", "teacher_tokenizer_model", "/ttok"),
        ("--skip-malformed-rows", None, "data", "skip_malformed_rows", True),
        ("--pack-sequences", None, "data", "pack_sequences", True),
        ("--reset-at-document-boundaries", None, "data", "reset_at_document_boundaries", True),
        ("--data-cache-path", "/cache", "data", "data_cache_path", "/cache"),
        ("--teacher-load", "/t", "checkpoint", "teacher_load", "/t"),
        ("--teacher-remote", "http://t:1", "checkpoint", "teacher_remote", "http://t:1"),
        ("--teacher", "self-live", "checkpoint", "teacher_mode", "self-live"),
        ("--privileged-template", "ctx: {context}", "data", "privileged_template", "ctx: {context}"),
        ("--teacher-remote-timeout-s", "5.5", "checkpoint", "teacher_remote_timeout_s", 5.5),
        ("--kd-topk", "16", "loss", "topk", 16),
        ("--kd-topk-renormalize", None, "loss", "topk_renormalize", True),
        ("--kd-loss-chunk-tokens", "4096", "loss", "chunk_tokens", 4096),
        ("--export-hf", "/out", "checkpoint", "export_hf", "/out"),
        ("--synthetic-branching", "8", "data", "synthetic_branching", 8),
        ("--data-seed", "99", "data", "data_seed", 99),
        ("--on-policy-fraction", "0.5", "rollout", "on_policy_fraction", 0.5),
        ("--rollout-temperature", "0.7", "rollout", "temperature", 0.7),
        ("--rollout-top-p", "0.9", "rollout", "top_p", 0.9),
        ("--rollout-top-k", "50", "rollout", "top_k", 50),
        ("--rollout-max-new-tokens", "512", "rollout", "max_new_tokens", 512),
        ("--seq-kd", None, "rollout", "seq_kd", True),
        ("--rollout-seed", "42", "rollout", "seed", 42),
        ("--rollouts-per-prompt", "4", "rollout", "rollouts_per_prompt", 4),
        ("--rl-loss-weight", "0.5", "rollout", "rl_loss_weight", 0.5),
        ("--reward-fn", "my.rewards:score", "rollout", "reward_fn", "my.rewards:score"),
        ("--rollout-backend", "sglang", "rollout", "backend", "sglang"),
        ("--sglang-url", "http://s:30000", "rollout", "sglang_url", "http://s:30000"),
        ("--sglang-weights-dir", "/shared/w", "rollout", "sglang_weights_dir", "/shared/w"),
        ("--sglang-sync-interval", "4", "rollout", "sglang_sync_interval", 4),
        ("--sglang-timeout-s", "90", "rollout", "sglang_timeout_s", 90.0),
    ]
    argv: list[str] = ["--group-query-attention"]
    expected: list[tuple[str, str, object]] = []
    for section, rows in (("student", student), ("teacher", teacher)):
        for flag, value, field, want in rows:
            argv += [flag] if value is None else [flag, value]
            expected.append((section, field, want))
    for flag, value, section, field, want in rest:
        argv += [flag] if value is None else [flag, *value] if isinstance(value, list) else [flag, value]
        expected.append((section, field, want))
    return argv, expected


def test_every_flag_maps_to_its_field():
    argv, expected = every_flag_argv()
    cfg = parse_config(argv)
    for section, field, want in expected:
        got = getattr(getattr(cfg, section), field)
        assert got == want, (section, field, got, want)
        assert type(got) is type(want), (section, field, type(got))


def test_every_flag_is_covered_by_the_mapping_test():
    argv, _ = every_flag_argv()
    given = {a for a in argv if a.startswith("--")}
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config_file"):
            continue
        assert given & set(action.option_strings), f"flag {action.option_strings} not exercised"


def test_every_non_default_value_differs_from_the_default():
    """The mapping test would prove nothing for a field whose value is what it would be anyway:
    the default for student and run fields, the student's value (inherited) for teacher fields."""
    argv, expected = every_flag_argv()
    default, full = parse_config(BASE), parse_config(argv)
    same = []
    for section, field, want in expected:
        baseline = full.student if section == "teacher" else getattr(default, section)
        if getattr(baseline, field) == want and (section, field) != ("data", "tokenizer_type"):  # one type exists
            same.append((section, field))
    assert same == []


def test_boolean_flags_have_negations():
    yaml_on = ["--swiglu", "--no-swiglu"]
    assert parse_config(BASE + yaml_on).student.swiglu is False
    assert parse_config(BASE + ["--bf16", "--no-bf16"]).train.bf16 is False
    assert parse_config(BASE + ["--disable-bias-linear"]).student.add_bias_linear is False


# --------------------------------------------------------------------------- teacher defaults


def test_teacher_inherits_student_values():
    cfg = parse_config(
        BASE
        + [
            "--swiglu",
            "--normalization",
            "RMSNorm",
            "--position-embedding-type",
            "rope",
            "--ffn-hidden-size",
            "160",
        ]
        + [
            "--num-query-groups",
            "2",
            "--kv-channels",
            "32",
            "--max-position-embeddings",
            "128",
            "--disable-bias-linear",
        ]
    )
    t = cfg.teacher
    assert t.swiglu and t.normalization == "RMSNorm" and t.position_embedding_type == "rope"
    assert t.add_bias_linear is False
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.vocab_size) == (2, 64, 4, 256)
    # Same width and heads: the width-derived sizes are inherited too.
    assert (t.ffn_hidden_size, t.num_query_groups, t.kv_channels) == (160, 2, 32)
    assert t.max_position_embeddings == 128


def test_teacher_boolean_tristate():
    assert parse_config(BASE + ["--swiglu"]).teacher.swiglu is True
    assert parse_config(BASE + ["--swiglu", "--teacher-no-swiglu"]).teacher.swiglu is False
    assert parse_config(BASE + ["--teacher-swiglu"]).teacher.swiglu is True
    assert parse_config(BASE + ["--teacher-swiglu"]).student.swiglu is False


def test_teacher_ffn_defaults_to_four_times_teacher_hidden_when_widths_differ():
    cfg = parse_config(BASE + ["--ffn-hidden-size", "160", "--teacher-hidden-size", "128"])
    assert cfg.student.ffn_hidden_size == 160
    assert cfg.teacher.ffn_hidden_size == 512
    cfg = parse_config(BASE + ["--teacher-hidden-size", "128", "--teacher-ffn-hidden-size", "300"])
    assert cfg.teacher.ffn_hidden_size == 300


def test_teacher_query_groups_default_to_teacher_heads_when_heads_differ():
    cfg = parse_config(
        BASE + ["--group-query-attention", "--num-query-groups", "2", "--teacher-num-attention-heads", "8"]
    )
    assert cfg.student.num_query_groups == 2
    assert cfg.teacher.num_query_groups == 8
    cfg = parse_config(BASE + ["--num-query-groups", "2", "--teacher-num-attention-heads", "8"])
    assert cfg.teacher.num_query_groups == 8
    cfg = parse_config(
        BASE
        + ["--num-query-groups", "2", "--teacher-num-attention-heads", "8", "--teacher-num-query-groups", "4"]
    )
    assert cfg.teacher.num_query_groups == 4
    # Same heads: inherited, unless the teacher opts out of grouping.
    assert parse_config(BASE + ["--num-query-groups", "2"]).teacher.num_query_groups == 2
    cfg = parse_config(BASE + ["--num-query-groups", "2", "--teacher-no-group-query-attention"])
    assert cfg.teacher.num_query_groups == 4


def test_teacher_kv_channels_inherited_only_for_same_width_and_heads():
    assert parse_config(BASE + ["--kv-channels", "32"]).teacher.kv_channels == 32
    assert (
        parse_config(BASE + ["--kv-channels", "32", "--teacher-hidden-size", "128"]).teacher.kv_channels
        is None
    )
    assert (
        parse_config(BASE + ["--kv-channels", "32", "--teacher-num-attention-heads", "8"]).teacher.kv_channels
        is None
    )


def test_group_query_attention_flag_rules(capsys):
    assert parse_config(BASE).student.num_query_groups == 4  # no flag: one group per head
    assert parse_config(BASE + ["--num-query-groups", "2"]).student.num_query_groups == 2
    assert "--group-query-attention needs --num-query-groups" in parse_error(
        BASE + ["--group-query-attention"], capsys
    )
    err = parse_error(
        BASE + ["--teacher-num-attention-heads", "8", "--teacher-group-query-attention"], capsys
    )
    assert "--teacher-num-query-groups" in err
    err = parse_error(
        BASE + ["--teacher-num-query-groups", "2", "--teacher-no-group-query-attention"], capsys
    )
    assert "contradicts" in err


# --------------------------------------------------------------------------- YAML recipes


def test_yaml_recipe_and_command_line_precedence(tmp_path):
    path = write(
        tmp_path,
        "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nvocab_size: 256\nseq_length: 32\n"
        "teacher_hidden_size: 128\nkd_loss: jsd\nkd_beta: 0.2\nlr: 1\nswiglu: true\n"
        "tensor_model_parallel_size: 2\n",
    )
    cfg = parse_config(["--config-file", str(path)])
    assert cfg.teacher.hidden_size == 128 and cfg.teacher.ffn_hidden_size == 512
    assert cfg.loss.kind == "jsd" and cfg.loss.beta == 0.2
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.student.swiglu and cfg.parallel.tensor_model_parallel_size == 2

    # Flags on the command line win, before or after --config-file; the rest still comes from the file.
    cfg = parse_config(["--kd-beta", "0.9", "--config-file", str(path), "--no-swiglu", "--hidden-size", "32"])
    assert cfg.loss.beta == 0.9 and cfg.loss.kind == "jsd"
    assert cfg.student.swiglu is False and cfg.student.hidden_size == 32
    assert cfg.teacher.hidden_size == 128  # from the file, not inherited from the CLI student
    assert cfg.teacher.swiglu is False  # inherited from the (overridden) student value
    # A flag given on the command line with its default value still overrides the file.
    assert (
        parse_config(
            ["--config-file", str(path), "--tensor-model-parallel-size", "1"]
        ).parallel.tensor_model_parallel_size
        == 1
    )


def test_yaml_supplies_required_flags(tmp_path, capsys):
    path = write(tmp_path, "num_layers: 2\nhidden_size: 64\n")
    err = parse_error(["--config-file", str(path), "--vocab-size", "256"], capsys).splitlines()[-1]
    assert "--num-attention-heads" in err and "--seq-length" in err
    assert "--num-layers" not in err and "--vocab-size" not in err and "--hidden-size" not in err


def test_yaml_unknown_key_names_key_file_and_suggestion(tmp_path, capsys):
    path = write(tmp_path, "num_layer: 2\n", name="typo.yaml")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert "'num_layer'" in message and str(path) in message and "did you mean 'num_layers'" in message
    err = parse_error(BASE + ["--config-file", str(path)], capsys)
    assert "num_layer" in err and "typo.yaml" in err
    # Dashed keys are rejected too, with the underscored name suggested.
    path = write(tmp_path, "kd-loss: jsd\n")
    with pytest.raises(ConfigError, match="did you mean 'kd_loss'"):
        load_recipe(str(path))


@pytest.mark.parametrize(
    "line,expected",
    [
        ("num_layers: two", "expected int"),
        ("num_layers: 2.5", "expected int"),
        ("num_layers: true", "expected int"),
        ("lr: fast", "expected float"),
        ("swiglu: 1", "expected a boolean"),
        ("kd_loss: 3", "expected str"),
        ("kd_loss: kl", "not one of forward_kl, reverse_kl, jsd"),
        ("normalization: [RMSNorm]", "expected str"),
        ("lr: null", "null is not allowed"),
    ],
)
def test_yaml_wrong_type_names_key_file_and_type(tmp_path, capsys, line, expected):
    path = write(tmp_path, line + "\n")
    key = line.split(":")[0]
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert f"'{key}'" in message and str(path) in message and expected in message
    err = parse_error(BASE + ["--config-file", str(path)], capsys)
    assert key in err and expected in err


def test_yaml_null_allowed_for_optional_values(tmp_path):
    path = write(tmp_path, "ffn_hidden_size: null\nmetrics_file: null\nteacher_swiglu: null\n")
    assert parse_config(BASE + ["--config-file", str(path)]).student.ffn_hidden_size == 256


def test_yaml_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    err = parse_error(BASE + ["--config-file", str(missing)], capsys)
    assert "nope.yaml" in err and "no such file" in err


def test_yaml_not_a_mapping_or_nested(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(str(write(tmp_path, "- 1\n- 2\n")))
    with pytest.raises(ConfigError, match="cannot include another recipe"):
        load_recipe(str(write(tmp_path, "config_file: other.yaml\n")))
    with pytest.raises(ConfigError, match="cannot read it as YAML"):
        load_recipe(str(write(tmp_path, "a: [1\n")))
    assert load_recipe(str(write(tmp_path, ""))) == {}


# --------------------------------------------------------------------------- required flags, reference


def test_missing_required_flags_are_named(capsys):
    err = parse_error(["--num-layers", "2"], capsys).splitlines()[-1]
    for flag in ("--hidden-size", "--num-attention-heads", "--vocab-size", "--seq-length"):
        assert flag in err
    assert "--num-layers" not in err
    assert set(REQUIRED_FLAGS) == {
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "seq_length",
    }


def test_bad_command_line_values_are_parser_errors(capsys):
    assert "invalid int value" in parse_error(BASE + ["--num-layers", "x"], capsys)
    assert "invalid choice" in parse_error(BASE + ["--kd-loss", "kl"], capsys)
    assert "unrecognized arguments" in parse_error(BASE + ["--kd-los", "jsd"], capsys)


def test_every_flag_has_help_and_is_in_the_reference():
    parser = build_parser()
    reference = format_flag_reference(parser)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, action.option_strings
        for option in action.option_strings:
            assert f"`{option}" in reference, option
    for title in ("student model", "teacher model", "parallelism", "training", "distillation", "data",
                  "on-policy distillation and RL"):
        assert f"### {title}" in reference
    assert "| `--num-layers N` | required |" in reference
    assert "4 x --teacher-hidden-size" in reference  # the ffn rule is documented


def test_help_renders():
    text = build_parser().format_help()
    assert "--teacher-no-swiglu" in text and "--config-file" in text


# --------------------------------------------------------------------------- quickstart


def test_quickstart_recipe_parses_and_validates_for_four_processes():
    from omegaconf import OmegaConf

    cfg = parse_config(["--config-file", str(QUICKSTART)])
    validate(cfg, 4)
    recipe = OmegaConf.to_container(OmegaConf.load(QUICKSTART))
    s, t = cfg.student, cfg.teacher
    # Every value in the recipe lands in the config (tuning the recipe must not break this test).
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.ffn_hidden_size) == (
        recipe["num_layers"], recipe["hidden_size"], recipe["num_attention_heads"], recipe["ffn_hidden_size"])
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.ffn_hidden_size) == (
        recipe["teacher_num_layers"], recipe["teacher_hidden_size"], recipe["teacher_num_attention_heads"],
        recipe["teacher_ffn_hidden_size"])
    assert s.vocab_size == t.vocab_size == recipe["vocab_size"]
    assert s.normalization == t.normalization == recipe["normalization"]
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (2, 2)
    assert cfg.train.seq_length == recipe["seq_length"] and cfg.train.train_iters == recipe["train_iters"]
    assert cfg.train.teacher_pretrain_iters == recipe["teacher_pretrain_iters"] > 0
    assert cfg.loss.kind == recipe["kd_loss"]
    assert cfg.data.source == "auto"


def test_quickstart_relative_path_from_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repo root: the relative path is resolved from the repo
    cfg = parse_config(["--config-file", "configs/quickstart.yaml"])
    assert cfg.teacher.hidden_size == 128


def test_config_to_dict_is_json_serializable():
    cfg = parse_config(["--config-file", str(QUICKSTART)])
    d = config_to_dict(cfg)
    assert set(d) == {"student", "teacher", "parallel", "loss", "train", "data", "checkpoint", "rollout"}
    assert json.loads(json.dumps(d))["teacher"]["hidden_size"] == 128
