"""Remote top-k teacher: a Ray-replicated service (``python -m megatron_distill.teacher_service``)
and its trainer-side client ``RemoteTeacher``.

The client needs neither Ray nor transformers; the server (``server.TeacherService``) imports
Ray lazily, when it starts.
"""

from megatron_distill.teacher_service.client import (
    RemoteTeacher,
    TeacherAnswerError,
    TeacherServiceError,
    TeacherUnavailableError,
)
from megatron_distill.teacher_service.protocol import TOKEN_ENV, tokens_digest

__all__ = [
    "TOKEN_ENV",
    "RemoteTeacher",
    "TeacherAnswerError",
    "TeacherServiceError",
    "TeacherUnavailableError",
    "tokens_digest",
]
