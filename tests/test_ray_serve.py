"""The Ray Serve application (`serving.ray_app`) on a local Ray (2 CPUs), driven over HTTP on 127.0.0.1.

One application serves the whole module: 2 Generator replicas (max_ongoing_requests 2, max_queued_requests 2,
2 LoRAs kept per replica), 2 Selector replicas, one ingress; the tiny preset at 2 steps, a random-weights reward
model, 5 random LoRAs. Every answer is checked against what the test computes itself: the pixels against a
local `CreativePipeline` with the same LoRA and seed, an error body against `cg4ctr serve`'s own words for the
same input (`protocol.parse_body`), a creative's bytes against its sha256 id.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from tests.conftest import make_product  # noqa: E402
from tests.test_export import random_unet_lora  # noqa: E402
from tests.test_style_lora import style_loras  # noqa: E402,F401 - the fixture: two random LoRAs a and b

GROUPS = ["g0", "g1"]
STEPS = 2
MAX_LORAS = 2
LORAS = ["a", "b", "c", "d", "e"]  # 5 LoRAs on 2 replicas × 2 slots: at least one eviction is certain
APP = "cg4ctr"
# Generous per-call limit: a guard that nothing hangs, not an assertion on speed.
CALL_S = 180.0
# The store holds 8-bit PNGs: at most one 8-bit step from the float reference (rounding), as the runtime tests.
PIXEL_TOL = 1 / 255 + 1e-6


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, style_loras):  # noqa: F811
    """A reward model (random weights, 3 group features), groups.json and a folder of 5 LoRAs."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.models.reward import RewardConfig, RewardModel

    root = tmp_path_factory.mktemp("ray_serve")
    torch.manual_seed(0)
    RewardModel(RewardConfig(group_dim=3)).save(root / "reward")
    rng = np.random.default_rng(0)
    (root / "groups.json").write_text(json.dumps(
        [{"group_id": g, "features": [float(x) for x in rng.normal(size=3)]} for g in GROUPS]))
    loras = root / "loras"
    loras.mkdir()
    for name, path in style_loras.items():
        shutil.copytree(path, loras / name)
    for seed, name in enumerate(LORAS[2:], start=11):
        _, state, config = random_unet_lora(seed)
        StableDiffusionInpaintPipeline.save_lora_weights(str(loras / name), unet_lora_layers=state,
                                                         unet_lora_adapter_metadata=config.to_dict())
    return root


@pytest.fixture(scope="module")
def served(world):
    """(base URL, the app's arguments) of the application running on a local Ray; shut down afterwards."""
    from cg4ctr_fast.serving.ray_app import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
        args = dict(store=str(world / "store"), reward=str(world / "reward"), groups=str(world / "groups.json"),
                    loras=str(world / "loras"), steps=str(STEPS), generator_replicas="2", selector_replicas="2",
                    generator_cpus="0.5", selector_cpus="0.25", ingress_cpus="0.25", max_ongoing_requests="2",
                    max_queued_requests="2", max_loras=str(MAX_LORAS), batch_size="2", timeout_s="120")
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", args
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=CALL_S) as c:
        yield c


def _product(seed: int):
    # 64 × 64: the tiny preset's working size, so the stored PNG and the float reference share one grid.
    return make_product(seed=seed, box=(5 + seed % 7, 9, 41, 50 - seed % 5))


def _generate(client, product_id: str, seed: int, prompts, groups, lora: str = "", **fields):
    image, mask = _product(seed)
    headers = {"serve_multiplexed_model_id": lora} if lora else {}
    return client.post("/v1/generate", headers=headers,
                       files={"image": ("p.png", _png(image), "image/png"), "mask": ("m.png", _png(mask), "image/png")},
                       data={"product_id": product_id, "prompts": list(prompts), "group_ids": list(groups),
                             "seed": str(seed), **fields})


