"""Exceptions raised by the quotad client.

Every error answer of quotad is ``{"error": {"code": "...", "message": "..."}}``
with an HTTP status; it becomes a :class:`QuotadError` subclass chosen by the
status, carrying ``.status``, ``.code`` and ``.message``.

:class:`Denied` is deliberately *not* a :class:`QuotadError`: a denial is a
normal answer, and code that treats "quotad is broken" as "let the call
through" (``except QuotadError``) must never let a denied call through by
accident.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from .models import Decision

__all__ = [
    "QuotadError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
    "PayloadTooLarge",
    "Unavailable",
    "Denied",
    "error_from_response",
]


class QuotadError(Exception):
    """An error answer from quotad, or a failure to reach it.

    ``status`` is the HTTP status (``None`` when quotad could not be reached),
    ``code`` the machine-readable code (``"invalid_request"``,
    ``"unknown_subject"``, ...), ``message`` the server's explanation and
    ``body`` the decoded JSON answer (or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: str = "error",
        body: Any = None,
        method: Optional[str] = None,
        path: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body
        self.method = method
        self.path = path

    def __str__(self) -> str:
        where = f" [{self.method} {self.path}]" if self.method and self.path else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{self.message} ({status}{self.code}){where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r})"
        )


class InvalidRequest(QuotadError):
    """400: the request is malformed or out of range (``invalid_request``,
    ``unknown_metric``, ``invalid_policy``, ...). The message names the field
    (for ``invalid_policy``, its path: ``plans[0].limits[0].max: ...``)."""


class Unauthorized(QuotadError):
    """401: no bearer token, or one quotad does not accept."""


class Forbidden(QuotadError):
    """403: the token's role (``client``) may not use this endpoint."""


class NotFound(QuotadError):
    """404: ``unknown_subject``, ``unknown_plan``, ``unknown_limit``,
    ``unknown_reservation``, ``unknown_version`` (a policy version no longer
    kept), or ``not_found`` for an endpoint this quotad does not serve."""


class Conflict(QuotadError):
    """409: ``idempotency_conflict`` (a key reused with another body),
    ``reservation_finished``, ``plan_in_use`` (a plan still assigned to
    subjects, or the default plan, cannot be removed) or ``policy_from_file``
    (the daemon takes its policy from its config file, not the API)."""


class PreconditionFailed(QuotadError):
    """412: ``version_mismatch``: a policy write's ``if_version`` is not the
    version in force (someone else changed the policy). Read it again and
    reapply the change."""


class PayloadTooLarge(QuotadError):
    """413: the body is above ``server.max_body_bytes`` (or
    ``server.max_batch_bytes`` for a batch)."""


class Unavailable(QuotadError):
    """quotad could not be reached, timed out, or answered 503 (nothing was
    applied) after the client's retries. ``status`` is ``None`` when no
    answer came at all."""


class Denied(Exception):
    """A reservation (or a decision you asked to raise) was denied.

    ``.decision`` is the full :class:`~quotad.Decision`: its ``reasons``,
    ``retry_after_ms`` and rate-limit headers say why and for how long.
    Not a :class:`QuotadError` subclass, on purpose (see the module doc).
    """

    def __init__(self, decision: "Decision") -> None:
        self.decision = decision
        super().__init__(_denial_message(decision))

    @property
    def reasons(self):  # type: ignore[no-untyped-def]
        return self.decision.reasons

    @property
    def retry_after_ms(self) -> Optional[int]:
        return self.decision.retry_after_ms


def _denial_message(d: "Decision") -> str:
    parts = []
    for r in d.reasons:
        text = f"{r.limit}: {r.code}" if r.limit else r.code
        if r.retry_after_ms is not None:
            text += f" (retry in {r.retry_after_ms} ms)"
        parts.append(text)
    why = "; ".join(parts) if parts else "no reason given"
    extra = " [fallback: quotad unavailable]" if d.fallback else ""
    return f"quotad denied {d.subject!r}: {why}{extra}"


_BY_STATUS: Dict[int, Type[QuotadError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_from_response(
    status: int,
    content: bytes,
    headers: Optional[Mapping[str, str]] = None,
    *,
    method: Optional[str] = None,
    path: Optional[str] = None,
) -> QuotadError:
    """Builds the exception for an error answer (status >= 400)."""
    body: Any = None
    code = f"http_{status}"
    message = ""
    try:
        body = json.loads(content.decode("utf-8")) if content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")
    if not message:
        text = content.decode("utf-8", "replace").strip() if content else ""
        message = text[:300] if text else f"quotad answered HTTP {status} with no error body"
    cls = _BY_STATUS.get(status, QuotadError)
    return cls(message, status=status, code=code, body=body, method=method, path=path)
