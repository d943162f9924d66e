"""`cg4ctr serve` on Ray Serve: the same routes and JSON, with replicated deployments and multiplexed LoRAs.

    serve run cg4ctr_fast.serving.ray_app:app                                   # tiny preset, toy reward model
    serve run cg4ctr_fast.serving.ray_app:build_app store=out/ray_store preset=tiny loras=DIR max_loras=3

Deployments (Ray Serve's own machinery, no scheduler of ours):

  Ingress    FastAPI via `serve.ingress`: `serving.http.create_app` (the very app of `cg4ctr serve`) over a
             `RemoteRuntime` that forwards generate to the Generator and select to the Selector through
             DeploymentHandles. Same routes, same JSON, same error shape and statuses.
  Generator  wraps `CreativeRuntime`; `@serve.batch` gathers requests across callers (Ray splits a batch by
             multiplexed model id), each sub-batch is submitted to that model's runtime together, so they
             share one denoising batch; `max_ongoing_requests` / `max_queued_requests` bound it.
  Selector   CPU, several replicas: the numpy reward head over the store (`select.Selector`, one per model id).

LoRAs: `loras=DIR` names a folder whose entries (a diffusers LoRA folder, or a .safetensors file) are the LoRA
ids. A request names one with the header `serve_multiplexed_model_id: <id>` (Ray's header; none: the base
model). The Generator loads it through `@serve.multiplexed(max_num_models_per_replica=max_loras)`: a replica
keeps the `max_loras` most recently used, Ray evicts the least recent (its runtime is closed) and routes a
request to a replica that has its LoRA loaded when one does. The stored model id is the base's plus the LoRA's
digest and scale (`runtime._with_lora`), so selection never mixes a LoRA's creatives with the base's.
On this torch/CPU backend each loaded LoRA is a runtime of its own with the LoRA fused into its UNet (memory:
one pipeline per loaded id); diffusers' LoRA hotswap (`enable_lora_hotswap` + torch.compile) is NOT done here:
it needs one compiled UNet per replica with a fixed maximum rank, which this backend does not build.

Errors → status, as `cg4ctr serve`: InputError 400, NotFound 404, QueueFull and Ray's BackPressureError
(Generator queue past `max_queued_requests`) 503 with Retry-After, a replica gone 503, DeadlineExceeded (the
request's deadline, `timeout_s` from arrival, passed before it started) 504, and no answer within the deadline
plus `grace_s` 504. Ray's proxy `request_timeout_s` (serve config `http_options`) should sit above
`timeout_s + grace_s`: the proxy's own timeout answers 408 in plain text, not this JSON.

This module imports ray at import time: it is only ever imported on demand (`import cg4ctr_fast` loads no ray).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.serving.errors import DeadlineExceeded, NotFound, QueueFull, RuntimeClosed

__all__ = ["RayAppArgs", "Generator", "Selector", "Ingress", "RemoteRuntime", "build_app"]

log = logging.getLogger("cg4ctr_fast.serving.ray_app")

# A LoRA id travels in an HTTP header and names a file in the LoRA folder: no path separators, ≤ 64 characters.
_LORA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LORA_SUFFIX = ".safetensors"


class RayAppArgs(BaseModel):
    """The application's arguments (`serve run ...:build_app key=value ...`; text is converted, "2" → 2).

    preset / model: the generator (a preset name, "toy" = the embedded toy models as `cg4ctr serve --preset toy`
        reads them, or a local diffusers folder, which wins); seed: the preset's. saliency: a saliency model (the
        toy one with preset toy), for products sent without a mask.
    store: the creative store folder (shared by every replica: a shared path on a cluster).
    reward / groups / prompt_model: as `cg4ctr serve` (default: the embedded toy models).
    loras: folder of LoRAs (each a diffusers LoRA folder or a .safetensors file; its name is the LoRA id).
    lora_scale: multiplies every LoRA. steps: denoising steps (None: the runtime's 20).
    max_batch / max_queue / max_wait_ms: each runtime's (creatives per denoising batch, requests waiting, ms).
    timeout_s: a generate request's deadline when it names none, s; grace_s: how long past its deadline the
        ingress waits for a started request before answering 504, s.
    generator_replicas / selector_replicas: replicas; *_cpus: CPUs each replica reserves (fractions allowed).
    max_ongoing_requests / max_queued_requests: the Generator's (per replica / per caller, Ray's terms).
    max_loras: LoRAs a Generator replica keeps loaded (`max_num_models_per_replica`).
    batch_size / batch_wait_ms: `@serve.batch` max_batch_size and batch_wait_timeout_s (in ms here).
    torch_threads: torch threads per replica (1: several replicas share few cores).
    api_key_file: as `cg4ctr serve --api-key-file`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    model: Optional[str] = None
    saliency: Optional[str] = None
    seed: int = 0
    store: str = "out/ray_store"
    reward: Optional[str] = None
    groups: Optional[str] = None
    prompt_model: Optional[str] = None
    loras: Optional[str] = None
    lora_scale: float = 1.0
    steps: Optional[int] = None
    max_batch: int = 32
    max_queue: int = 64
    max_wait_ms: float = 2.0
    timeout_s: float = 60.0
    grace_s: float = 10.0
    generator_replicas: int = 1
    selector_replicas: int = 2
    generator_cpus: float = 1.0
    selector_cpus: float = 0.25
    ingress_cpus: float = 0.25
    max_ongoing_requests: int = 8
    max_queued_requests: int = 16
    max_loras: int = 3
    batch_size: int = 8
    batch_wait_ms: float = 10.0
    torch_threads: int = 1
    api_key_file: Optional[str] = None


