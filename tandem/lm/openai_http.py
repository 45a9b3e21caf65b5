"""HTTP for the OpenAI-compatible backend: the client, its errors, and the one retry policy.

``retrying(policy)`` is where every request to the server is retried (a
completion, loading an adapter, the start-up check), through tenacity: a
``Retryable`` failure (429, 5xx and the other transient statuses, timeouts,
dropped connections, unreadable replies) is tried again up to
``policy.max_retries`` times with exponential backoff and jitter, or after
the server's ``Retry-After`` when it sends one. Other failures are not
retried. Errors are ``LMError`` subclasses naming the URL and the reply.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import tenacity

from tandem.lm.protocol import LMError

log = logging.getLogger(__name__)

#: Statuses worth another try (with every 5xx).
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
#: The longest ``Retry-After`` honoured, in seconds.
MAX_RETRY_AFTER = 300.0


class ServerError(LMError):
    """The server did not produce a completion. ``status`` is the last HTTP status (None: no reply)."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class ServerUnavailable(ServerError):
    """Retries ran out: connection refused, timeouts, 429 or 5xx every time."""


class RequestRejected(ServerError):
    """The server refused the request (a 4xx other than 408/409/425/429); not retried."""


class AdapterNotServed(ServerError):
    """The server cannot serve the LoRA adapter (LoRA or runtime loading not enabled)."""


class Retryable(Exception):
    """A failure worth another try: ``what`` happened, the HTTP ``status`` (None: no reply), the
    server's ``Retry-After`` in seconds."""

    def __init__(self, what: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def transport_failure(exc: Exception, timeout: float) -> Retryable:
    """An httpx transport error as a ``Retryable`` with a readable ``what``."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return Retryable(f"timed out after {timeout:g} s ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return Retryable(f"cannot connect ({exc})")
    return Retryable(f"connection failed ({type(exc).__name__}: {exc})")


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    backoff: float = 0.5  # seconds before the first retry (before jitter)
    max_backoff: float = 30.0


def retrying(policy: RetryPolicy, what: str) -> tenacity.Retrying:
    """A tenacity ``Retrying`` for ``policy``; it raises ``tenacity.RetryError`` when the tries run out."""
    expo = tenacity.wait_exponential(multiplier=policy.backoff, max=policy.max_backoff)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(MAX_RETRY_AFTER, after) + random.uniform(0, 0.1 * policy.backoff)
        return expo(state) * random.uniform(0.5, 1.0)

    def note(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info("%s: %s; retry %d of %d in %.2f s", what, exc, state.attempt_number, policy.max_retries,
                 state.upcoming_sleep)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Retryable),
        stop=tenacity.stop_after_attempt(policy.max_retries + 1),
        wait=wait,
        before_sleep=note,
    )


def last_failure(err: tenacity.RetryError) -> tuple[Retryable, int]:
    """The last ``Retryable`` of a run of tries, and how many tries there were."""
    exc = err.last_attempt.exception()
    assert isinstance(exc, Retryable)
    return exc, err.last_attempt.attempt_number


class Transport:
    """The HTTP client and the worker threads, shared by an LM and its adapter copies."""

    def __init__(self, max_concurrency: int, timeout: float, headers: dict[str, str]) -> None:
        import httpx

        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            headers=headers,
        )
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="tandem-openai")
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