def _local_pixels(seed: int, prompts, lora=None) -> list:
    """The creatives a local pipeline makes for the same request (float [H, W, 3] in [0, 1])."""
    from cg4ctr_fast.pipeline import CreativePipeline

    image, mask = _product(seed)
    pipe = CreativePipeline.from_preset("tiny", random_weights=True, lora=None if lora is None else str(lora))
    return [c.image for c in pipe(list(prompts), image, mask, seed=seed, num_inference_steps=STEPS, output_type="np",
                                  show_progress=False)]


def _served_pixels(client, body: dict) -> list:
    out = []
    for creative in body["creatives"]:
        data = client.get(creative["url"]).content
        assert hashlib.sha256(data).hexdigest() == creative["id"]
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255)
    return out


def _error_of(model, body) -> str:
    """`cg4ctr serve`'s one line for this body (the parser both servers share)."""
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.serving.protocol import parse_body

    with pytest.raises(InputError) as caught:
        parse_body(model, json.dumps(body).encode())
    return str(caught.value)


# ------------------------------------------------------------------------------------------- fast end to end
def test_every_route_answers_as_cg4ctr_serve(client):
    from cg4ctr_fast.serving.protocol import GenerateBody, SelectBody

    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "model_id": "preset:tiny:seed0"}

    prompts, groups = ["warm beach", "cool studio"], ["g0", "g1"]
    r = _generate(client, "sku-1", 3, prompts, groups, title="red mug")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["product_id"] == "sku-1" and body["model_id"] == "preset:tiny:seed0"
    assert [c["group_id"] for c in body["creatives"]] == groups and set(body["original_scores"]) == set(GROUPS)
    served = _served_pixels(client, body)
    for got, want in zip(served, _local_pixels(3, prompts)):
        assert np.abs(got - want).max() <= PIXEL_TOL
    head = client.head(body["creatives"][0]["url"])
    assert head.status_code == 200 and head.headers["etag"] == f'"{body["creatives"][0]["id"]}"'

    # The selection is the best of the scores the generate answer gave for g1 (the original is a candidate).
    r = client.post("/v1/select", json={"product_id": "sku-1", "group_id": "g1", "k": 3})
    assert r.status_code == 200, r.text
    chosen = r.json()["chosen"]
    candidates = {c["id"]: c["scores"]["g1"] for c in body["creatives"]}
    candidates["original"] = body["original_scores"]["g1"]
    assert [c["id"] for c in chosen] == sorted(candidates, key=lambda k: -candidates[k])[:3]
    assert all(c["url"] == (None if c["id"] == "original" else f"/v1/creatives/{c['id']}.png") for c in chosen)
    assert client.get("/metrics").status_code == 200

    # Bad input: 4xx with `cg4ctr serve`'s JSON error shape and words; nothing is stored for it.
    bad = {"product_id": "sku-1", "prompts": []}
    r = client.post("/v1/generate", json=bad)
    assert (r.status_code, r.json()) == (400, {"error": _error_of(GenerateBody, bad)})
    bad = {"product_id": "sku-1", "group_id": "g0", "k": 0.5}
    r = client.post("/v1/select", json=bad)
    assert (r.status_code, r.json()) == (400, {"error": _error_of(SelectBody, bad)})
    r = client.post("/v1/select", json={"product_id": "nope", "group_id": "g0"})
    assert r.status_code == 404 and "unknown product" in r.json()["error"]
    r = client.post("/v1/select", json={"product_id": "sku-1", "group_id": "zz"})
    assert r.status_code == 400 and "zz" in r.json()["error"]
    r = client.post("/v1/generate", json={"product_id": "never-sent", "prompts": ["x"]})
    assert r.status_code == 404 and "never-sent" in r.json()["error"]
    assert client.get("/v1/creatives/" + "0" * 64 + ".png").status_code == 404
    r = client.get("/v1/creatives/xyz.png")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert client.get("/v1/nothing").json() == {"error": "no route GET /v1/nothing"}
    r = _generate(client, "sku-2", 4, ["x"], ["g0"], lora="no-such-lora")
    assert r.status_code == 404 and "no-such-lora" in r.json()["error"]
    r = _generate(client, "sku-2", 4, ["x"], ["g0"], lora="../a")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    # A deadline no request can meet: 504 with the JSON shape, never run.
    r = _generate(client, "sku-3", 5, ["x"], ["g0"], timeout_s="0.001")
    assert r.status_code == 504 and set(r.json()) == {"error"}, r.text


