"""HTTP for the OpenAI-compatible backend: the client, its errors, and the one retry policy.

``retrying(policy)`` is where every request to the servers is retried (a
completion, loading an adapter, the start-up check), through tenacity: a
``Retryable`` failure (429, 5xx and the other transient statuses, timeouts,
dropped connections, unreadable replies) is tried again up to
``policy.max_retries`` times with exponential backoff and jitter, or after
the server's ``Retry-After`` when it sends one. Other failures are not
retried. A fleet (``tandem.lm.openai_fleet``) passes its own ``stop`` and
``skip_wait``: a retry that goes to another server that is in service does
not wait. Errors are ``LMError`` subclasses naming the URL and the reply.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable

import tenacity

from tandem.lm.protocol import LMError, LMUnavailable

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


class ServersDown(ServerUnavailable, LMUnavailable):
    """Retries ran out and no server (of one, or of a fleet) is in service: the run stops."""


class AdapterNotServed(ServerError):
    """The server cannot serve the LoRA adapter (LoRA or runtime loading not enabled)."""


class FleetMismatch(ServerError):
    """The servers of a fleet do not serve the same model."""


class Retryable(Exception):
    """A failure worth another try: ``what`` happened, the HTTP ``status`` (None: no reply), the
    server's ``Retry-After`` in seconds; ``down``: the server is not there (refused or dropped
    the connection), as opposed to slow or failing."""

    def __init__(self, what: str, status: int | None = None, retry_after: float | None = None, *,
                 down: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.status = status
        self.retry_after = retry_after
        self.down = down


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
        return Retryable(f"cannot connect ({exc})", down=True)
    return Retryable(f"connection failed ({type(exc).__name__}: {exc})", down=True)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    backoff: float = 0.5  # seconds before the first retry (before jitter)
    max_backoff: float = 30.0


def retrying(policy: RetryPolicy, what: str, *, stop: Callable[[tenacity.RetryCallState], bool] | None = None,
             skip_wait: Callable[[], bool] | None = None) -> tenacity.Retrying:
    """A tenacity ``Retrying`` for ``policy``; it raises ``tenacity.RetryError`` when the tries run out.

    ``stop(state)``: when to give up instead of after ``policy.max_retries`` retries;
    ``skip_wait()``: true when the next try may go at once (another server is free)."""
    expo = tenacity.wait_exponential(multiplier=policy.backoff, max=policy.max_backoff)

    def wait(state: tenacity.RetryCallState) -> float:
        if skip_wait is not None and skip_wait():
            return 0.0
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
        stop=stop if stop is not None else tenacity.stop_after_attempt(policy.max_retries + 1),
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


def list_models(client, base_url: str, timeout: float) -> list[str] | None:
    """The model ids a server lists at ``/models``; None when it has no such endpoint (it may still
    complete). Raises ``Retryable`` when it does not answer, ``RequestRejected`` on 401/403."""
    import httpx

    url = f"{base_url}/models"
    try:
        resp = client.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        raise transport_failure(exc, timeout) from None
    if resp.status_code == 404:
        return None
    if resp.status_code in (401, 403):
        raise RequestRejected(f"{url}: HTTP {resp.status_code}: {resp.text[:200]!r}; set api_key or OPENAI_API_KEY",
                              url=url, status=resp.status_code)
    if resp.status_code >= 400:
        raise Retryable(f"HTTP {resp.status_code}: {resp.text[:200]!r}", resp.status_code)
    try:
        return [m.get("id") for m in (resp.json().get("data") or [])]
    except (ValueError, AttributeError):
        return None