# -- shared helpers (every deployment computes model ids the same way) -----------------------------------------
def base_model_id(args: RayAppArgs) -> str:
    """The store's model id of the base generator: as `CreativeRuntime.from_preset` / `from_pretrained` name it."""
    if args.model:
        from cg4ctr_fast.export.manifest import folder_sha256

        return f"model:{folder_sha256(args.model)[:16]}"
    return f"preset:{args.preset}:seed{args.seed}"


def lora_path(args: RayAppArgs, lora_id: str) -> Path:
    """The file or folder of LoRA `lora_id`; InputError (400) for a malformed id or no LoRA folder, NotFound
    (404) for an id the folder does not hold."""
    if not _LORA_ID.fullmatch(lora_id):
        raise InputError(f"serve_multiplexed_model_id {lora_id[:80]!r}: a LoRA id is 1 to 64 letters, digits, "
                         "'.', '_' or '-'")
    if not args.loras:
        raise InputError(f"serve_multiplexed_model_id {lora_id!r}: this application serves no LoRAs "
                         "(build it with loras=DIR)")
    root = Path(args.loras)
    for candidate in (root / lora_id, root / f"{lora_id}{_LORA_SUFFIX}"):
        if candidate.is_dir() or candidate.is_file():
            return candidate
    raise NotFound(f"unknown LoRA {lora_id!r}: {root} holds no folder or {_LORA_SUFFIX} file of that name")


_MODEL_IDS: dict = {}


def model_id_for(args: RayAppArgs, lora_id: str) -> str:
    """The store's model id for base + LoRA `lora_id` ("" = the base); hashed once per process and id."""
    if not lora_id:
        return base_model_id(args)
    key = (args, lora_id)
    if key not in _MODEL_IDS:
        from cg4ctr_fast.serving.runtime import _with_lora

        _MODEL_IDS[key] = _with_lora(base_model_id(args), str(lora_path(args, lora_id)), args.lora_scale)
    return _MODEL_IDS[key]


