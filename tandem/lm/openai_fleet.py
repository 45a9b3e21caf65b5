"""Several OpenAI-compatible servers of one model, used as one: a fleet.

    fleet = Fleet(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"], policy, list_models=...)
    completion = fleet.send(lambda url: post_once(url + "/completions"), what="/completions",
                            describe="model 'm', prompt ...", model="m")

The ``openai`` backend's ``base_url`` is one URL, a list of URLs, or URLs
separated by commas (``parse_base_urls``). One URL is a fleet of one and
behaves as a single server always did: its requests are retried on it.

Routing. A request goes to the server in service with the fewest requests in
flight (ties: the one sent fewest). A failed try goes to another server in
service that this request has not tried, at once; when there is none, to
the least busy again after the backoff (``tandem.lm.openai_http.retrying``).

Taking out and re-admission. A server that refuses or drops connections is
taken out at once; one that times out or answers 5xx is taken out after as
many failures in a row as one request's tries (``max_retries + 1``, at least
3). Its requests in flight fail and are sent to the others; a try that
failed because its server went out does not count against the request's
retries while another server is in service. After a cool-down (``cooldown``
seconds, doubled after each failed check, at most ``max_cooldown``) the next
request first checks the server (``GET /models`` must answer and list the
fleet's model) and puts it back in service when that passes. While every
server is out, requests try the out servers themselves, so one that comes
back is found by the next request.

Errors. When a request's retries run out and no server is in service,
``ServersDown`` (an ``LMUnavailable``: evaluations and runs stop on it, and a
run continues with ``--resume`` once a server answers); otherwise
``ServerUnavailable`` names the last server and failure (that request alone
failed). ``check(model)`` (at start, or before a fleet's first request)
lists every server's models: a server of a fleet that does not serve
``model`` is ``FleetMismatch``, naming every URL and what it serves. A
server that cannot serve one model (an adapter it cannot load,
``AdapterNotServed``) gets no more requests for that model, with a warning;
when no server can, that is the error.

Each request's completion comes back once, from the server that answered, so
the caller counts its usage once however often it was sent.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import tenacity

from tandem.lm.openai_http import (
    AdapterNotServed, FleetMismatch, RequestRejected, RetryPolicy, Retryable, ServersDown, ServerUnavailable,
    last_failure, retrying,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses that say "slow down", not "broken": never a reason to take a server out.
NOT_STRIKES = frozenset({408, 409, 425, 429})


def parse_base_urls(base_url: str | Sequence[str]) -> list[str]:
    """``base_url`` as a list of API roots: one URL, a list, or URLs separated by commas."""
    items = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"base_url: {item!r} is not a URL (give one URL, a list, or URLs separated by commas)")
        url = item.strip().rstrip("/")
        if not re.match(r"https?://[^/\s]", url):
            raise ValueError(f"base_url: {item.strip()!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
        if url in urls:
            raise ValueError(f"base_url lists {url} twice")
        urls.append(url)
    if not urls:
        raise ValueError("base_url is empty: give one URL, a list, or URLs separated by commas")
    return urls


@dataclass
class Server:
    """One server of a fleet and what the fleet knows of it."""

    url: str
    in_flight: int = 0
    sent: int = 0  # tries sent to it
    answered: int = 0  # requests it answered
    failures: int = 0  # tries that failed
    strikes: int = 0  # failures since its last answer
    out_until: float | None = None  # monotonic time of its next check; None: in service
    cooldown: float = 0.0  # the length of its current cool-down
    reason: str = ""  # why it was last taken out
    checking: bool = False

    @property
    def in_service(self) -> bool:
        return self.out_until is None


class Fleet:
    """The servers of one model; shared by an ``OpenAILM`` and its adapter copies. See the module docstring."""

    def __init__(self, urls: Sequence[str], policy: RetryPolicy, *, list_models: Callable[[str], list[str] | None],
                 cooldown: float = 5.0, max_cooldown: float = 60.0) -> None:
        self.servers = [Server(u) for u in urls]
        self.policy = policy
        self.strike_limit = max(3, policy.max_retries + 1)
        self.cooldown = float(cooldown)
        self.max_cooldown = max(float(max_cooldown), self.cooldown)
        self.list_models = list_models
        self.model: str | None = None  # what every server must list (set by check)
        self._cannot: dict[str, dict[str, AdapterNotServed]] = {}  # model -> url -> why not
        self._prepared: set[str] = set()
        self._model_locks: dict[str, threading.Lock] = {}
        self._checked = False
        self._mismatch: FleetMismatch | None = None
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stats(self) -> list[dict]:
        """Per server: its URL, requests answered, failed tries, requests in flight, whether it is in
        service and why not."""
        with self._lock:
            return [{"url": s.url, "answered": s.answered, "failures": s.failures, "in_flight": s.in_flight,
                     "in_service": s.in_service, "reason": s.reason} for s in self.servers]

    # -- the start-up check ------------------------------------------------------------
    def check(self, model: str, *, patient: bool) -> None:
        """List every server's models. ``patient`` (``start()``): retry each server that does not answer
        (it may be starting), and raise ``ServersDown`` when none does; else one try each, and a
        server that does not answer is taken out. A fleet server without ``model``: ``FleetMismatch``."""
        listed: dict[str, list[str] | None] = {}
        silent: dict[str, str] = {}
        for s in self.servers:
            try:
                if patient:
                    listed[s.url] = retrying(self.policy, f"{s.url}/models")(self.list_models, s.url)
                else:
                    listed[s.url] = self.list_models(s.url)
            except tenacity.RetryError as err:
                silent[s.url] = last_failure(err)[0].what
            except Retryable as exc:
                silent[s.url] = exc.what
        with self._lock:
            self.model = model
            self._checked = True
        if len(self.servers) > 1:
            wrong = [u for u, ids in listed.items() if ids is not None and model not in ids]
            if wrong:
                seen = "; ".join(f"{u} serves {ids}" if ids is not None else f"{u} lists no models"
                                 for u, ids in listed.items())
                self._mismatch = FleetMismatch(
                    f"the servers of the fleet do not all serve model {model!r}: {seen}; every server of a fleet "
                    f"must serve the same model under the same name (vLLM: --served-model-name {model})",
                    url=wrong[0])
                raise self._mismatch
        else:
            for u, ids in listed.items():
                if ids and model not in ids:
                    log.warning("%s/models lists %s, not %r; requests may fail", u, ids, model)
        for s in self.servers:
            if s.url in silent:
                with self._lock:
                    self._take_out(s, f"does not answer ({silent[s.url]})")
        if patient and len(silent) == len(self.servers):
            if len(self.servers) == 1:
                (u, why), = silent.items()
                raise ServersDown(f"{u}/models: the server does not answer ({why}); start it first (docs/servers.md)",
                                  url=f"{u}/models")
            whys = "; ".join(f"{u}/models ({why})" for u, why in silent.items())
            raise ServersDown(f"no server of the fleet answers: {whys}; start them first (docs/servers.md)",
                              url=f"{self.servers[0].url}/models")

    def ensure_checked(self, model: str) -> None:
        """``check(model)`` once, without waiting for silent servers (before a fleet's first request)."""
        if self._mismatch is not None:
            raise self._mismatch
        if self._checked:
            return
        with self._lock_for("check"):
            if not self._checked:
                self.check(model, patient=False)

    # -- before a model's first request: e.g. load an adapter on every server -------------
    def everywhere(self, model: str, fn: Callable[[str], None]) -> None:
        """``fn(url)`` once on every server in service, before ``model`` is first used. A server where it
        raises ``AdapterNotServed`` gets no requests for ``model``; one that fails otherwise is noted
        as any failed try (``fn`` runs again before its first request for ``model``)."""
        with self._lock_for(model):
            if model in self._prepared:
                return
            for s in self.servers:
                with self._lock:
                    skip = not s.in_service or s.url in self._cannot.get(model, {})
                if skip:
                    continue
                try:
                    fn(s.url)
                except AdapterNotServed as exc:
                    self._cannot_serve(s, model, exc)
                except Retryable as exc:
                    with self._lock:
                        self._failed(s, exc)
            self._prepared.add(model)

    # -- requests -----------------------------------------------------------------------
    def send(self, fn: Callable[[str], T], *, what: str, describe: str, model: str) -> T:
        """``fn(base_url)`` on the fleet's servers: routed, retried and failed over (module docstring).
        ``fn`` raises ``Retryable`` for a failed try; what else it raises reaches the caller."""
        tried: set[str] = set()
        counted = [0]
        last: list = [None, None]  # the last failed try: (server, Retryable)

        def other_free() -> bool:
            with self._lock:
                return any(s.in_service and s.url not in tried for s in self._able(model))

        retry = retrying(self.policy, f"{self.servers[0].url}{what}" if len(self.servers) == 1 else f"fleet {what}",
                         stop=lambda state: counted[0] > self.policy.max_retries, skip_wait=other_free)
        try:
            for attempt in retry:
                with attempt:
                    server = self._pick(model, tried)
                    try:
                        result = fn(server.url)
                    except Retryable as exc:
                        with self._lock:
                            went_out = self._failed(server, exc)
                            server.in_flight -= 1
                        tried.add(server.url)
                        last[:] = [server, exc]
                        if not (went_out and other_free()):
                            counted[0] += 1
                        raise
                    except AdapterNotServed as exc:
                        with self._lock:
                            server.in_flight -= 1
                        self._cannot_serve(server, model, exc)  # raises when no server can
                        raise Retryable(f"{server.url} cannot serve {model!r}") from None
                    except BaseException:
                        with self._lock:
                            server.in_flight -= 1
                        raise
                    with self._lock:
                        server.in_flight -= 1
                        self._answered(server)
                    return result
        except tenacity.RetryError as err:
            attempts = err.last_attempt.attempt_number
        server, exc = last
        if server is None:  # only servers that cannot serve the model: _cannot_serve raised already
            raise self._none_can(model)
        hint = ""
        if exc.status is None and "connect" in exc.what:
            hint = "; is the server running and is base_url right? (docs/servers.md)"
        with self._lock:
            able = self._able(model)
            down = not any(s.in_service for s in able)
            outs = "; ".join(f"{s.url} ({s.reason or 'out'})" for s in able)
        single = f"{server.url}{what}: {exc.what} (after {attempts} attempts; {describe}){hint}"
        if not down:
            raise ServerUnavailable(single, url=f"{server.url}{what}", status=exc.status, attempts=attempts)
        msg = single if len(self.servers) == 1 else (
            f"every server of the fleet is out after {attempts} attempts ({describe}): {outs}{hint}")
        raise ServersDown(msg, url=f"{server.url}{what}", status=exc.status, attempts=attempts)

    # -- internals (callers hold self._lock where noted) ----------------------------------
    def _lock_for(self, key: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(key, threading.Lock())

    def _able(self, model: str) -> list[Server]:
        """The servers that may serve ``model`` (lock held)."""
        cannot = self._cannot.get(model, {})
        return [s for s in self.servers if s.url not in cannot]

    def _pick(self, model: str, tried: set[str]) -> Server:
        """The server for the next try, counted in flight; a server due for re-admission is checked first."""
        while True:
            with self._lock:
                able = self._able(model)
                if not able:
                    raise self._none_can(model)
                now = time.monotonic()
                up = [s for s in able if s.in_service]
                due = next((s for s in able if not s.in_service and not s.checking and s.out_until <= now), None)
                if due is None or not up:
                    if up:
                        pool = [s for s in up if s.url not in tried] or up
                        server = min(pool, key=lambda s: (s.in_flight, s.sent))
                    else:  # every server is out: try them anyway, the least recently failed first
                        server = min(able, key=lambda s: (s.url in tried, s.out_until))
                    server.in_flight += 1
                    server.sent += 1
                    return server
                due.checking = True
            self._readmit(due)

    def _readmit(self, server: Server) -> None:
        """Check a server whose cool-down has passed: back in service, or out for longer."""
        try:
            ids = self.list_models(server.url)
            wrong = ids is not None and self.model is not None and self.model not in ids
            why = f"serves {ids}, not {self.model!r}" if wrong else ""
        except (Retryable, RequestRejected) as exc:
            why = f"the check failed ({exc})"
        with self._lock:
            server.checking = False
            if why:
                server.failures += 1
                self._extend(server, why)
            else:
                self._back(server)

    def _failed(self, server: Server, exc: Retryable) -> bool:
        """Note a failed try (lock held); True if the server is out of service now."""
        server.failures += 1
        if exc.status in NOT_STRIKES:
            return not server.in_service
        if not server.in_service:
            if server.out_until is not None and server.out_until <= time.monotonic():
                self._extend(server, exc.what)  # tried while every server was out, and failed again
            return True
        server.strikes += 1
        if exc.down or server.strikes >= self.strike_limit:
            self._take_out(server, exc.what)
            return True
        return False

    def _take_out(self, server: Server, why: str) -> None:
        """Out of service for one cool-down (lock held)."""
        if not server.in_service:
            return
        server.cooldown = self.cooldown
        server.out_until = time.monotonic() + server.cooldown
        server.reason = why
        left = sum(1 for s in self.servers if s.in_service)
        if len(self.servers) > 1:
            log.warning("server %s taken out of the fleet for %g s: %s; %d of %d in service", server.url,
                        server.cooldown, why, left, len(self.servers))

    def _extend(self, server: Server, why: str) -> None:
        """Still out: the next cool-down is twice as long (lock held)."""
        server.cooldown = min(self.max_cooldown, max(server.cooldown, self.cooldown) * 2)
        server.out_until = time.monotonic() + server.cooldown
        server.reason = why
        log.info("server %s still out (%s); next check in %g s", server.url, why, server.cooldown)

    def _back(self, server: Server) -> None:
        """Back in service (lock held)."""
        was_out = not server.in_service
        server.out_until, server.strikes, server.cooldown, server.reason = None, 0, 0.0, ""
        if was_out and len(self.servers) > 1:
            log.warning("server %s is back in the fleet", server.url)

    def _answered(self, server: Server) -> None:
        """A request answered (lock held): a server that answers is in service."""
        server.answered += 1
        server.strikes = 0
        if not server.in_service:
            self._back(server)

    def _cannot_serve(self, server: Server, model: str, exc: AdapterNotServed) -> None:
        """``server`` gets no more requests for ``model``; raises when no server can serve it."""
        with self._lock:
            self._cannot.setdefault(model, {})[server.url] = exc
            left = len(self._able(model))
        if len(self.servers) > 1:
            log.warning("server %s cannot serve %r and gets no requests for it (%d of %d can): %s", server.url,
                        model, left, len(self.servers), exc)
        if not left:
            raise self._none_can(model)

    def _none_can(self, model: str) -> AdapterNotServed:
        cannot = self._cannot.get(model, {})
        if len(self.servers) == 1:
            return next(iter(cannot.values()))
        whys = "; ".join(f"{u}: {e}" for u, e in cannot.items())
        return AdapterNotServed(f"no server of the fleet can serve {model!r}: {whys}", url=self.servers[0].url)
