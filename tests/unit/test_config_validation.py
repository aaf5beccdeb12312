"""config.validate: every rule raises ConfigError naming the flag to change; a valid config passes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_distill.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelShape,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
    validate,
)

WORLD = 8  # TP 2 x PP 2 x DP 2


def make(student=None, teacher=None, parallel=None, loss=None, train=None, data=None,
         checkpoint=None, rollout=None) -> DistillConfig:
    """A valid config for WORLD processes, with fields overridden by the given dicts."""
    s = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=64)
    t = dict(num_layers=8, hidden_size=128, num_attention_heads=8, vocab_size=256, max_position_embeddings=64)
    return DistillConfig(
        student=ModelShape(**{**s, **(student or {})}),
        teacher=ModelShape(**{**t, **(teacher or {})}),
        parallel=ParallelConfig(
            **{"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, **(parallel or {})}
        ),
        loss=LossConfig(**(loss or {})),
        train=TrainConfig(
            **{"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 8, **(train or {})}
        ),
        data=DataConfig(**(data or {})),
        checkpoint=CheckpointConfig(**(checkpoint or {})),
        rollout=RolloutConfig(**(rollout or {})),
    )


def fails(cfg: DistillConfig, pattern: str, world: int = WORLD) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate(cfg, world)


def test_valid_config_passes():
    validate(make(), WORLD)
    validate(make(parallel={"sequence_parallel": True}), WORLD)
    validate(make(loss={"kind": "jsd", "beta": 0.0}), WORLD)
    validate(make(loss={"kind": "jsd", "beta": 1.0}), WORLD)
    validate(make(loss={"kd_weight": 0.0, "ce_weight": 1.0}), WORLD)


def test_quickstart_shape_passes_for_four_processes():
    cfg = make(
        student={"num_layers": 2, "ffn_hidden_size": 256, "position_embedding_type": "rope"},
        teacher={
            "num_layers": 4,
            "num_attention_heads": 4,
            "ffn_hidden_size": 512,
            "position_embedding_type": "rope",
        },
        train={"micro_batch_size": 4, "global_batch_size": 16},
    )
    validate(cfg, 4)


@pytest.mark.parametrize("world", [6, 2, 3])
def test_world_size_not_multiple_of_tp_pp(world):
    pattern = (
        rf"world size \({world} processes\).*--tensor-model-parallel-size x --pipeline-model-parallel-size"
    )
    fails(make(), pattern, world)


@pytest.mark.parametrize("field", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
def test_parallel_sizes_at_least_one(field):
    fails(
        make(parallel={field: 0}),
        "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1",
    )


@pytest.mark.parametrize("prefix,key", [("", "student"), ("teacher-", "teacher")])
@pytest.mark.parametrize(
    "field", ["num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"]
)
def test_model_sizes_positive(prefix, key, field):
    flag = "--" + prefix + field.replace("_", "-")
    fails(make(**{key: {field: 0}}), re.escape(f"{flag} must be > 0, got 0"))


@pytest.mark.parametrize("prefix,key", [("", "student"), ("teacher-", "teacher")])
@pytest.mark.parametrize("field", ["ffn_hidden_size", "num_query_groups", "kv_channels"])
def test_derived_sizes_positive(prefix, key, field):
    """Zero query groups used to crash validate with ZeroDivisionError instead of naming the flag."""
    flag = "--" + prefix + field.replace("_", "-")
    fails(make(**{key: {field: 0}}), re.escape(f"{flag} must be > 0, got 0"))


def test_student_heads_not_divisible_by_tp():
    fails(
        make(student={"num_attention_heads": 3, "kv_channels": 16}),
        re.escape("--num-attention-heads (3) must be divisible by --tensor-model-parallel-size (2)"),
    )


def test_teacher_heads_not_divisible_by_tp():
    fails(
        make(teacher={"num_attention_heads": 5, "kv_channels": 16}),
        re.escape("--teacher-num-attention-heads (5) must be divisible by --tensor-model-parallel-size (2)"),
    )


def test_student_query_groups_not_divisible_by_tp():
    fails(
        make(student={"num_query_groups": 1}),
        re.escape("--num-query-groups (1) must be divisible by --tensor-model-parallel-size (2)"),
    )


def test_teacher_query_groups_not_divisible_by_tp():
    fails(
        make(teacher={"num_query_groups": 1}),
        re.escape("--teacher-num-query-groups (1) must be divisible by --tensor-model-parallel-size (2)"),
    )


def test_heads_not_divisible_by_query_groups():
    fails(
        make(teacher={"num_query_groups": 6}),
        re.escape("--teacher-num-attention-heads (8) must be divisible by --teacher-num-query-groups (6)"),
    )
    validate(make(teacher={"num_query_groups": 4}, student={"num_query_groups": 2}), WORLD)


def test_hidden_not_divisible_by_heads_unless_kv_channels():
    fails(
        make(student={"hidden_size": 66}),
        re.escape("--hidden-size (66) must be divisible by --num-attention-heads (4) (or set --kv-channels)"),
    )
    fails(make(teacher={"hidden_size": 100}), re.escape("(or set --teacher-kv-channels)"))
    validate(make(student={"hidden_size": 66, "kv_channels": 16, "ffn_hidden_size": 256}), WORLD)


def test_student_layers_not_divisible_by_pp():
    fails(
        make(student={"num_layers": 3}),
        re.escape("--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    )


def test_teacher_layers_not_divisible_by_pp():
    fails(
        make(teacher={"num_layers": 7}),
        re.escape("--teacher-num-layers (7) must be divisible by --pipeline-model-parallel-size (2)"),
    )


def test_ffn_not_divisible_by_tp():
    fails(
        make(teacher={"ffn_hidden_size": 511}),
        re.escape("--teacher-ffn-hidden-size (511) must be divisible by --tensor-model-parallel-size (2)"),
    )


def test_unknown_normalization_and_position_embedding():
    fails(make(student={"normalization": "BatchNorm"}), "--normalization must be one of")
    fails(
        make(teacher={"position_embedding_type": "alibi"}), "--teacher-position-embedding-type must be one of"
    )


def test_vocab_sizes_differ():
    fails(
        make(teacher={"vocab_size": 512}),
        re.escape("student --vocab-size (256) and --teacher-vocab-size (512) must be equal"),
    )


def test_sequence_parallel_needs_tp():
    fails(
        make(parallel={"sequence_parallel": True, "tensor_model_parallel_size": 1}),
        "--sequence-parallel needs --tensor-model-parallel-size > 1",
    )


def test_sequence_parallel_needs_seq_length_divisible_by_tp():
    fails(
        make(parallel={"sequence_parallel": True}, train={"seq_length": 63}),
        re.escape(
            "--seq-length (63) must be divisible by --tensor-model-parallel-size (2) with --sequence-parallel"
        ),
    )


def test_unknown_kd_loss():
    fails(make(loss={"kind": "kl"}), "--kd-loss must be one of")


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_outside_unit_interval(beta):
    fails(make(loss={"kind": "jsd", "beta": beta}), re.escape(f"--kd-beta must be in [0, 1], got {beta}"))


@pytest.mark.parametrize("chunk", [0, -8])
def test_loss_chunk_tokens_positive(chunk):
    message = f"--kd-loss-chunk-tokens must be >= 1 (or unset: automatic), got {chunk}"
    fails(make(loss={"chunk_tokens": chunk}), re.escape(message))


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_temperature_not_positive(tau):
    fails(make(loss={"temperature": tau}), "--kd-temperature must be > 0")


@pytest.mark.parametrize("weights", [{"kd_weight": -1.0}, {"ce_weight": -0.5}])
def test_negative_loss_weights(weights):
    fails(make(loss=weights), "--kd-loss-weight and --kd-ce-weight must be >= 0")


def test_both_loss_weights_zero():
    fails(make(loss={"kd_weight": 0.0, "ce_weight": 0.0}), "--kd-loss-weight and --kd-ce-weight are both 0")


def test_unknown_kd_loss_impl():
    fails(make(loss={"impl": "triton"}), "--kd-loss-impl must be one of")


def test_seq_length_exceeds_student_max_positions():
    fails(
        make(train={"seq_length": 128}, teacher={"max_position_embeddings": 128}),
        re.escape("--seq-length (128) exceeds --max-position-embeddings (64)"),
    )


def test_seq_length_exceeds_teacher_max_positions():
    fails(
        make(train={"seq_length": 128}, student={"max_position_embeddings": 128}),
        re.escape("--seq-length (128) exceeds --teacher-max-position-embeddings (64)"),
    )


def test_seq_length_beyond_max_positions_is_fine_with_rope():
    validate(
        make(
            train={"seq_length": 128},
            student={"position_embedding_type": "rope"},
            teacher={"position_embedding_type": "rope"},
        ),
        WORLD,
    )


def test_seq_length_too_short():
    fails(make(train={"seq_length": 1}), "--seq-length must be > 1, got 1")


@pytest.mark.parametrize("field", ["micro_batch_size", "global_batch_size"])
def test_batch_sizes_at_least_one(field):
    fails(make(train={field: 0}), "--micro-batch-size and --global-batch-size must be >= 1")


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    fails(
        make(train={"micro_batch_size": 3, "global_batch_size": 8}),
        re.escape(
            "--global-batch-size (8) must be divisible by --micro-batch-size x data-parallel size (3 x 2)"
        ),
    )
    fails(make(train={"micro_batch_size": 2, "global_batch_size": 6}), re.escape("(2 x 2)"))


def test_training_rules():
    fails(make(train={"train_iters": -1}), "--train-iters must be >= 0, got -1")
    fails(make(train={"lr_decay_style": "step"}), "--lr-decay-style must be one of")
    fails(make(train={"lr": 1e-4, "min_lr": 1e-3}), re.escape("--min-lr (0.001) must be <= --lr (0.0001)"))
    fails(make(train={"transformer_impl": "te"}), "--transformer-impl must be one of")
    fails(make(train={"device": "tpu"}), "--device must be one of")
    fails(make(train={"log_interval": 0}), "--log-interval must be >= 1, got 0")


def test_self_distillation_rules():
    fails(make(checkpoint={"teacher_mode": "self-frozen"}), "--teacher self-frozen .* needs --train-data")
    fails(make(checkpoint={"teacher_mode": "self-live", "teacher_load": "/t"}, data={"train_data": ["a"]}),
          "--teacher self-live uses the student as the teacher")
    fails(make(checkpoint={"teacher_mode": "bogus"}), "--teacher must be one of")


def test_resilience_rules():
    fails(make(train={"max_skipped_steps": 0}), "--max-skipped-steps must be >= 1")
    fails(make(checkpoint={"auto_resume": True}), "--auto-resume needs --save DIR")


def test_data_rules():
    fails(make(data={"source": "jsonl"}), "--data-source must be one of .*got 'jsonl'")
    fails(make(data={"source": "chat"}), "--data-source chat needs --train-data")
    fails(make(data={"train_data": ["a.jsonl"], "data_path": ["p"], "tokenizer_model": "t"}),
          "either --train-data .* or --data-path")
    fails(make(data={"train_data": ["a.jsonl"]}), "--train-data / --data-path need --tokenizer-model")
    fails(make(data={"pack_sequences": True}), "--pack-sequences applies to --train-data only")
    fails(make(data={"synthetic_branching": 0}), "--synthetic-branching must be >= 1, got 0")


CHAT = {"train_data": ["a.jsonl"], "tokenizer_model": "tok"}


def test_valid_on_policy_configs_pass():
    validate(make(data=CHAT, rollout={"on_policy_fraction": 0.5}), WORLD)
    validate(make(data=CHAT, rollout={"seq_kd": True, "rollouts_per_prompt": 2}), WORLD)
    rl = {"on_policy_fraction": 1.0, "rollouts_per_prompt": 4, "rl_loss_weight": 1.0}
    validate(make(data=CHAT, rollout=rl, loss={"kd_weight": 0.0}), WORLD)  # RL alone trains
    # lambda 0 without --seq-kd generates nothing: the other rollout settings are inert, not errors.
    validate(make(rollout={"rollouts_per_prompt": 3, "temperature": 0.0}), WORLD)


def test_rollout_value_rules():
    fails(make(rollout={"on_policy_fraction": 1.5}), re.escape("--on-policy-fraction must be in [0, 1], got 1.5"))
    fails(make(rollout={"temperature": -1.0}), "--rollout-temperature must be >= 0")
    fails(make(rollout={"top_p": 0.0}), re.escape("--rollout-top-p must be in (0, 1]"))
    fails(make(rollout={"top_k": -1}), "--rollout-top-k must be >= 0")
    fails(make(rollout={"max_new_tokens": 0}), "--rollout-max-new-tokens must be >= 1")
    fails(make(rollout={"rollouts_per_prompt": 0}), "--rollouts-per-prompt must be >= 1")
    fails(make(rollout={"rl_loss_weight": -0.1}), "--rl-loss-weight must be >= 0")


def test_rollout_combination_rules():
    on = {"on_policy_fraction": 0.5}
    fails(make(rollout=on), "--on-policy-fraction > 0 / --seq-kd generate responses .* give --train-data")
    fails(make(rollout={"seq_kd": True}), "give --train-data")
    fails(make(data={**CHAT, "pack_sequences": True}, rollout=on), "cannot be combined with --pack-sequences")
    fails(make(data=CHAT, checkpoint={"teacher_remote": "http://t:1"}, loss={"topk": 8}, rollout=on),
          "--teacher-remote is not supported with rollouts")
    # Privileged-context self-distillation takes the student's rollouts, not teacher-generated ones.
    validate(make(data=CHAT, checkpoint={"teacher_mode": "self-live"}, rollout=on), WORLD)
    fails(make(data=CHAT, checkpoint={"teacher_mode": "self-frozen"}, rollout={"seq_kd": True}),
          "--seq-kd with privileged-context self-distillation")
    # WORLD 8 at TP2 x PP2: DP 2, 4 samples per DP rank.
    fails(make(data=CHAT, rollout={**on, "rollouts_per_prompt": 3}),
          re.escape("--global-batch-size / data-parallel size (4) must be a multiple of --rollouts-per-prompt (3)"))
    rl = {**on, "rollouts_per_prompt": 2, "rl_loss_weight": 1.0}
    fails(make(data=CHAT, rollout={**rl, "on_policy_fraction": 0.0}), "--rl-loss-weight > 0 needs --on-policy-fraction")
    fails(make(data=CHAT, rollout={**rl, "rollouts_per_prompt": 1}), "needs --rollouts-per-prompt >= 2")
    fails(make(data=CHAT, rollout=rl, loss={"impl": "fused"}), "use --kd-loss-impl reference")
    fails(make(data=CHAT, rollout={**rl, "reward_fn": "nocolon"}), "--reward-fn must look like")
    fails(make(data=CHAT, rollout={**rl, "rl_loss_weight": 0.0}, loss={"kd_weight": 0.0}), "nothing to train on")


def test_sglang_backend_rules():
    llama = {"swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope", "add_bias_linear": False}
    sg = {"on_policy_fraction": 0.5, "backend": "sglang", "sglang_url": "http://s:30000", "sglang_weights_dir": "/w"}
    validate(make(data=CHAT, student=llama, rollout=sg), WORLD)
    validate(make(data=CHAT, student=llama, rollout={**sg, "seq_kd": True, "sglang_sync_interval": 4}), WORLD)
    fails(make(data=CHAT, student=llama, rollout={**sg, "backend": "vllm"}), "--rollout-backend must be one of")
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_url": None}),
          "--rollout-backend sglang needs --sglang-url")
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_url": "s:30000"}),
          "--sglang-url must start with http://")
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_weights_dir": None}),
          "--rollout-backend sglang needs --sglang-weights-dir")
    fails(make(data=CHAT, student=llama, rollout={**sg, "on_policy_fraction": 0.0, "seq_kd": True}),
          "--rollout-backend sglang .* needs --on-policy-fraction > 0")
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_sync_interval": 0}),
          "--sglang-sync-interval must be >= 1")
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_timeout_s": 0.0}), "--sglang-timeout-s must be > 0")
    # 4 attempts x 150 s + 7 s of backoff >= the default 10-minute collective timeout.
    fails(make(data=CHAT, student=llama, rollout={**sg, "sglang_timeout_s": 150.0}),
          re.escape("--sglang-timeout-s 150.0 x 4 attempts + backoff (607 s) must stay below "
                    "--distributed-timeout-minutes (10.0 min)"))
    validate(make(data=CHAT, student=llama, train={"distributed_timeout_minutes": 11.0},
                  rollout={**sg, "sglang_timeout_s": 150.0}), WORLD)
    fails(make(data=CHAT, rollout=sg), "--rollout-backend sglang exports the student .* --disable-bias-linear")
    fails(make(data=CHAT, student=llama, rollout={"on_policy_fraction": 0.5, "sglang_url": "http://s:1"}),
          "--sglang-url needs --rollout-backend sglang")


def test_precision_aware_optimizer_rules():
    low = {"use_precision_aware_optimizer": True, "bf16": True, "main_grads_dtype": "bf16",
           "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}
    validate(make(train=low), WORLD)
    fails(make(train={**low, "bf16": False}), r"--use-precision-aware-optimizer .* needs --bf16")
    fails(make(train={**low, "use_distributed_optimizer": True}),
          "--use-precision-aware-optimizer cannot be combined with --use-distributed-optimizer")
    fails(make(train={**low, "exp_avg_dtype": "fp16"}), r"--exp-avg-dtype must be one of \('fp32', 'bf16'\)")
    fails(make(train={"exp_avg_sq_dtype": "bf16", "main_grads_dtype": "bf16"}),
          "--main-grads-dtype, --exp-avg-sq-dtype set without --use-precision-aware-optimizer")


def test_recompute_modules_rules():
    validate(make(train={"recompute_modules": ["layernorm", "swiglu"]}, student={"swiglu": True}), WORLD)
    fails(make(train={"recompute_modules": ["mlp"]}), r"--recompute-modules: \['mlp'\] not supported")
    fails(make(train={"recompute_modules": ["swiglu"]}), "--recompute-modules swiglu needs a SwiGLU student")
    fails(make(train={"recompute_modules": ["layernorm"], "transformer_impl": "transformer_engine"}),
          "--recompute-modules applies to --transformer-impl local")


def test_every_problem_is_listed_at_once():
    cfg = make(student={"num_layers": 3}, teacher={"vocab_size": 128}, loss={"beta": 2.0})
    with pytest.raises(ConfigError) as info:
        validate(cfg, WORLD)
    message = str(info.value)
    for flag in ("--num-layers (3)", "--teacher-vocab-size (128)", "--kd-beta"):
        assert flag in message


def test_validate_does_not_mutate():
    cfg = make()
    before = dataclasses.asdict(cfg)
    validate(cfg, WORLD)
    assert dataclasses.asdict(cfg) == before