def _pack(exc: BaseException) -> dict:
    """An error as a plain dict crossing the process boundary (Ray's exception wrapping loses our subclasses'
    fields, e.g. QueueFull.retry_after_s)."""
    kind = next((k for k, cls in _KINDS.items() if isinstance(exc, cls)), "internal")
    if kind == "internal":
        log.error("internal error", exc_info=exc)
    message = str(exc) if kind != "internal" else f"{type(exc).__name__}: {exc}"
    return {"error": kind, "message": " ".join(message.split()), "retry_after_s": getattr(exc, "retry_after_s", None)}


# Most specific first: NotFound is an InputError, DeadlineInfeasible a DeadlineExceeded.
_KINDS = {"not_found": NotFound, "input": InputError, "queue_full": QueueFull, "closed": RuntimeClosed,
          "deadline": DeadlineExceeded}


def _unpack(answer: Any) -> Any:
    """`answer` unless it is a packed error, which is raised as the class `cg4ctr serve` maps to its status."""
    if isinstance(answer, dict) and "error" in answer and set(answer) == {"error", "message", "retry_after_s"}:
        kind, message = answer["error"], answer["message"]
        if kind == "queue_full":
            raise QueueFull(message, retry_after_s=answer["retry_after_s"] or 1.0)
        if kind in _KINDS:
            raise _KINDS[kind](message)
        raise RuntimeError(message)
    return answer


def _set_threads(n: int) -> None:
    # Several replicas share the cores: torch's default (one thread per core each) oversubscribes them.
    import torch

    torch.set_num_threads(max(1, n))


# -- Generator -------------------------------------------------------------------------------------------------
class _Loaded:
    """One multiplexed model: a runtime for base + LoRA. Ray calls `__del__` when it evicts it."""

    def __init__(self, lora_id: str, runtime, events: list):
        self.lora_id, self.runtime, self._events = lora_id, runtime, events

    def __del__(self):
        runtime, self.runtime = getattr(self, "runtime", None), None
        if runtime is None:
            return
        self._events.append(("evict", self.lora_id))
        # Requests already queued there finish (drain) in its worker thread; nothing here waits for them.
        runtime.close(drain=True, timeout=0)


@serve.deployment(name="Generator")
class Generator:
    """`CreativeRuntime` behind `@serve.batch` and `@serve.multiplexed` (model id = LoRA id; "" = the base).

    generate(request, deadline_unix_s) → `GenerateResult`, or a packed error (dict) the ingress raises again.
    """

    def __init__(self, args: dict):
        self.args = RayAppArgs(**args)
        _set_threads(self.args.torch_threads)
        # Every model use, load and eviction of this replica, in order (for `multiplex_log`).
        self.events: list = []
        self.base = self._runtime(None)
        self.base.warmup()
        # Decorated here, not on the class, so that N comes from the app's arguments; a plain function (Ray keeps
        # its LRU cache as an attribute of the decorated callable, which a bound method cannot hold).
        async def load(lora_id: str) -> _Loaded:
            return await self._load_lora(lora_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_loras)(load)
        self._batched.set_max_batch_size(self.args.batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000.0)

    def _runtime(self, lora: Optional[str]):
        from cg4ctr_fast.serving.runtime import CreativeRuntime

        a = self.args
        options = dict(store=a.store, reward=a.reward, groups=a.groups, prompt_model=a.prompt_model,
                       max_batch=a.max_batch, max_queue=a.max_queue, max_wait_ms=a.max_wait_ms,
                       num_inference_steps=a.steps, lora=lora, lora_scale=a.lora_scale, saliency=a.saliency)
        if a.model:
            return CreativeRuntime.from_pretrained(a.model, **options)
        return CreativeRuntime.from_preset(a.preset, seed=a.seed, random_weights=True, **options)

    async def _load_lora(self, lora_id: str) -> _Loaded:
        path = lora_path(self.args, lora_id)
        loop = asyncio.get_running_loop()
        # Building a pipeline takes seconds: off the event loop, so other requests keep being admitted.
        runtime = await loop.run_in_executor(None, self._runtime, str(path))
        self.events.append(("load", lora_id))
        return _Loaded(lora_id, runtime, self.events)

    async def generate(self, request, deadline_unix_s: Optional[float]):
        # Deadlines cross processes (and machines) as wall-clock time; the runtime keeps monotonic ones.
        if deadline_unix_s is not None:
            request = dataclasses.replace(request, deadline=time.monotonic() + (deadline_unix_s - time.time()))
        return await self._batched(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list) -> list:
        # Ray hands one model id per batch (it splits mixed batches by multiplexed model id).
        lora_id = serve.get_multiplexed_model_id()
        try:
            runtime = self.base if not lora_id else (await self._get_model(lora_id)).runtime
        except Exception as exc:  # noqa: BLE001 - an unknown LoRA answers every request of the batch
            return [_pack(exc)] * len(requests)
        self.events.append(("use", lora_id))
        # All submitted before any is awaited: the runtime's worker puts them in one denoising batch.
        answers = await asyncio.gather(*(runtime.agenerate(r) for r in requests), return_exceptions=True)
        return [_pack(a) if isinstance(a, BaseException) else a for a in answers]

    def multiplex_log(self) -> tuple[str, list]:
        """(this replica's id, [(event, lora_id)]): "use" per batch, "load" and "evict" per model."""
        return serve.get_replica_context().replica_id.unique_id, list(self.events)

    def __del__(self):
        base = getattr(self, "base", None)
        if base is not None:
            base.close(drain=True, timeout=0)


