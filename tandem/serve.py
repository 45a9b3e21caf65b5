"""Serve a saved program over HTTP: ``tandem serve RUN_DIR``.

    tandem serve runs/iris-pwp-s0                 # the run's final/ program, on 127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}}'

A JSON API (FastAPI on uvicorn) around one program; ``docs/serving.md`` has
every endpoint, example and error code. ``create_app(program)`` builds the
app (tests drive it without the CLI); ``serve(path, ...)`` loads a saved
program, starts its engines and runs uvicorn.

- **Inputs.** The program's top-level input fields (``program_input_fields``)
  become a pydantic model when the app is built: every request is checked
  against it (missing, unknown and non-scalar fields are a 422) before the
  program runs.
- **Concurrency.** Program calls run in a thread pool, never on the event
  loop and never one at a time: concurrent requests (and the items of one
  batch request) reach the LM backend together, and the backend's
  dispatcher hands them to the engine as one batch.
- **Errors.** Every error is JSON ``{"error": {"type", "message", ...}}``.
  Tracebacks go to the server log only, under a request id that the reply
  names.
"""

import asyncio
import inspect
import ipaddress
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Union

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model
    from pydantic_core import PydanticCustomError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tandem serve needs fastapi and uvicorn: pip install 'tandem[serve]' ({exc})") from exc

from tandem.lm.base import ContextLengthError, LMError
from tandem.program.module import Module
from tandem.program.persist import lm_reference, load_program, read_program_file, resolve_program_dir
from tandem.program.render import ParseError
from tandem.program.trace import trace

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
MAX_BATCH_ITEMS = 64  # items in one /v1/predict_batch request
MAX_CONCURRENCY = 64  # program calls running at once: enough to fill the engine's batch
TIMEOUT_S = 600.0  # one program call; the reply is a 504 after this (the call itself is not stopped)


# -- the program's inputs ---------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    required: bool = True
    desc: str = ""