# ------------------------------------------------------------------------------------------------- LoRAs
@pytest.mark.slow
def test_two_loras_are_multiplexed_each_answered_by_its_own(client, served, world):
    from cg4ctr_fast.serving.runtime import _with_lora

    prompts, groups = ["neon city"], ["g0"]

    async def burst():
        async with httpx.AsyncClient(base_url=served[0], timeout=CALL_S) as ac:
            async def one(lora, k):
                image, mask = _product(7)
                # A client that honours Retry-After: the burst goes to the replicas that hold the LoRA (Serve's
                # multiplexed routing), whose queues (max_queued_requests 2) can be full while a LoRA loads. This
                # test is about which LoRA answers; the overload test covers the 503s themselves.
                for _attempt in range(30):
                    r = await ac.post(
                        "/v1/generate", headers={"serve_multiplexed_model_id": lora},
                        files={"image": ("p.png", _png(image), "image/png"), "mask": ("m.png", _png(mask), "image/png")},
                        data={"product_id": f"lora-{lora}-{k}", "prompts": prompts, "group_ids": groups, "seed": "7"})
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return lora, r
            return await asyncio.gather(*(one(lora, k) for k in range(2) for lora in ("a", "b")))

    answers = asyncio.run(burst())
    local = {lora: _local_pixels(7, prompts, world / "loras" / lora) for lora in ("a", "b")}
    # The LoRAs change the pixels by far more than the tolerance, so "right LoRA" is decidable.
    assert np.abs(local["a"][0] - local["b"][0]).max() > 10 * PIXEL_TOL
    for lora, r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_id"] == _with_lora("preset:tiny:seed0", str(world / "loras" / lora), 1.0)
        (got,) = _served_pixels(client, body)
        assert np.abs(got - local[lora][0]).max() <= PIXEL_TOL, lora
    # Selection under a LoRA's model id sees that LoRA's creatives only; the base model has none of this product.
    stored = {c["id"] for lora, a in answers if a.json()["product_id"] == "lora-a-0" for c in a.json()["creatives"]}
    r = client.post("/v1/select", headers={"serve_multiplexed_model_id": "a"},
                    json={"product_id": "lora-a-0", "group_id": "g0", "k": 2})
    assert r.status_code == 200 and {c["id"] for c in r.json()["chosen"]} == stored | {"original"}, r.text
    r = client.post("/v1/select", json={"product_id": "lora-a-0", "group_id": "g0", "k": 2})
    assert r.status_code == 200 and [c["id"] for c in r.json()["chosen"]] == ["original"], r.text
    assert r.json()["fallback"] == "none_stored"


@pytest.mark.slow
def test_a_replica_evicts_the_least_recent_lora_when_full(client):
    for k, lora in enumerate(LORAS + ["a"]):
        r = _generate(client, f"evict-{k}", 9, ["red brick"], ["g1"], lora=lora)
        assert r.status_code == 200, r.text
    handle = serve.get_deployment_handle("Generator", app_name=APP)
    logs = {}
    for _ in range(40):  # requests are routed at random among idle replicas: collect both replicas' logs
        replica, events = handle.multiplex_log.remote().result(timeout_s=CALL_S)
        logs[replica] = events
        if len(logs) == 2:
            break
    assert len(logs) == 2
    evictions = loads = 0
    for replica, events in logs.items():
        cache: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        for event, lora in events:
            if not lora:
                continue  # the base model is kept outside the multiplexed cache
            if event == "evict":
                # Ray's LRU: the least recently used LoRA goes, and only when the replica is full.
                assert len(cache) == MAX_LORAS and next(iter(cache)) == lora, (replica, events)
                del cache[lora]
                evictions += 1
            elif event == "load":
                assert lora not in cache and len(cache) < MAX_LORAS, (replica, events)
                cache[lora] = None
                loads += 1
            else:  # use
                cache.move_to_end(lora)
    assert loads >= len(LORAS) and evictions >= 1


