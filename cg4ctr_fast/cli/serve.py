"""`cg4ctr serve`: the creative runtime behind HTTP (FastAPI + uvicorn, the `serve` extra).

    cg4ctr serve --preset tiny --store out/store [--host 127.0.0.1] [--port 8000] [--max-queue 64]
                 [--max-batch 32] [--timeout-s 60] [--api-key-file key.txt] [--reward DIR] [--groups FILE]
                 [--body-timeout-s 30] [--shutdown-timeout-s SECONDS]

Order of work: every flag and file is checked, the store opened (a store of another schema version is
refused) and the port bound, all before any model loads; bad input is one line and exit code 2. Then the
models load, the server answers (/healthz 200, /readyz 503), one line `... listening on http://HOST:PORT` goes
to stderr (port 0 picks a free port: this line names it), the runtime warms up in the background, and one
line `... ready` follows once /readyz says 200. SIGTERM (or Ctrl-C): stop accepting, let every request in
flight finish and get its answer, drain the runtime, exit 0 (130 for Ctrl-C). The wait for requests in flight
is bounded by --shutdown-timeout-s (default --timeout-s + 10 s: an admitted request finishes by its deadline);
requests still unanswered then are cancelled, so the process exits within that bound plus the denoising batch
running at that moment. A client that stops sending its body is answered 408 after --body-timeout-s.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.serving.sources import check_reward, check_source, read_api_key

PROG = "cg4ctr serve"
# The same cap as `cg4ctr generate`'s one command: creatives in one denoising batch.
MAX_BATCH = 64
# --max-body-mb's ceiling, MiB: a body is held in memory whole while its multipart is parsed, so a larger cap
# only lets one request claim gigabytes; no valid request is over 65 MiB (the 64 MiB image limit + 1).
MAX_BODY_MB = 1024
# The graceful shutdown's wait for requests in flight beyond --timeout-s, seconds: time for the last admitted
# request's batch to finish and its answer to be written.
SHUTDOWN_GRACE_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's flags."""
    source = parser.add_argument_group("generator (one of)")
    source.add_argument("--preset", default=None,
                        help="toy: the embedded default generator (shipped with the package); tiny: random weights, for "
                             "latency and plumbing work (its images are noise)")
    source.add_argument("--model", metavar="DIR", help="local diffusers folder (SD 1.x/2.x inpainting)")
    source.add_argument("--engines", metavar="DIR", help="a cg4ctr-export folder (ONNX Runtime or TensorRT)")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=None,
                        help="backend for --engines (default: onnxruntime)")
    parser.add_argument("--saliency", metavar="PATH",
                        help="U2NetP weights or folder that finds the product when a request has no mask and the "
                             "image no transparency (default: the toy net with --preset toy, else none)")
    parser.add_argument("--store", required=True, metavar="DIR",
                        help="creative store folder (SQLite + PNG files; created if missing)")
    parser.add_argument("--reward", metavar="DIR",
                        help="reward model folder (`cg4ctr-train reward`); default: the embedded toy reward model "
                             "(shipped with the package)")
    parser.add_argument("--groups", metavar="FILE",
                        help="user groups, a groups.json as `cg4ctr-sim` writes it; default: the toy world's "
                             "groups with the toy reward model, else one neutral group \"default\"")
    parser.add_argument("--prompt-model", metavar="DIR",
                        help="prompt model folder that proposes a prompt per group for requests without prompts "
                             "(default: the toy one with the toy reward model and groups, else none)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless you mean it)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 503")
    parser.add_argument("--max-batch", type=int, default=32, help="creatives per denoising batch, across requests")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="how long the oldest request waits for others to fill its batch, ms")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="deadline of a generate request that names none (its timeout_s), seconds; a request "
                             "not started by then gets HTTP 504")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per creative (default: the "
                        "preset's, 20)")
    parser.add_argument("--cost-table", metavar="FILE",
                        help="the planner's cost table (`cg4ctr-bench --calibrate`): a generate request with a "
                             "deadline (budget_ms / timeout_s) then runs the best plan that fits it, and one no plan "
                             "fits gets HTTP 504 at once naming the fastest feasible time (default: no planning)")
    parser.add_argument("--quality-table", metavar="FILE",
                        help="the planner's quality table, with --cost-table (default: plans ranked by UNet work)")
    parser.add_argument("--api-key-file", metavar="FILE",
                        help="file holding the API key; every route but /healthz then needs `Authorization: "
                             "Bearer KEY` or `X-API-Key: KEY` (401 otherwise)")
    parser.add_argument("--max-body-mb", type=float, default=None,
                        help=f"cap on a request body, MiB, at most {MAX_BODY_MB} (HTTP 413 over it; default: the "
                             "64 MiB image limit + 1)")
    parser.add_argument("--body-timeout-s", type=float, default=30.0,
                        help="a request body that sends no byte for this long is answered HTTP 408, seconds")
    parser.add_argument("--shutdown-timeout-s", type=float, default=None,
                        help="on SIGTERM, how long requests in flight may take to finish before they are "
                             f"cancelled, seconds (default: --timeout-s + {SHUTDOWN_GRACE_S:g})")