def program_input_fields(program: Module) -> tuple[list[InputSpec], str]:
    """The fields a request's ``inputs`` must hold, and where they came from.

    In this order:

    1. ``"declared"``: the program (class or instance) has ``input_fields = ("question", ...)``;
    2. ``"forward"``: ``forward`` names its parameters (``def forward(self, question, k=3)``)
       and takes no ``*args``/``**kwargs``; parameters with a default are optional;
    3. ``"predictor"``: the input fields of the only predictor, or of the first one
       (``named_predictors`` order) when there are several.

    Descriptions come from the predictors' fields of the same name.
    """
    preds = program.named_predictors()
    descs: dict[str, str] = {}
    for _, p in reversed(preds):
        descs.update({f.name: f.desc for f in p.signature.input_fields if f.desc})

    declared = getattr(program, "input_fields", None)
    if declared is not None:
        if isinstance(declared, str) or not all(isinstance(n, str) and n.isidentifier() for n in declared):
            raise TypeError(f"{type(program).__name__}.input_fields must be a tuple of field names, not {declared!r}")
        return [InputSpec(n, True, descs.get(n, "")) for n in declared], "declared"

    from tandem.program.predict import Predict

    forward = type(program).forward
    if forward is not Module.forward and forward is not Predict.forward:
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
        kinds = {p.kind for p in params}
        if params and not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            return [InputSpec(p.name, p.default is inspect.Parameter.empty, descs.get(p.name, ""))
                    for p in params], "forward"

    if not preds:
        raise TypeError(
            f"{type(program).__name__} has no predictors and declares no input_fields; "
            "set input_fields = ('name', ...) on the class"
        )
    return [InputSpec(f.name, True, f.desc) for f in preds[0][1].signature.input_fields], "predictor"


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        kind = {bool: "a boolean", type(None): "null", dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
        raise PydanticCustomError("scalar_type", "must be a string or a number, not {kind}", {"kind": kind})
    return value


# A field value: a string or a number (passed to the program as is; prompts show str(value)).
Scalar = Annotated[Union[StrictStr, StrictInt, StrictFloat], BeforeValidator(_scalar)]


def inputs_model(fields: list[InputSpec]) -> type[BaseModel]:
    """A pydantic model of the inputs. Python names are ``f0, f1, ...`` with the field names as
    aliases, so that a field may be called ``json`` or ``model_config`` without clashing."""
    spec = {
        f"f{i}": (Scalar, Field(... if f.required else None, alias=f.name, description=f.desc or None))
        for i, f in enumerate(fields)
    }
    return create_model("ProgramInputs", __config__=ConfigDict(extra="forbid"), **spec)


# -- results and errors -----------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def error_body(kind: str, message: str, **extra: Any) -> dict:
    return {"error": {"type": kind, "message": message, **extra}}


def _describe_validation_error(err: dict) -> tuple[str, str]:
    """(field, message) for one pydantic error, in the words of this API."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "", f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    if kind == "missing":
        if len(loc) <= 1:
            return where, f"missing {where!r} in the body"
        return where, f"missing input field {loc[-1]!r}"
    if kind == "extra_forbidden":
        if len(loc) <= 1:
            return where, f"unknown key {where!r} in the body"
        return where, f"unknown input field {loc[-1]!r}"
    if kind == "scalar_type":
        return where, f"input field {loc[-1]!r} {err.get('msg')}"
    if kind in ("model_attributes_type", "dict_type") and len(loc) <= 1:
        return where, (f"{where} must be a JSON object" if where else
                       "the body must be a JSON object, sent with content-type application/json")
    return where, f"{where or 'body'}: {err.get('msg')}"


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


# -- body size --------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a 413 for a declared Content-Length over the limit (before the body is
    read) and for a body that turns out longer (chunked uploads); otherwise the app gets the
    body as it came."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await self._reply(scope, receive, send, 400,
                                  error_body("invalid_request", "Content-Length is not a number"))
                return
            if n > self.max_bytes:
                await self._too_large(scope, receive, send, f"{n} bytes")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, f"over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: str) -> None:
        await self._reply(scope, receive, send, 413, error_body(
            "body_too_large", f"the body is {size}; this server accepts at most {self.max_bytes} bytes",
            max_body_bytes=self.max_bytes))

    @staticmethod
    async def _reply(scope, receive, send, status: int, body: dict) -> None:
        await JSONResponse(body, status_code=status)(scope, receive, send)


# -- the app ----------------------------------------------------------------------------------
def create_app(
    program: Module,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    name: str | None = None,
    max_batch_items: int = MAX_BATCH_ITEMS,
    max_concurrency: int = MAX_CONCURRENCY,
    timeout_s: float | None = TIMEOUT_S,
) -> FastAPI:
    """The HTTP app for ``program``; see ``docs/serving.md``.

    The program's LMs are used as they are: ``serve`` starts them before
    the app listens and closes them after; a caller of ``create_app`` owns them.
    """
    fields, source = program_input_fields(program)
    timeout_s = timeout_s if timeout_s and timeout_s > 0 else None  # 0 or None: no limit
    Inputs = inputs_model(fields)
    PredictRequest = create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid"), inputs=(Inputs, ...))
    BatchRequest = create_model(
        "PredictBatchRequest", __config__=ConfigDict(extra="forbid"),
        items=(list[Inputs], Field(..., min_length=1, max_length=max_batch_items)))
    cls = type(program)
    program_path = f"{cls.__module__}:{cls.__qualname__}"
    name = name or cls.__name__
    predictors = program.named_predictors()
    refs = {pname: _public_ref(lm_reference(p.lm)) for pname, p in predictors}
    first_ref = next(iter(refs.values()), None)
    executor: dict[str, ThreadPoolExecutor] = {}

    def pool() -> ThreadPoolExecutor:
        if "pool" not in executor:
            executor["pool"] = ThreadPoolExecutor(max_concurrency, thread_name_prefix="tandem-serve")
        return executor["pool"]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        ex = executor.pop("pool", None)
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"tandem: {name}", version="1", lifespan=lifespan,
                  description=f"Runs the saved program {program_path}. See docs/serving.md.")

    def call_program(inputs: dict) -> tuple[dict | None, dict, BaseException | None]:
        """(outputs, usage, None), or (None, usage, the exception): a failed call spent tokens too."""
        with trace() as t:
            try:
                pred = program(**inputs)
            except Exception as exc:  # noqa: BLE001 - reported by run_one
                return None, t.usage.to_dict(), exc
        return {k: _jsonable(v) for k, v in dict(pred).items()}, t.usage.to_dict(), None

    async def run_one(inputs: dict) -> tuple[int, dict]:
        request_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        fut = pool().submit(call_program, inputs)
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [dict(zip(("field", "message"), _describe_validation_error(e))) for e in exc.errors()]
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
        return {
            "status": "ok", "name": name, "program": program_path,
            "model": first_ref, "adapter": (first_ref or {}).get("adapter"),
            "predictors": refs,
        }

    @app.get("/v1/program")
    async def describe() -> dict:
        return {
            "name": name, "program": program_path,
            "input_fields": [{"name": f.name, "required": f.required, "desc": f.desc} for f in fields],
            "input_fields_from": source,
            "predictors": [
                {
                    "name": pname,
                    "inputs": [{"name": f.name, "desc": f.desc} for f in p.signature.input_fields],
                    "outputs": [{"name": f.name, "desc": f.desc, **({"choices": list(f.choices)} if f.choices else {})}
                                for f in p.signature.output_fields],
                    "demos": len(p.demos),
                    "model": refs[pname],
                }
                for pname, p in predictors
            ],
            "limits": {"max_body_bytes": max_body_bytes, "max_batch_items": max_batch_items,
                       "max_concurrency": max_concurrency, "timeout_s": timeout_s},
        }

    async def predict(body: PredictRequest) -> JSONResponse:
        status, result = await run_one(body.inputs.model_dump(by_alias=True, exclude_unset=True))
        return JSONResponse(result, status_code=status)

    async def predict_batch(body: BatchRequest) -> JSONResponse:
        start = time.perf_counter()
        done = await asyncio.gather(*(run_one(item.model_dump(by_alias=True, exclude_unset=True))
                                      for item in body.items))
        results = [{"status": status, **result} for status, result in done]
        return JSONResponse({
            "results": results,
            "n_ok": sum(1 for s, _ in done if s == 200),
            "n_failed": sum(1 for s, _ in done if s != 200),
            "latency_s": round(time.perf_counter() - start, 4),
        })

    # The request models are built above, at run time: register the handlers with them explicitly.
    predict.__annotations__["body"] = PredictRequest
    predict_batch.__annotations__["body"] = BatchRequest
    app.post("/v1/predict")(predict)
    app.post("/v1/predict_batch")(predict_batch)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def _public_ref(ref: dict | None) -> dict | None:
    """The LM reference without secrets."""
    if ref is None:
        return None
    return {k: v for k, v in ref.items() if "key" not in k.lower() and "token" not in k.lower()}


# -- loading and running ----------------------------------------------------------------------
def _import_user_task(program_dir: Path) -> None:
    """A run of a task file (``task = "my_task.py"``) saved a class of that file: import it first."""
    import json

    config = program_dir.parent / "config.json"
    try:
        task = json.loads(config.read_text()).get("task", "")
    except (OSError, ValueError, AttributeError):
        return
    if not (isinstance(task, str) and task.endswith(".py")):
        return
    if not read_program_file(program_dir)["program"].startswith("tandem_user_task_"):
        return
    from tandem.experiments.config import RunConfig, resolve_task

    for candidate in (Path(task), program_dir.parent / task):
        if candidate.exists():
            resolve_task(RunConfig(task=str(candidate)))
            return


def load_for_serving(path: str | os.PathLike, model_options: dict | None = None) -> tuple[Module, Path, str]:
    """(program, its directory, a name for it) from a run or program directory.

    ``model_options`` go to the backends (``load_program(lm_options=...)``); the call cache is
    off unless they say ``cache=True``: a server would otherwise write every request to disk.
    """
    program_dir = resolve_program_dir(path)
    _import_user_task(program_dir)
    options = {"cache": False, **(model_options or {})}
    program = load_program(program_dir, lm_options=options)
    name = program_dir.parent.name if program_dir.name == "final" else program_dir.name
    return program, program_dir, name or type(program).__name__


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now (a taken port fails before a model loads); uvicorn listens on it later."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port") from None
    sock.set_inheritable(True)
    return sock


def parse_model_options(items: list[str] | None) -> dict:
    """``["base_url=http://h:8000/v1", "tensor_parallel_size=2"]`` -> a dict; values are
    JSON when they parse as JSON (numbers, true/false, objects), else strings."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model option {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def serve(
    path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_options: dict | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch_items: int = MAX_BATCH_ITEMS,
    max_concurrency: int = MAX_CONCURRENCY,
    timeout_s: float | None = TIMEOUT_S,
    log_level: str = "info",
    info: Callable[[str], None] | None = None,
) -> None:
    """Load the program at ``path``, start its engines and serve it until interrupted."""
    import uvicorn

    say = info or log.warning
    program, program_dir, name = load_for_serving(path, model_options)
    if not is_loopback(host):
        say(f"listening on {host}: anyone who can reach this machine can run the model; "
            "tandem serve has no authentication (put a proxy with auth in front, or bind 127.0.0.1)")
    sock = bind_socket(host, port)
    lms = program.lms()
    try:
        for lm in lms:
            lm.start()
        app = create_app(program, max_body_bytes=max_body_bytes, name=name, max_batch_items=max_batch_items,
                         max_concurrency=max_concurrency, timeout_s=timeout_s)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30)  # sets up its logging
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info(
            "serving %s (%s) on http://%s:%d (Ctrl-C to stop)", name, program_dir, shown, port)
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
        for lm in lms:
            try:
                lm.close()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("closing %r failed: %s", lm, exc)
