"""HTTP requests with retries and backoff, for the engine's clients of other services
(the remote teacher, ``teacher_service/client.py``; the sglang server, ``rollout/sglang_backend.py``).

Connection errors, timeouts and HTTP 5xx answers are retried ``retries`` times after waits of
``backoff_s``, ``2 backoff_s``, ...; a 4xx answer (bad request, wrong token) is not retried: it
would stay the same. Only the standard library is used.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable


class HTTPStatusError(Exception):
    """An HTTP error answer: ``code`` and the message the caller's ``error_text`` read from it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


def request_once(url: str, body: bytes | None, headers: dict[str, str], timeout_s: float,
                 error_text: Callable[[urllib.error.HTTPError], str]) -> bytes:
    """One POST of ``body`` (a GET when None) to ``url``: the answer's bytes, or ``HTTPStatusError``
    carrying ``error_text(err)`` for an HTTP error answer (other failures raise as urllib does)."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        raise HTTPStatusError(err.code, error_text(err)) from None


def with_retries(once: Callable[[], bytes], *, retries: int, backoff_s: float,
                 refused: Callable[[HTTPStatusError], Exception], unavailable: Callable[[str], Exception]) -> bytes:
    """``once()``'s answer, retried as the module docstring says.

    ``refused(err)`` is raised for a 4xx answer; ``unavailable(last_error)`` after the last failed
    attempt (``last_error``: its description).
    """
    errors: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            return once()
        except HTTPStatusError as err:
            if err.code < 500:
                raise refused(err) from None
            errors.append(str(err))
        except (OSError, urllib.error.URLError) as err:  # refused, reset, timed out
            errors.append(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
    raise unavailable(errors[-1])
