"""The HTTP app of ``tandem serve``: routes, running the program per request, and replies.

``create_app(program)`` builds a FastAPI app around one program; ``docs/serving.md`` has every
endpoint, example and error code. It needs no socket (``fastapi.testclient.TestClient(app)``
drives it in-process); ``tandem.serve.serve`` loads a saved program and runs it on uvicorn.

- **Inputs.** The program's top-level input fields (``program_input_fields``) become a pydantic
  model when the app is built: every request is checked against it (missing, unknown and
  non-scalar fields, and numbers that are not finite, are a 422) before the program runs.
- **Concurrency.** Program calls run in a thread pool, never on the event loop and never one
  at a time: concurrent requests (and the items of one batch request) reach the LM backend
  together, and the backend's dispatcher hands them to the engine as one batch.
- **Errors.** Every error is JSON ``{"error": {"type", "message", ...}}``. Tracebacks go to the
  server log only, under a request id that the reply names.
- **Request log and feedback** (``request_log``, ``tandem.serve_log``): every program call is
  written (and committed) before its reply is sent; ``POST /v1/feedback`` adds a label or a
  score to a logged request.
- **Reload** (``reloader``): ``POST /v1/reload`` (or ``app.state.reload()``, which ``serve``
  calls on SIGHUP) loads the program again and swaps it in; requests in flight finish on the
  program they started with, and none is refused meanwhile.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tandem serve needs fastapi and uvicorn: pip install 'tandem[serve]' ({exc})") from exc

from tandem.lm.base import ContextLengthError, LMError
from tandem.program.fields import program_input_fields, program_label_fields
from tandem.program.module import Module
from tandem.program.program_file import lm_reference
from tandem.program.render import ParseError
from tandem.program.trace import trace
from tandem.serve_http import BodyLimit, error_body
from tandem.serve_inputs import BODY_KEYS, check_feedback, describe_validation_error, request_models
from tandem.serve_log import RequestLog, UnknownRequest

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
MAX_BATCH_ITEMS = 64  # items in one /v1/predict_batch request
MAX_CONCURRENCY = 64  # program calls running at once: enough to fill the engine's batch
TIMEOUT_S = 600.0  # one program call; the reply is a 504 after this (the call itself is not stopped)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _public_ref(ref: dict | None) -> dict | None:
    """The LM reference without secrets."""
    if ref is None:
        return None
    return {k: v for k, v in ref.items() if "key" not in k.lower() and "token" not in k.lower()}


def _outcome_of(exc: BaseException, request_id: str) -> tuple[int, dict]:
    """HTTP status and error body for an exception raised by the program."""
    if isinstance(exc, ParseError):
        return 502, error_body(
            "parse_error", f"the model's reply could not be parsed: {exc}",
            missing=list(exc.missing), completion=exc.completion[-4000:],
        )
    if isinstance(exc, ContextLengthError):
        return 422, error_body("context_length", str(exc))
    if isinstance(exc, LMError):
        log.error("request %s: the LM backend failed: %s", request_id, exc, exc_info=exc)
        return 502, error_body(
            "lm_error", f"the model backend failed ({type(exc).__name__}); see the server log, request {request_id}",
            request_id=request_id,
        )
    log.error("request %s: the program raised %s", request_id, type(exc).__name__, exc_info=exc)
    return 500, error_body(
        "program_error", f"the program raised {type(exc).__name__}; see the server log, request {request_id}",
        request_id=request_id,
    )


class Served:
    """The program the app serves now, its version, and what ``/health`` and ``/v1/program`` say of it."""

    def __init__(self, program: Module, version: str) -> None:
        self.program, self.version = program, version
        cls = type(program)
        self.path = f"{cls.__module__}:{cls.__qualname__}"
        self.predictors = program.named_predictors()
        self.refs = {pname: _public_ref(lm_reference(p.lm)) for pname, p in self.predictors}
        self.first_ref = next(iter(self.refs.values()), None)


def _shape(program: Module) -> tuple[list, list, str]:
    """What a reloaded program must keep: its input fields, label fields and class."""
    fields, _ = program_input_fields(program)
    labels = program_label_fields(program)
    cls = type(program)
    return ([(f.name, f.required) for f in fields], [(s.name, s.choices) for s in labels],
            f"{cls.__module__}:{cls.__qualname__}")


def create_app(
    program: Module,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    name: str | None = None,
    max_batch_items: int = MAX_BATCH_ITEMS,
    max_concurrency: int = MAX_CONCURRENCY,
    timeout_s: float | None = TIMEOUT_S,
    version: str | None = None,
    request_log: RequestLog | None = None,
    reloader: Callable[[], tuple[Module, str]] | None = None,
) -> FastAPI:
    """The HTTP app for ``program``; see ``docs/serving.md``.

    The program's LMs are used as they are: ``serve`` starts them before
    the app listens and closes them after; a caller of ``create_app`` owns them.
    ``version`` names the program in replies and the log; ``request_log`` records every call and
    takes feedback; ``reloader()`` returns ``(program, version)`` to serve next (its LMs started).
    """
    fields, source = program_input_fields(program)
    labels = program_label_fields(program)
    timeout_s = timeout_s if timeout_s and timeout_s > 0 else None  # 0 or None: no limit
    PredictRequest, BatchRequest = request_models(fields, max_batch_items)
    state = {"served": Served(program, version or "unversioned")}
    name = name or type(program).__name__
    executor: dict[str, ThreadPoolExecutor] = {}
    reload_lock = threading.Lock()

    def pool(kind: str = "pool") -> ThreadPoolExecutor:
        if kind not in executor:  # program calls; log writes (not queued behind program calls)
            executor[kind] = ThreadPoolExecutor(max_concurrency if kind == "pool" else 8,
                                                thread_name_prefix=f"tandem-{kind}")
        return executor[kind]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        for kind in list(executor):
            executor.pop(kind).shutdown(wait=kind == "log", cancel_futures=kind != "log")

    app = FastAPI(title=f"tandem: {name}", version="1", lifespan=lifespan,
                  description=f"Runs the saved program {state['served'].path}. See docs/serving.md.")

    def reload() -> dict:
        """Load the program again (``reloader``) and serve it from the next request on; the one served
        stays when loading fails or the new one takes other input or label fields (a ValueError)."""
        if reloader is None:
            raise ValueError("this server was started without a program folder to reload from")
        with reload_lock:
            old = state["served"]
            new_program, new_version = reloader()
            was, now = _shape(old.program), _shape(new_program)
            for what, a, b in zip(("input fields", "label fields", "program class"), was, now):
                if a != b:
                    raise ValueError(f"the new program has other {what} ({b}, served: {a}); a server keeps its "
                                     "request format: start a new server for it")
            state["served"] = Served(new_program, new_version)
        log.warning("reloaded: serving program version %s (was %s)", new_version, old.version)
        return {"program_version": new_version, "previous_version": old.version}

    app.state.reload = reload

    def call_program(served: Served, inputs: dict) -> tuple[dict | None, dict, BaseException | None]:
        """(outputs, usage, None), or (None, usage, the exception): a failed call spent tokens too."""
        with trace() as t:
            try:
                pred = served.program(**inputs)
            except Exception as exc:  # noqa: BLE001 - reported by run_one
                return None, t.usage.to_dict(), exc
        return {k: _jsonable(v) for k, v in dict(pred).items()}, t.usage.to_dict(), None

    async def answer(inputs: dict, served: Served, request_id: str) -> tuple[int, dict]:
        start = time.perf_counter()
        fut = pool().submit(call_program, served, inputs)
        try:
            outputs, usage, exc = await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except asyncio.TimeoutError:
            log.error("request %s: no answer after %s s", request_id, timeout_s)
            return 504, error_body("timeout", f"the program did not answer within {timeout_s} s",
                                   request_id=request_id)
        latency = round(time.perf_counter() - start, 4)
        if exc is not None:
            status, body = _outcome_of(exc, request_id)
            return status, {**body, "usage": usage, "latency_s": latency}
        return 200, {"outputs": outputs, "usage": usage, "latency_s": latency}

    async def run_one(inputs: dict, endpoint: str) -> tuple[int, dict]:
        served = state["served"]  # a reload meanwhile does not change this request's program
        request_id = uuid.uuid4().hex[:16]
        received = time.time()
        status, body = await answer(inputs, served, request_id)
        body = {**body, "request_id": request_id, "program_version": served.version}
        if request_log is not None:  # on disk before the reply is sent
            try:
                await asyncio.wrap_future(pool("log").submit(
                    request_log.record, request_id, received, endpoint, inputs, status, body.get("outputs"),
                    body.get("error"), body.get("usage"), body.get("latency_s"), served.version))
            except Exception as exc:  # noqa: BLE001 - the reply says so; the details go to the server log
                log.error("request %s: writing the request log failed: %s", request_id, exc, exc_info=exc)
                return 500, error_body("log_error", "the answer could not be written to the request log; see the "
                                       f"server log, request {request_id}", request_id=request_id)
        return status, body

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        key = BODY_KEYS.get(request.url.path)
        details = [dict(zip(("field", "message"), describe_validation_error(e, fields, key))) for e in exc.errors()]
        message = "; ".join(d["message"] for d in details[:5]) + ("; ..." if len(details) > 5 else "")
        return JSONResponse(error_body("invalid_request", message, details=details,
                                       input_fields=[f.name for f in fields]), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        status, body = _outcome_of(exc, uuid.uuid4().hex[:12])
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health() -> dict:
        served = state["served"]
        return {
            "status": "ok", "name": name, "program": served.path, "program_version": served.version,
            "model": served.first_ref, "adapter": (served.first_ref or {}).get("adapter"),
            "predictors": served.refs, "request_log": request_log is not None,
        }

    @app.get("/v1/program")
    async def describe() -> dict:
        served = state["served"]
        return {
            "name": name, "program": served.path, "program_version": served.version,
            "input_fields": [{"name": f.name, "required": f.required, "desc": f.desc} for f in fields],
            "input_fields_from": source,
            "predictors": [
                {
                    "name": pname,
                    "inputs": [{"name": f.name, "desc": f.desc} for f in p.signature.input_fields],
                    "outputs": [{"name": f.name, "desc": f.desc, **({"choices": list(f.choices)} if f.choices else {})}
                                for f in p.signature.output_fields],
                    "demos": len(p.demos),
                    "model": served.refs[pname],
                }
                for pname, p in served.predictors
            ],
            "label_fields": [{"name": s.name, **({"choices": list(s.choices)} if s.choices else {})} for s in labels],
            "limits": {"max_body_bytes": max_body_bytes, "max_batch_items": max_batch_items,
                       "max_concurrency": max_concurrency, "timeout_s": timeout_s},
        }

    async def predict(body: PredictRequest) -> JSONResponse:
        status, result = await run_one(body.inputs.model_dump(by_alias=True, exclude_unset=True), "/v1/predict")
        return JSONResponse(result, status_code=status)

    async def predict_batch(body: BatchRequest) -> JSONResponse:
        start = time.perf_counter()
        done = await asyncio.gather(*(run_one(item.model_dump(by_alias=True, exclude_unset=True), "/v1/predict_batch")
                                      for item in body.items))
        results = [{"status": status, **result} for status, result in done]
        return JSONResponse({
            "results": results,
            "n_ok": sum(1 for s, _ in done if s == 200),
            "n_failed": sum(1 for s, _ in done if s != 200),
            "latency_s": round(time.perf_counter() - start, 4),
        })

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        if request_log is None:
            return JSONResponse(error_body("no_log", "this server keeps no request log, so it takes no feedback; "
                                           "start it with tandem serve ... --log DIR"), status_code=404)
        try:
            fb = check_feedback(json.loads(await request.body() or b"null"), labels)
        except ValueError as exc:  # not JSON (json's errors are ValueErrors too), or not a feedback
            message = str(exc) if not isinstance(exc, json.JSONDecodeError) else f"the body is not valid JSON ({exc})"
            return JSONResponse(error_body("invalid_request", message,
                                           label_fields=[s.name for s in labels]), status_code=422)
        try:
            count = await asyncio.wrap_future(pool("log").submit(
                request_log.add_feedback, fb["request_id"], label=fb["label"], score=fb["score"],
                comment=fb["comment"]))
        except UnknownRequest as exc:
            return JSONResponse(error_body("unknown_request", f"{exc}; feedback needs the request_id of an "
                                           "answered request"), status_code=404)
        return JSONResponse({"request_id": fb["request_id"], "label": fb["label"], "score": fb["score"],
                             "feedback_count": count})

    @app.post("/v1/reload")
    async def reload_route() -> JSONResponse:
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, reload)
        except Exception as exc:  # noqa: BLE001 - the served program stays; the reply says why
            log.error("reload failed: %s", exc)
            return JSONResponse(error_body("reload_failed", f"{exc}; still serving version "
                                           f"{state['served'].version}"), status_code=409)
        return JSONResponse(result)

    # The request models are built above, at run time: register the handlers with them explicitly.
    predict.__annotations__["body"] = PredictRequest
    predict_batch.__annotations__["body"] = BatchRequest
    app.post("/v1/predict")(predict)
    app.post("/v1/predict_batch")(predict_batch)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