# -- Selector --------------------------------------------------------------------------------------------------
@serve.deployment(name="Selector")
class Selector:
    """Online selection over the store: `select.Selector` per model id, sharing one reward head and store.

    select(lora_id, product_id, group_id, k, budget_ms) → `Selection.to_dict()`, or a packed error (dict).
    """

    def __init__(self, args: dict):
        from cg4ctr_fast.export.manifest import folder_sha256
        from cg4ctr_fast.models.reward import RewardModel
        from cg4ctr_fast.serving.runtime import _load_groups
        from cg4ctr_fast.serving.select import RewardHead
        from cg4ctr_fast.serving.store import CreativeStore

        self.args = RayAppArgs(**args)
        _set_threads(self.args.torch_threads)
        reward = RewardModel.load(self.args.reward)
        self.head = RewardHead.from_model(reward)
        # The runtime's own reward id for a reward folder: the selector reads the scores it stored.
        self.reward_id = f"reward:{folder_sha256(self.args.reward)[:16]}"
        ids, features = _load_groups(self.args.groups, reward.config.group_dim)
        self.groups = dict(zip(ids, features))
        self.store = CreativeStore(self.args.store)
        self._selectors: dict = {}
        self._lock = threading.Lock()

    def _selector(self, lora_id: str):
        from cg4ctr_fast.serving.select import Selector as StoreSelector

        model_id = model_id_for(self.args, lora_id)
        with self._lock:
            if model_id not in self._selectors:
                self._selectors[model_id] = StoreSelector(self.store, self.head, self.groups, model_id=model_id,
                                                          reward_id=self.reward_id)
            return self._selectors[model_id]

    def select(self, lora_id: str, product_id, group_id, k: int, budget_ms: Optional[float]):
        from cg4ctr_fast.serving.runtime import _check_id

        try:
            selector = self._selector(lora_id)
            return selector.select(_check_id(product_id, "product_id"), _check_id(group_id, "group_id"),
                                   k=k, budget_ms=budget_ms).to_dict()
        except Exception as exc:  # noqa: BLE001 - packed: the ingress maps it to its status
            return _pack(exc)


# -- Ingress ---------------------------------------------------------------------------------------------------
class _Selection(dict):
    """A selection as the Selector answered it, with the `to_dict` `protocol.selection_response` reads."""

    def to_dict(self) -> dict:
        return dict(self)


