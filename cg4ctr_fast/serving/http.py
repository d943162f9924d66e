"""The HTTP layer of `cg4ctr serve`: FastAPI routes over a `CreativeRuntime`, nothing else.

    app = create_app(runtime, api_key=None, max_body_bytes=MAX_BODY_BYTES, timeout_s=60.0)

Routes (JSON answers; every error is `{"error": "<one line>"}`):

    POST /v1/generate            multipart/form-data (file `image`, optional file `mask`, fields as below; repeat
                                 `prompts` / `group_ids` once per value) or JSON {product_id, prompts, group_ids,
                                 title, num_images_per_prompt, seed, timeout_s} for a stored product
    POST /v1/select              JSON {product_id, group_id, k, budget_ms}
    GET  /v1/creatives/{id}.png  the creative's PNG (content addressed: cached forever; HEAD too); its sha256 is
                                 checked against the id on every read (500 naming `cg4ctr store verify` if not)
    GET  /healthz                200 while the process answers (no key needed)
    GET  /readyz                 200 once the engines are loaded and warmed up, 503 before and while draining
    GET  /metrics                Prometheus text format

Errors → status: InputError 400 (its one line), NotFound 404, a missing or wrong API key 401, a body over
`max_body_bytes` 413 (Content-Length checked first, streamed bytes counted too), a body that stalls (no byte for
`body_timeout_s`) 408 and the connection closed, QueueFull 503 with Retry-After, RuntimeClosed 503,
DeadlineExceeded 504. User input never causes a 500. A client that disconnects while its generate request
waits has it cancelled (never run if not started); one that disconnects while sending its body is counted as
status 499 ("client closed request"), with nothing logged.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cg4ctr_fast.errors import InputError, check_utf8
from cg4ctr_fast.imaging import MAX_BYTES
from cg4ctr_fast.serving.errors import DeadlineExceeded, NotFound, QueueFull, RuntimeClosed
from cg4ctr_fast.serving.protocol import GenerateBody, GenerateResponse, SelectBody, parse_body, selection_response

__all__ = ["BODY_TIMEOUT_S", "BodyTimeout", "BodyTooLarge", "MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("cg4ctr_fast.serving")

# The largest image file accepted (imaging.MAX_BYTES, 64 MiB) plus 1 MiB for a mask, the form fields and the
# multipart boundaries; anything larger cannot be a valid request.
MAX_BODY_BYTES = MAX_BYTES + 2**20
# Routes open without the API key: a load balancer's liveness probe carries no secret.
_OPEN_PATHS = frozenset({"/healthz"})
# How long a request body may go without a byte before the server gives up on it (408), seconds: 30 s covers
# a phone on a bad link between packets; a stalled client then holds a connection no longer than that, and
# SIGTERM is never held up by it for longer either.
BODY_TIMEOUT_S = 30.0
# File parts one multipart request may carry before python-multipart refuses it: the product image and its
# mask are 2; the parser lets a few more through so that a repeated `image` or `mask` gets our own "given more
# than once" line (and a body of 100 file parts is still refused early).
_MAX_FILES = 8
_FILE_FIELDS = ("image", "mask")


class BodyTooLarge(Exception):
    """The request body is over the server's cap (HTTP 413)."""


class BodyTimeout(Exception):
    """The client sent no byte of its request body for the server's body timeout (HTTP 408)."""


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


