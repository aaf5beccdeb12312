"""``DistillStage``: one pipeline stage holding the student's and the frozen teacher's layers.

The tensor sent between stages is ``concat[student_hidden | teacher_hidden]`` along the hidden
dimension, shape ``[s, b, h_student + h_teacher]`` (``s`` divided by TP with sequence
parallelism). On the last stage ``forward`` returns ``(student_logits, teacher_logits)``, each
``[b, s, V_local]``: the student's with autograd, the teacher's without.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule


def freeze(model: torch.nn.Module) -> None:
    """Make ``model`` a frozen teacher: no grads, eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


class _HiddenCapture:
    """Replaces an output layer's forward: returns the hidden states instead of logits.

    Lets the last stage hand ``(hidden, output weight)`` to a fused output-layer + loss kernel
    while the GPTModel and its parameter names stay untouched. ``weight`` is the tied embedding
    when Megatron passes one, else the layer's own vocab shard.
    """

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.weight: torch.Tensor | None = None

    def __call__(self, hidden_states, weight=None, runtime_gather_output=None):
        self.weight = weight if weight is not None else self.layer.weight
        return hidden_states, None


class DistillStage(MegatronModule):
    """This rank's slice of student + teacher; what Megatron's schedule sees as "the model".

    ``teacher`` may be None: then the stage is a plain student LM stage (used to pre-train a
    teacher, or to measure the student trained on cross-entropy alone).

    ``output_mode`` on the last stage: ``"logits"`` returns both models' vocab-shard logits;
    ``"hidden"`` returns ``(student_hidden, student_weight, teacher_hidden, teacher_weight)``
    with hidden ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism) for a fused loss
    that never materialises the logits.
    """

    def __init__(self, student: GPTModel, teacher: GPTModel | None, output_mode: str = "logits",
                 self_live: bool = False):
        super().__init__(config=student.config)
        if self_live and teacher is not None:
            raise ValueError("self_live uses the student as its own teacher: pass teacher=None")
        # --teacher self-live: the current student weights score the teacher's input, without grad
        # and in eval mode, in this same module (no second copy of the weights).
        self.self_live = self_live
        self._teacher_input = None
        if output_mode not in ("logits", "hidden"):
            raise ValueError(f"output_mode must be 'logits' or 'hidden', got {output_mode!r}")
        self.student = student
        self.teacher = teacher
        self.output_mode = output_mode
        if teacher is not None:
            freeze(teacher)
        self._captures = {}
        if output_mode == "hidden" and student.post_process:
            for name, model in (("student", student), ("teacher", teacher)):
                if model is not None:
                    capture = _HiddenCapture(model.output_layer)
                    model.output_layer.forward = capture
                    self._captures[name] = capture
        # Read by Megatron's schedule and finalize_model_grads through the DDP wrapper.
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = student.pre_process
        self.post_process = student.post_process
        self.share_embeddings_and_output_weights = student.share_embeddings_and_output_weights
        self.student_hidden = student.config.hidden_size
        self.teacher_hidden = (
            student.config.hidden_size if self_live else teacher.config.hidden_size if teacher is not None else 0
        )

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The student's tied embedding / output weight (Megatron syncs its grads across PP)."""
        return self.student.shared_embedding_or_output_weight()

    def train(self, mode: bool = True) -> DistillStage:
        """Train the student; the teacher stays in eval mode whatever is asked."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received ``[s, b, h_s + h_t]`` tensor and hand each part to its model."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "DistillStage expects one input tensor per stage"
            input_tensor = input_tensor[0]
        if input_tensor is None or (self.teacher is None and not self.self_live):
            self.student.set_input_tensor(input_tensor)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            self._teacher_input = None
            return
        student_part, teacher_part = torch.split(
            input_tensor, [self.student_hidden, self.teacher_hidden], dim=-1
        )
        self.student.set_input_tensor(student_part.contiguous())
        if self.self_live:
            self._teacher_input = teacher_part.detach().contiguous()
        else:
            self.teacher.set_input_tensor(teacher_part.detach().contiguous())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_position_ids: torch.Tensor | None = None,
    ):
        """Run both models on this stage.

        Inputs ``[b, s]`` (used on the first stage only). Returns the ``[s, b, h_s + h_t]``
        concatenation on intermediate stages, ``(student_logits, teacher_logits)`` of shape
        ``[b, s, V_local]`` on the last (teacher_logits None without a teacher).
        """
        if self.self_live:
            return _self_live_forward(self, input_ids, position_ids, attention_mask, teacher_input_ids,
                                      teacher_position_ids)
        student_out = self.student(input_ids, position_ids, attention_mask)
        teacher_out = None
        if self.teacher is not None:
            t_ids = input_ids if teacher_input_ids is None else teacher_input_ids
            t_pos = position_ids if teacher_position_ids is None else teacher_position_ids
            with torch.no_grad():
                teacher_out = self.teacher(t_ids, t_pos, attention_mask)
        if not self.post_process:
            if teacher_out is None:
                return student_out
            return torch.cat([student_out, teacher_out], dim=-1)
        if self.output_mode == "hidden":
            # GPTModel transposed our [s, b, h] "logits" to [b, s, h]; undo it (a view).
            student_hidden = student_out.transpose(0, 1)
            teacher_hidden = None if teacher_out is None else teacher_out.transpose(0, 1)
            teacher_weight = self._captures["teacher"].weight if teacher_out is not None else None
            return student_hidden, self._captures["student"].weight, teacher_hidden, teacher_weight
        return student_out, teacher_out


def _self_live_forward(stage: DistillStage, input_ids, position_ids, attention_mask, teacher_input_ids,
                       teacher_position_ids):
    """--teacher self-live: a teacher pass (no grad, eval mode), then the student pass, same weights."""
    student = stage.student
    was_training = student.training
    student_input = getattr(student.decoder, "input_tensor", None)
    student.eval()
    if not stage.pre_process:
        student.set_input_tensor(stage._teacher_input)
    with torch.no_grad():
        teacher_out = student(
            input_ids if teacher_input_ids is None else teacher_input_ids,
            position_ids if teacher_position_ids is None else teacher_position_ids,
            attention_mask,
        )
    student.train(was_training)
    if not stage.pre_process:
        student.set_input_tensor(student_input)
    student_out = student(input_ids, position_ids, attention_mask)
    if not stage.post_process:
        return torch.cat([student_out, teacher_out], dim=-1)
    if stage.output_mode == "hidden":
        weight = stage._captures["student"].weight
        return student_out.transpose(0, 1), weight, teacher_out.transpose(0, 1), weight
    return student_out, teacher_out


def concat_hidden_shapes_fn(student_hidden: int, teacher_hidden: int) -> Callable:
    """``adjust_tensor_shapes_fn`` for Megatron's 1F1B schedule: p2p tensors carry h_s + h_t."""

    def adjust(recv_shapes, send_shapes):
        def widen(shapes):
            return [tuple(shape[:-1]) + (student_hidden + teacher_hidden,) for shape in shapes]

        return widen(recv_shapes), widen(send_shapes)

    return adjust