class RemoteRuntime:
    """What `http.create_app` needs of a runtime, forwarded to the deployments through their handles.

    agenerate(GenerateRequest) → GenerateResult; select(...) → a selection (sync: the app runs it in a thread);
    queue_depth(): generate requests this ingress replica has in flight; store: the store, for creative PNGs.
    Raises what `CreativeRuntime` raises (InputError, NotFound, QueueFull, DeadlineExceeded, RuntimeClosed).
    """

    def __init__(self, generator: DeploymentHandle, selector: DeploymentHandle, args: RayAppArgs, store):
        self.generator, self.selector, self.args, self.store = generator, selector, args, store
        self.model_id = base_model_id(args)
        self.ready = True  # Serve routes to this replica only once the deployments it calls are up
        self._in_flight = 0

    def queue_depth(self) -> int:
        return self._in_flight

    @staticmethod
    def _lora_id() -> str:
        lora_id = serve.get_multiplexed_model_id() or ""
        return lora_id

    async def agenerate(self, request):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        lora_id = self._lora_id()
        if lora_id:
            lora_path(self.args, lora_id)  # a malformed or unknown id: 400 / 404 here, before any queue
        remaining = None if request.deadline is None else request.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it could be sent to a Generator")
        deadline_unix = None if remaining is None else time.time() + remaining
        handle = self.generator.options(multiplexed_model_id=lora_id) if lora_id else self.generator
        response = handle.generate.remote(dataclasses.replace(request, deadline=None), deadline_unix)
        self._in_flight += 1
        try:
            wait = None if remaining is None else remaining + self.args.grace_s
            answer = await asyncio.wait_for(_awaited(response), wait)
        except asyncio.TimeoutError:
            response.cancel()
            raise DeadlineExceeded(f"no answer within the request's {remaining:.1f} s deadline and "
                                   f"{self.args.grace_s:g} s of grace") from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away: a request not yet started is never run
            raise
        except BackPressureError as exc:
            raise QueueFull(f"the Generator queue is full; retry later ({exc.message})",
                            retry_after_s=exc.retry_after_s or 1.0) from None
        except DeploymentUnavailableError as exc:
            raise RuntimeClosed(f"no Generator replica is available ({exc.message})") from None
        finally:
            self._in_flight -= 1
        return _unpack(answer)

    def select(self, product_id, group_id, k: int = 1, budget_ms: Optional[float] = None):
        from ray.serve.exceptions import DeploymentUnavailableError

        lora_id = self._lora_id()
        try:
            answer = self.selector.select.remote(lora_id, product_id, group_id, k, budget_ms).result(
                timeout_s=self.args.timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no Selector answered within {self.args.timeout_s:g} s") from None
        except DeploymentUnavailableError as exc:
            raise RuntimeClosed(f"no Selector replica is available ({exc.message})") from None
        return _Selection(_unpack(answer))


async def _awaited(response):
    return await response


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP ingress: `http.create_app` over a `RemoteRuntime` (built per replica, at replica start)."""

    def __init__(self, generator: DeploymentHandle, selector: DeploymentHandle, args: dict):
        from cg4ctr_fast.serving.store import CreativeStore

        self.args = RayAppArgs(**args)
        self.remote = RemoteRuntime(generator, selector, self.args, CreativeStore(self.args.store))

    def __serve_build_asgi_app__(self):
        from cg4ctr_fast.serving.http import create_app

        api_key = None
        if self.args.api_key_file:
            from cg4ctr_fast.serving.sources import read_api_key

            api_key = read_api_key(self.args.api_key_file)
        return create_app(self.remote, api_key=api_key, timeout_s=self.args.timeout_s)


# -- the application -------------------------------------------------------------------------------------------
def _checked(args: dict) -> RayAppArgs:
    """The arguments checked (InputError, one line) with paths made absolute (replicas may run elsewhere)."""
    from types import SimpleNamespace

    from cg4ctr_fast.serving.protocol import parse_body
    from cg4ctr_fast.serving.sources import check_reward, check_source, read_api_key

    parsed = parse_body(RayAppArgs, dict(args))
    for name in ("generator_replicas", "selector_replicas", "max_ongoing_requests", "max_loras", "batch_size",
                 "max_batch", "max_queue", "torch_threads"):
        if getattr(parsed, name) < 1:
            raise InputError(f"{name} must be a positive integer, got {getattr(parsed, name)}")
    if parsed.max_queued_requests < 1 and parsed.max_queued_requests != -1:
        raise InputError(f"max_queued_requests must be positive or -1 (no limit), got {parsed.max_queued_requests}")
    for name in ("timeout_s", "grace_s", "batch_wait_ms", "generator_cpus", "selector_cpus", "ingress_cpus"):
        value = getattr(parsed, name)
        if not (math.isfinite(value) and value >= 0) or (name == "timeout_s" and value == 0):
            raise InputError(f"{name} must be a {'positive' if name == 'timeout_s' else 'non-negative'} number, "
                             f"got {value}")
    if parsed.loras and not Path(parsed.loras).is_dir():
        raise InputError(f"loras {parsed.loras}: no such folder")
    if parsed.model and not Path(parsed.model).is_dir():
        raise InputError(f"model {parsed.model}: no such folder")
    if Path(parsed.store).exists() and not Path(parsed.store).is_dir():
        raise InputError(f"store {parsed.store}: is a file, expected a folder")
    try:  # `cg4ctr serve`'s checks of the generator, the API key and the reward side, in this app's spelling
        source = check_source(SimpleNamespace(preset=None if parsed.model else parsed.preset, model=parsed.model,
                                              engines=None, backend=None, saliency=parsed.saliency,
                                              steps=parsed.steps))
        read_api_key(parsed.api_key_file)
        if source["kind"] == "model":  # preset toy: the toy generator folder (the model id nearline stores under)
            parsed = parsed.model_copy(update={"model": source["path"], "saliency": source["saliency"]})
        reward, groups, prompt = check_reward(SimpleNamespace(
            reward=parsed.reward, groups=parsed.groups, prompt_model=parsed.prompt_model,
            preset=None if parsed.model else parsed.preset))
    except InputError as exc:
        message = str(exc).replace("--preset NAME, --model DIR or --engines DIR", "preset= or model=")
        for flag in ("preset", "model", "saliency", "steps", "api-key-file", "reward", "groups", "prompt-model"):
            message = message.replace(f"--{flag} ", f"{flag.replace('-', '_')}=")
        raise InputError(message) from None

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    return parsed.model_copy(update=dict(
        reward=absolute(reward), groups=absolute(groups), prompt_model=absolute(prompt),
        store=absolute(parsed.store), loras=absolute(parsed.loras), model=absolute(parsed.model),
        saliency=absolute(parsed.saliency), api_key_file=absolute(parsed.api_key_file)))


def build_app(args: Optional[dict] = None):
    """The Serve application (`serve run cg4ctr_fast.serving.ray_app:build_app key=value ...`).

    args: `RayAppArgs` fields (strings are converted). Raises InputError (one line) for an unknown or bad one,
    a missing folder, or a reward model / groups file `cg4ctr serve` would refuse.
    """
    a = _checked(args or {})
    plain = a.model_dump()
    generator = Generator.options(
        num_replicas=a.generator_replicas, max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests, ray_actor_options={"num_cpus": a.generator_cpus},
        # Loading the base model and warming it up takes seconds on a shared CPU.
        health_check_timeout_s=120,
    ).bind(plain)
    selector = Selector.options(num_replicas=a.selector_replicas,
                                ray_actor_options={"num_cpus": a.selector_cpus}).bind(plain)
    # The ingress sheds nothing itself (Ray's own 503 would be plain text): the Generator's bounded queue does,
    # and the ingress answers that in the JSON of `cg4ctr serve`.
    return Ingress.options(max_ongoing_requests=1000, ray_actor_options={"num_cpus": a.ingress_cpus}).bind(
        generator, selector, plain)


def __getattr__(name: str):
    # `serve run cg4ctr_fast.serving.ray_app:app`: built on first access, so importing this module checks nothing.
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
