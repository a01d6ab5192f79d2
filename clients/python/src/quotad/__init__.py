"""Python client for quotad, the quota / rate-limit / spend-control daemon.

    import quotad

    with quotad.Client("http://127.0.0.1:7878") as q:
        d = q.consume("user:42", event="llm.chat", amounts={"tokens": 1200})
        if not d.allowed:
            ...

See the README for reservations, errors, retries and ``on_unavailable``.
"""

from ._version import __version__
from .aio import AsyncClient, AsyncReservation, PendingReservation
from .client import Client, Reservation
from .errors import (
    Conflict,
    Denied,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotadError,
    Unauthorized,
    Unavailable,
)
from .models import (
    BatchItem,
    BatchResult,
    Breaker,
    Cost,
    Counter,
    Decision,
    Deleted,
    Event,
    EventPage,
    Finish,
    Flag,
    Plan,
    Plans,
    Reason,
    ReloadReport,
    Subject,
    SubjectEntry,
    SubjectPage,
    Usage,
    UsageBucket,
    UsagePage,
    UsageRow,
    Webhook,
)

__all__ = [
    "__version__",
    "Client",
    "AsyncClient",
    "Reservation",
    "AsyncReservation",
    "PendingReservation",
    "QuotadError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "Unavailable",
    "Denied",
    "Decision",
    "Counter",
    "Reason",
    "Cost",
    "Finish",
    "Subject",
    "Deleted",
    "SubjectEntry",
    "SubjectPage",
    "Plan",
    "Plans",
    "ReloadReport",
    "BatchItem",
    "BatchResult",
    "Event",
    "EventPage",
    "Webhook",
    "Breaker",
    "Flag",
    "Usage",
    "UsageBucket",
    "UsageRow",
    "UsagePage",
]