async def _send_error(send, status: int, message: str, headers: Optional[dict] = None) -> None:
    """Answer from inside an ASGI middleware (before any route runs)."""
    response = _error(status, message, headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - a JSONResponse never reads the request
    return {"type": "http.disconnect"}


class _MetricsMiddleware:
    """Counts every answered request by route template and status (outermost: sees 401 and 413 too)."""

    def __init__(self, app, observer, routes=()):
        self.app, self.observer, self.routes = app, observer, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The template (`/v1/creatives/{creative_id}.png`), never the raw path: label values stay bounded.
            self.observer.http_request(self._route(scope), status, time.perf_counter() - started)

    def _route(self, scope) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing (401, 413): match the templates here
            from starlette.routing import Match

            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"


class _AuthMiddleware:
    """`Authorization: Bearer <key>` or `X-API-Key: <key>` on every route but /healthz; 401 otherwise."""

    def __init__(self, app, api_key: str, observer):
        self.app, self.key, self.observer = app, api_key.encode("utf-8"), observer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and not given:
                given = value.strip()
        # compare_digest: the time taken does not tell how many leading bytes of a guess were right.
        if not given or not hmac.compare_digest(given, self.key):
            self.observer.rejected("unauthorized")
            return await _send_error(send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                                     {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """413 for a body over `limit` bytes: a declared Content-Length is refused before a byte is read; a body
    without one (chunked) is counted as it streams and the route's read fails with BodyTooLarge. A body with
    no byte for `timeout_s` seconds fails the route's read with BodyTimeout (408): without it a client that
    stops half-way holds its connection, and a graceful shutdown, forever."""

    def __init__(self, app, limit: int, observer, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.observer, self.timeout_s = app, limit, observer, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, f"Content-Length {value[:40]!r} is not a number")
                if declared > self.limit:
                    self.observer.rejected("body_too_large")
                    return await _send_error(send, 413, self._message(declared))
        seen = 0
        complete = False

        async def counted():
            nonlocal seen, complete
            if complete:
                # After the body, receive() waits for the client to go away: no timeout on that wait.
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                self.observer.rejected("body_timeout")
                raise BodyTimeout(f"no byte of the request body arrived for {self.timeout_s:g} s "
                                  f"({seen} bytes received); send the whole body promptly") from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.observer.rejected("body_too_large")
                    raise BodyTooLarge(self._message(seen, at_least=True))
            return message

        return await self.app(scope, counted, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size} bytes, over the {self.limit}-byte limit "
                f"(images up to {MAX_BYTES // 2**20} MiB)")


def _read_hashed(path) -> tuple[bytes, str]:
    """(the file's bytes, their sha256 hex)."""
    import hashlib

    with open(path, "rb") as file:
        data = file.read()
    return data, hashlib.sha256(data).hexdigest()


class _StrictMultiPartParser(MultiPartParser):
    """starlette's MultiPartParser, but a text field that is not UTF-8 is refused in check_utf8's words
    (starlette falls back to Latin-1, which would store mojibake as the prompt, title or id)."""

    field_error = False

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                text = bytes(part.data).decode("utf-8", "surrogateescape")
                try:
                    check_utf8(text, part.field_name or "field")
                except InputError as exc:
                    self.field_error = True
                    raise MultiPartException(str(exc)) from None
        super().on_part_end()


async def _read_body(request: Request) -> bytes:
    chunks = []
    async for chunk in request.stream():
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive callable that hands `body` over once, then defers to the connection (for its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _until_disconnect(receive) -> None:
    # After the body, uvicorn's receive() blocks until the client goes away (or the response is sent).
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(runtime, *, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
               timeout_s: float = 60.0, observer=None, retry_after_s: float = 1.0,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `runtime` (a `CreativeRuntime`, or anything with its methods).

    api_key: when set, every route but /healthz needs it (401 otherwise). max_body_bytes: cap on a request
    body, bytes (413 over it). timeout_s: a generate request's deadline when it names none, seconds > 0.
    observer: the `PrometheusObserver` the runtime reports to (a fresh one when None; /metrics shows it).
    retry_after_s: the Retry-After of a 503 when the queue is full and the runtime suggests none, seconds.
    body_timeout_s: how long a request body may go without a byte before the answer is 408, seconds > 0.
    """
    from cg4ctr_fast.serving.metrics import PrometheusObserver

    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    if not (math.isfinite(body_timeout_s) and body_timeout_s > 0):
        raise ValueError(f"body_timeout_s must be a positive number of seconds, got {body_timeout_s}")
    # python-multipart logs a malformed body ("Expected boundary character 45, got 103 at index 2") as a
    # warning before raising; with no logging configured Python prints it bare on stderr. The client gets the
    # same words in its 400, so the server's log needs none of them.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    damaged_logged: set[str] = set()
    observer = observer if observer is not None else PrometheusObserver()
    app = FastAPI(title="cg4ctr serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime, app.state.observer = runtime, observer

    # -- errors → status (one line each) ---------------------------------------------------------------
    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError):
        return _error(404 if isinstance(exc, NotFound) else 400, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(413, str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request: Request, exc: BodyTimeout):
        # Connection: close: the rest of that body may still come, and it is not a next request.
        return _error(408, str(exc), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # The client left while sending its body: its request, not a server fault. 499 (nginx's "client
        # closed request") is counted in /metrics like the other disconnects and never reaches anyone.
        return _error(499, "client disconnected while sending the request body")

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        wait = getattr(exc, "retry_after_s", None) or retry_after_s
        return _error(503, str(exc), {"Retry-After": str(max(1, math.ceil(wait)))})

    @app.exception_handler(RuntimeClosed)
    async def _closed(request: Request, exc: RuntimeClosed):
        return _error(503, str(exc) or "the server is shutting down")

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded):
        return _error(504, str(exc) or "the request's deadline passed before it could start")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else \
            f"no route {request.method} {request.url.path}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = bool(getattr(runtime, "ready", False))
        body = {"ready": ready, "model_id": getattr(runtime, "model_id", None)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        payload, content_type = observer.exposition(runtime.queue_depth())
        return Response(payload, media_type=content_type)

    @app.api_route("/v1/creatives/{creative_id}.png", methods=["GET", "HEAD"])
    async def creative_png(creative_id: str):
        # image_path validates the id as 64 lowercase hex characters (no path traversal) and raises
        # InputError (400) or NotFound (404).
        path = runtime.store.image_path(creative_id)
        from starlette.concurrency import run_in_threadpool

        # The id is the file's sha256: checked on every read, so a file damaged on disk is never served as
        # this creative (hashing costs ~1 ms per MB at the 1.2 GB/s measured here; creative PNGs are < 50 MB).
        data, digest = await run_in_threadpool(_read_hashed, path)
        if digest != creative_id:
            if creative_id not in damaged_logged:  # once per creative, not once per request for it
                damaged_logged.add(creative_id)
                log.error("creative %s: the file %s has sha256 %s; run `cg4ctr store verify`", creative_id,
                          path, digest)
            return _error(500, f"creative {creative_id}: its stored file is damaged (sha256 does not match); the "
                               "operator should run `cg4ctr store verify`")
        # Content addressed: the bytes at this URL never change. HEAD: the same headers, no body.
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{digest}"'})

    @app.post("/v1/select")
    async def select(request: Request):
        body = parse_body(SelectBody, await _read_json(request))
        from starlette.concurrency import run_in_threadpool

        # A thread: a cold product reads SQLite and may score live; the event loop keeps answering meanwhile.
        selection = await run_in_threadpool(runtime.select, body.product_id, body.group_id, body.k, body.budget_ms)
        return selection_response(selection)

    @app.post("/v1/generate")
    async def generate(request: Request):
        arrived = time.monotonic()
        # Shed load before reading the body: under overload most requests are refused, and parsing their
        # multipart body and decoding their image on the event loop delays the accepted ones' answers (the
        # overload test's p99 of accepted requests: 3.8 s without this check, 1.1 s with it, 2 shared cores).
        # The runtime's own check stays the authority (a race past this one still gets QueueFull).
        limit = getattr(runtime, "max_queue", None)
        if isinstance(limit, int) and runtime.queue_depth() >= limit:
            observer.rejected("queue_full")
            observer.completed("queue_full", time.monotonic() - arrived)
            raise QueueFull(f"the queue is full ({limit} requests waiting); retry later",
                            retry_after_s=retry_after_s)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image = mask = None
        try:
            if kind == "multipart/form-data":
                body, image, mask = await _read_multipart(request)
            else:
                body = parse_body(GenerateBody, await _read_json(request))
        except InputError:
            observer.rejected("bad_input")
            raise
        from cg4ctr_fast.serving.runtime import GenerateRequest

        parsed = time.monotonic()
        timeout = body.timeout_s if body.timeout_s is not None else timeout_s
        generate_request = GenerateRequest(
            product_id=body.product_id, image=image, mask_image=mask, prompts=tuple(body.prompts),
            group_ids=tuple(body.group_ids), title=body.title, num_images_per_prompt=body.num_images_per_prompt,
            seed=body.seed, deadline=arrived + timeout,
        )
        task = asyncio.ensure_future(runtime.agenerate(generate_request))
        watcher = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if not task.done():
            # The client went away: cancelling drops the request if it has not started (never run); a started
            # one finishes and is stored, but nobody waits for its answer.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # 499 (nginx's "client closed request"): counted in /metrics, never seen by the departed client.
                return _error(499, "client disconnected before the answer")
        answer = GenerateResponse.from_result(task.result()).model_dump()
        # Server-Timing (W3C): where this request's time went on the server, ms, from the route's start: reading
        # and parsing the body, then the runtime (image decode in the executor, queue, batch); a client's own
        # latency minus their sum is time spent before the route ran (its connection, uvicorn) or client side.
        done = time.monotonic()
        timing = f"body;dur={1000 * (parsed - arrived):.1f}, runtime;dur={1000 * (done - parsed):.1f}"
        return JSONResponse(answer, headers={"Server-Timing": timing})

    async def _read_json(request: Request) -> bytes:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", ""):
            raise StarletteHTTPException(415, f"send JSON (Content-Type: application/json), not {kind}")
        return await _read_body(request)

    async def _read_multipart(request: Request):
        body = await _read_body(request)  # counted against the cap as it streams
        replayed = Request(request.scope, _replay(body, request.receive))
        parser = _StrictMultiPartParser(replayed.headers, replayed.stream(), max_files=_MAX_FILES,
                                        max_fields=1000)
        try:
            form = await parser.parse()
        except MultiPartException as exc:  # a malformed multipart body, or text that is not UTF-8
            message = exc.message
            if message.startswith("Too many files"):
                message = f"more than {_MAX_FILES} file parts; send `image` and optionally `mask`, once each"
            elif exc.__cause__ is not None:  # python-multipart's own words: where the body went wrong
                message = f"{message.rstrip('.')}: {exc.__cause__}"
            raise InputError(message if parser.field_error else f"multipart body: {message}") from None
        try:
            files: dict[str, bytes] = {}
            fields: dict[str, Any] = {}
            for name, value in form.multi_items():
                if hasattr(value, "read"):  # an UploadFile
                    if name not in _FILE_FIELDS:
                        raise InputError(f"{name}: unknown file field (send the product as `image`, its mask as "
                                         "`mask`)")
                    if name in files:
                        raise InputError(f"{name}: given more than once")
                    files[name] = await value.read()
                elif name in _FILE_FIELDS and name in files:
                    raise InputError(f"{name}: given more than once")
                elif name in ("prompts", "group_ids"):
                    fields.setdefault(name, []).append(value)
                else:
                    if name in fields:
                        raise InputError(f"{name}: given more than once")
                    fields[name] = value
            if "image" not in files:
                if "image" in form:
                    raise InputError("image: send the product image as a file part (curl -F image=@product.png)")
                raise InputError("image: required in a multipart request (or send JSON with a stored product_id)")
            return parse_body(GenerateBody, fields), files["image"], files.get("mask")
        finally:
            await form.close()

    # Middlewares, innermost first: the body cap, then the key, then the counts around everything.
    app.add_middleware(_BodyLimitMiddleware, limit=max_body_bytes, observer=observer, timeout_s=body_timeout_s)
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key, observer=observer)
    app.add_middleware(_MetricsMiddleware, observer=observer, routes=app.router.routes)
    return app