def _check_number_flags(args) -> None:
    for flag, value in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch)):
        if value <= 0:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if args.max_batch > MAX_BATCH:
        raise InputError(f"--max-batch {args.max_batch} is over the {MAX_BATCH} creatives one denoising batch holds")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    if not args.host.strip():
        raise InputError("--host must not be empty")
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        raise InputError(f"--timeout-s must be a positive number of seconds, got {args.timeout_s}")
    if not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
        raise InputError(f"--max-wait-ms must be ≥ 0, got {args.max_wait_ms}")
    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {args.steps}")
    if args.max_body_mb is not None and not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise InputError(f"--max-body-mb must be a positive number, got {args.max_body_mb}")
    if args.max_body_mb is not None and args.max_body_mb > MAX_BODY_MB:
        raise InputError(f"--max-body-mb {args.max_body_mb:g} is over {MAX_BODY_MB} (a body is held in memory "
                         "whole; no valid request is over 65 MiB)")
    for flag, value in (("--body-timeout-s", args.body_timeout_s), ("--shutdown-timeout-s",
                                                                     args.shutdown_timeout_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be a positive number of seconds, got {value}")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (before models load): a port in use fails at once, in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _load_runtime(source: dict, args, store, reward: str, groups, prompt, observer):
    from cg4ctr_fast.serving.runtime import CreativeRuntime

    options = dict(store=store, reward=reward, groups=groups, prompt_model=prompt, max_batch=args.max_batch,
                   max_queue=args.max_queue, max_wait_ms=args.max_wait_ms, num_inference_steps=args.steps,
                   observer=observer, cost_table=getattr(args, "cost_table", None),
                   quality_table=getattr(args, "quality_table", None))
    if source["kind"] == "engines":
        return CreativeRuntime.from_engines(source["path"], backend=source["backend"], saliency=source["saliency"],
                                            **options)
    if source["kind"] == "model":
        return CreativeRuntime.from_pretrained(source["path"], saliency=source["saliency"], **options)
    return CreativeRuntime.from_preset(source["name"], random_weights=True, saliency=source["saliency"], **options)


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def run(args) -> int:
    """Check everything, load, serve until SIGTERM/SIGINT, drain; the exit code."""
    from cg4ctr_fast.imaging import MAX_BYTES

    _check_number_flags(args)
    api_key = read_api_key(args.api_key_file)
    source = check_source(args)
    reward, groups, prompt = check_reward(args)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InputError(f"cg4ctr serve needs the serve extra ({exc.name} is missing): pip install "
                         "'cg4ctr_fast[serve]'") from None
    store_path = Path(args.store)
    if store_path.exists() and not store_path.is_dir():
        raise InputError(f"--store {args.store}: is a file, expected a folder")
    from cg4ctr_fast.serving.store import CreativeStore

    max_body = MAX_BYTES + 2**20 if args.max_body_mb is None else int(args.max_body_mb * 2**20)
    sock = _bind(args.host, args.port)  # first: a port in use leaves no new store folder behind
    try:
        store = CreativeStore(store_path)  # StoreError (one line, exit 2) for another schema version
    except BaseException:
        sock.close()
        raise
    try:
        from cg4ctr_fast.serving.metrics import PrometheusObserver

        observer = PrometheusObserver()
        runtime = _load_runtime(source, args, store, reward, groups, prompt, observer)
    except BaseException:
        sock.close()
        store.close()
        raise
    try:
        return asyncio.run(_serve(runtime, sock, args, api_key, max_body, observer))
    finally:
        runtime.close(drain=True)
        store.close()


async def _serve(runtime, sock: socket.socket, args, api_key: Optional[str], max_body: int, observer) -> int:
    import uvicorn

    from cg4ctr_fast.serving.http import create_app

    app = create_app(runtime, api_key=api_key, max_body_bytes=max_body, timeout_s=args.timeout_s,
                     observer=observer, body_timeout_s=args.body_timeout_s)
    shutdown_s = args.shutdown_timeout_s or args.timeout_s + SHUTDOWN_GRACE_S
    # timeout_graceful_shutdown: after SIGTERM uvicorn waits this long for requests in flight, then cancels
    # them (a cancelled generate request that has not started is never run); without it one stuck
    # connection holds the process forever. uvicorn passes it to asyncio.wait_for, so seconds as a float.
    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="off",
                            timeout_keep_alive=5, timeout_graceful_shutdown=shutdown_s)
    server = uvicorn.Server(config)
    stop: list[int] = []

    def on_signal(signum, frame):
        # Uvicorn's own handler runs first while it serves and starts its graceful shutdown; it then re-raises
        # the signal to the handler it found, this one, which only records it (the default would kill us
        # before the runtime drains, with exit code -15 instead of 0).
        stop.append(signum)
        server.should_exit = True

    # Never restored: a second SIGTERM after the server stopped (an impatient supervisor repeating it during
    # the last drain or the interpreter's exit) is only recorded, instead of killing us with exit code -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if serving.done():
        await serving
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    _say(f"listening on http://{shown}:{port} (model {runtime.model_id}; "
         f"{'API key required' if api_key else 'no API key'})")
    failure: list[BaseException] = []
    warm = threading.Thread(target=_warm, args=(runtime, server, failure), name="cg4ctr-warmup", daemon=True)
    warm.start()
    while warm.is_alive() and not serving.done():
        await asyncio.sleep(0.05)
    if not failure and runtime.ready:
        _say(f"ready: warmed up; /readyz answers 200 (max queue {args.max_queue}, max batch {args.max_batch})")
    await serving
    warm.join()
    if failure:
        raise failure[0]
    # The HTTP server answered every request in flight before returning; finish what the runtime still holds.
    runtime.close(drain=True)
    if stop:
        name = signal.Signals(stop[0]).name
        _say(f"{name}: stopped taking requests, answered those in flight, drained the runtime; exiting")
        return 130 if stop[0] == signal.SIGINT else 0
    return 0


def _warm(runtime, server, failure: list) -> None:
    try:
        runtime.warmup()
    except BaseException as exc:  # noqa: BLE001 - reported by the serving thread, after the server stops
        failure.append(exc)
        server.should_exit = True