# ------------------------------------------------------------------------------------------------- overload
@pytest.mark.slow
def test_an_overload_burst_gets_503s_and_every_request_is_answered(served):
    sent = 24

    async def burst():
        async with httpx.AsyncClient(base_url=served[0], timeout=CALL_S,
                                     limits=httpx.Limits(max_connections=sent)) as ac:
            async def one(k):
                image, mask = _product(20 + k)
                started = time.perf_counter()
                r = await ac.post("/v1/generate",
                                  files={"image": ("p.png", _png(image), "image/png"),
                                         "mask": ("m.png", _png(mask), "image/png")},
                                  data={"product_id": f"burst-{k}", "prompts": ["blue sky"], "group_ids": ["g0"]})
                return r, time.perf_counter() - started
            return await asyncio.gather(*(one(k) for k in range(sent)))

    answers = asyncio.run(burst())
    statuses = collections.Counter(r.status_code for r, _ in answers)
    print(f"\noverload: sent {sent}, 200: {statuses[200]}, 503: {statuses[503]}, 504: {statuses[504]}, "
          f"max latency {max(s for _, s in answers):.2f} s, largest denoising batch "
          f"{max((r.json()['batch_creatives'] for r, _ in answers if r.status_code == 200), default=0)} creatives")
    assert sum(statuses.values()) == sent and set(statuses) <= {200, 503, 504}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    for r, _ in answers:
        if r.status_code != 200:
            assert set(r.json()) == {"error"}
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1


# ------------------------------------------------------------------------------------------------- arguments
def test_app_arguments_are_checked_before_anything_starts(tmp_path):
    from ray.serve import Application

    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.serving import ray_app

    # `serve run cg4ctr_fast.serving.ray_app:app`: the defaults (tiny preset, embedded toy reward model).
    assert isinstance(ray_app.app, Application)
    for args, needle in [({"preset": "tiny", "nope": "1"}, "nope: unknown field"),
                         ({"max_loras": "0"}, "max_loras must be a positive integer"),
                         ({"timeout_s": "0"}, "timeout_s must be a positive number"),
                         ({"generator_replicas": "two"}, "generator_replicas:"),
                         ({"loras": str(tmp_path / "missing")}, "no such folder"),
                         ({"reward": str(tmp_path)}, "not a reward model folder"),
                         ({"preset": "nope"}, "unknown preset"),
                         ({"store": __file__}, "is a file, expected a folder"),
                         ({"api_key_file": str(tmp_path / "no-key")}, "api_key_file=.*no such file")]:
        with pytest.raises(InputError, match=needle) as caught:
            ray_app.build_app(args)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "missing").exists()
    # preset toy is the toy generator folder, as for `cg4ctr serve --preset toy` and `cg4ctr nearline --preset
    # toy`: the same store model id, so the app selects what a nearline job stored.
    from types import SimpleNamespace

    from cg4ctr_fast.serving.nearline import model_id_for
    from cg4ctr_fast.serving.sources import check_source

    checked = ray_app._checked({"preset": "toy", "store": str(tmp_path / "store")})
    source = check_source(SimpleNamespace(preset="toy", model=None, engines=None, backend=None, saliency=None,
                                          steps=None))
    assert ray_app.base_model_id(checked) == model_id_for(source) and checked.saliency
