"""`cg4ctr serve` as a user runs it: a subprocess on 127.0.0.1 driven with httpx.

One server process (the tiny preset, 2 denoising steps, a random-weights reward model and a groups.json the
test writes, an API key) is shared by the tests of this module; the SIGTERM drain runs last and stops it.
Every answer is checked against what the test can compute itself: a creative's URL serves bytes whose sha256
is its id, a selection is the best of the scores the generate answer gave, a bad input gets the one line
`cg4ctr generate` prints for the same file, and the store holds nothing more after any refused request.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from PIL import Image  # noqa: E402

from tests.conftest import make_product  # noqa: E402

KEY = "test-key-7f3a9c"
GROUPS = ["g0", "g1", "7"]  # "7": a numeric-looking id, sent as a JSON number too
MAX_QUEUE = 4
MAX_BATCH = 8
STEPS = 2
# Generous per-call limits: none is an assertion on speed, only a guard that nothing hangs forever.
START_S = 240.0
CALL_S = 120.0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HEX64 = re.compile(r"[0-9a-f]{64}")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _product_png(seed: int, width: int = 48, height: int = 40) -> bytes:
    """A product on a transparent background: its alpha is the mask (the tiny preset has no saliency net)."""
    rgb, mask = make_product(width, height, seed=seed)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(255 - np.asarray(mask)))
    return _png(rgba)


class Server:
    """A `cg4ctr serve` subprocess: its URL from the stderr line it prints, its stderr lines kept."""

    def __init__(self, args: list[str], env: dict = ENV):
        self.proc = subprocess.Popen([sys.executable, "-m", "cg4ctr_fast.cli.main", "serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        self._ready = threading.Event()
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._listening.set()
            if ": ready" in line:
                self._ready.set()
        self._listening.set()
        self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(START_S), f"server not ready in {START_S} s: {self.lines}"
        assert self.proc.poll() is None and self.url, f"server exited: {self.lines}"

    def stop(self, signal_first: bool = True) -> int:
        """SIGTERM (unless already sent), then the exit code; killed only if it outlives CALL_S."""
        if signal_first and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(CALL_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files a user would have: a reward model (random weights, 3 group features), groups.json, a key."""
    import torch

    from cg4ctr_fast.models.reward import RewardConfig, RewardModel

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    RewardModel(RewardConfig(group_dim=3)).save(root / "reward")
    rng = np.random.default_rng(0)
    groups = [{"group_id": g, "features": [float(x) for x in rng.normal(size=3)]} for g in GROUPS]
    (root / "groups.json").write_text(json.dumps(groups))
    (root / "key.txt").write_text(f"  {KEY}\n")
    return root


@pytest.fixture(scope="module")
def server(world):
    srv = Server(["--preset", "tiny", "--store", str(world / "store"), "--reward", str(world / "reward"),
                  "--groups", str(world / "groups.json"), "--port", "0", "--steps", str(STEPS),
                  "--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH), "--timeout-s", "30",
                  "--api-key-file", str(world / "key.txt")])
    try:
        srv.wait_ready()
        srv.store = world / "store"
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=CALL_S) as c:
        yield c


def _stats(store: Path) -> dict:
    from cg4ctr_fast.serving.store import CreativeStore

    s = CreativeStore(store, create=False)
    try:
        stats = s.stats()
    finally:
        s.close()
    return {k: stats[k] for k in ("rows", "creative_ids", "products", "scores", "product_scores", "files", "bytes")}


def _metrics(client) -> dict:
    """{(sample name, frozenset of labels): value} from /metrics."""
    text = client.get("/metrics").text
    out = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _metric(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def _generate_multipart(client, product_id: str, png: bytes, **fields):
    data = {"product_id": product_id, **fields}
    return client.post("/v1/generate", files={"image": ("product.png", png, "image/png")}, data=data)


# ---------------------------------------------------------------------------------------------------- routes
def test_health_ready_and_api_key(server, client):
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # open: no key
    for path in ("/readyz", "/metrics", "/v1/creatives/" + "0" * 64 + ".png"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and "API key" in r.json()["error"], path
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/readyz", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/readyz", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    r = httpx.post(f"{server.url}/v1/select", json={"product_id": "p", "group_id": "g0"})
    assert r.status_code == 401
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["model_id"] == "preset:tiny:seed0"
    assert httpx.get(f"{server.url}/readyz", headers={"X-API-Key": KEY}).status_code == 200
    assert any(": ready" in line for line in server.lines)


def test_generate_fetch_select(server, client):
    png = _product_png(seed=1)
    r = _generate_multipart(client, "sku-1", png, prompts=["warm beach", "cool studio"], group_ids=["g0", "g1"],
                            num_images_per_prompt="2", seed="3", title="red mug")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["product_id"] == "sku-1" and body["model_id"] == "preset:tiny:seed0"
    creatives = body["creatives"]
    assert len(creatives) == 4
    assert [(c["group_id"], c["prompt"], c["index"]) for c in creatives] == [
        ("g0", "warm beach", 0), ("g0", "warm beach", 1), ("g1", "cool studio", 0), ("g1", "cool studio", 1)]
    assert set(body["original_scores"]) == set(GROUPS)
    for c in creatives:
        assert HEX64.fullmatch(c["id"]) and c["url"] == f"/v1/creatives/{c['id']}.png"
        assert set(c["scores"]) == set(GROUPS) and all(0 < s < 1 for s in c["scores"].values())
        assert c["reward"] == c["scores"][c["group_id"]]
        image = client.get(c["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert hashlib.sha256(image.content).hexdigest() == c["id"]  # content addressed
        head = client.head(c["url"])
        assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "image/png"
        assert int(head.headers["content-length"]) == len(image.content)
        assert Image.open(io.BytesIO(image.content)).size == (48, 40)  # the input's own size
    assert len({c["id"] for c in creatives}) == 4

    for group in ("g0", "g1", "7"):
        scores = {c["id"]: c["scores"][group] for c in creatives}
        original = body["original_scores"][group]
        r = client.post("/v1/select", json={"product_id": "sku-1", "group_id": group, "k": 2})
        assert r.status_code == 200, r.text
        sel = r.json()
        best = sorted(scores.items(), key=lambda kv: -kv[1])
        chosen = sel["chosen"]
        if original >= best[0][1]:
            assert sel["fallback"] == "original_better" and chosen[0]["id"] == "original"
            assert chosen[0]["url"] is None
        else:
            assert sel["fallback"] is None
            assert chosen[0]["id"] == best[0][0] and chosen[0]["url"] == f"/v1/creatives/{best[0][0]}.png"
            assert math.isclose(chosen[0]["score"], best[0][1], rel_tol=1e-5, abs_tol=1e-6)
        assert len(chosen) == 2
        ranked = sorted([*scores.values(), original], reverse=True)[:2]
        np.testing.assert_allclose([c["score"] for c in chosen], ranked, rtol=1e-5, atol=1e-6)
    # A group id sent as a JSON number names the same group as its string.
    assert client.post("/v1/select", json={"product_id": "sku-1", "group_id": 7}).json()["group_id"] == "7"


def test_generate_stored_product_by_json(client):
    png = _product_png(seed=2, width=40, height=40)
    first = _generate_multipart(client, "sku-2", png, prompts=["a"])
    assert first.status_code == 200, first.text
    again = client.post("/v1/generate", json={"product_id": "sku-2", "prompts": ["a"]})
    assert again.status_code == 200, again.text
    # Same stored original, prompt and seed: the same pixels, so the same content-addressed id.
    assert again.json()["creatives"][0]["id"] == first.json()["creatives"][0]["id"]
    other = client.post("/v1/generate", json={"product_id": "sku-2", "prompts": ["a"], "seed": 9, "timeout_s": 30})
    assert other.status_code == 200 and other.json()["creatives"][0]["id"] != first.json()["creatives"][0]["id"]
    assert other.json()["creatives"][0]["group_id"] is None


# ---------------------------------------------------------------------------------------------------- bad input
def _cli_line(world: Path, image: Path) -> str:
    """What `cg4ctr generate` prints for this image file, without its `cg4ctr: error: <path>: ` prefix."""
    out = world / f"cli-out-{image.stem}"
    done = subprocess.run([sys.executable, "-m", "cg4ctr_fast.cli.main", "generate", "--preset", "tiny",
                           "--image", str(image), "--prompt", "x", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=CALL_S)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    prefix = f"cg4ctr: error: {image}: "
    assert line.startswith(prefix), line
    return line[len(prefix):]


def test_bad_input_is_one_line_4xx_and_stores_nothing(server, client, world):
    valid = _product_png(seed=3)
    assert _generate_multipart(client, "sku-3", valid, prompts=["x"]).status_code == 200
    before = _stats(server.store)
    counted = _metrics(client)
    truncated = valid[: len(valid) // 2]
    cases = [
        # (method, path, keyword arguments, status)
        ("post", "/v1/generate", {"json": {"product_id": "no-such-sku", "prompts": ["x"]}}, 404),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "group_ids": ["nope"]}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": []}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["  "]}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "timeout_s": 0}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "timeout_s": -1}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "num_images_per_prompt": 0}},
         400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"] * 65}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "", "prompts": ["x"]}}, 400),
        ("post", "/v1/generate", {"json": {"product_id": "sku-3", "prompt": ["x"]}}, 400),
        ("post", "/v1/generate", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ("post", "/v1/generate", {"json": ["sku-3"]}, 400),
        ("post", "/v1/generate", {"data": {"product_id": "sku-4", "prompts": "x"},
                                  "files": {"image": ("p.png", b"not an image at all", "image/png")}}, 400),
        ("post", "/v1/generate", {"data": {"product_id": "sku-4", "prompts": "x"},
                                  "files": {"mask": ("m.png", valid, "image/png")}}, 400),
        # Opaque, no mask, and no saliency net in the tiny preset: refused when its batch runs.
        ("post", "/v1/generate", {"data": {"product_id": "sku-4", "prompts": "x"},
                                  "files": {"image": ("p.png", _png(make_product(40, 40)[0]), "image/png")}}, 400),
        ("post", "/v1/generate", {"data": {"product_id": "sku-4", "prompts": "x"},
                                  "files": {"image": ("p.png", _png(Image.new("RGBA", (4097, 1))), "image/png")}},
         400),
        ("post", "/v1/generate", {"data": {"product_id": "sku-4", "prompts": "x"},
                                  "files": {"image": ("p.png", valid, "image/png"),
                                            "mask": ("m.png", _png(Image.new("L", (9, 9))), "image/png")}}, 400),
        ("get", "/v1/creatives/not-a-sha.png", {}, 400),
        ("get", "/v1/creatives/" + "A" * 64 + ".png", {}, 400),
        # An encoded "/" is decoded before routing: no creative route matches, nothing is read.
        ("get", "/v1/creatives/..%2F..%2Fstore.sqlite3.png", {}, 404),
        ("get", "/v1/creatives/" + "0" * 63 + "/.png", {}, 404),
        ("get", "/v1/creatives/" + "0" * 64 + ".png", {}, 404),
        ("post", "/v1/select", {"json": {"product_id": "no-such-sku", "group_id": "g0"}}, 404),
        ("post", "/v1/select", {"json": {"product_id": "sku-3", "group_id": "nope"}}, 400),
        ("post", "/v1/select", {"json": {"product_id": "sku-3", "group_id": "g0", "k": 0}}, 400),
        ("post", "/v1/select", {"json": {"product_id": "sku-3", "group_id": "g0", "budget_ms": 0}}, 400),
        ("post", "/v1/select", {"json": {"product_id": "sku-3"}}, 400),
    ]
    for method, path, kwargs, status in cases:
        r = getattr(client, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error, (path, kwargs, error)

    # A truncated PNG: the one line `cg4ctr generate` prints for the same bytes, with the upload's label.
    (world / "truncated.png").write_bytes(truncated)
    r = _generate_multipart(client, "sku-4", truncated, prompts=["x"])
    assert r.status_code == 400
    assert r.json()["error"] == "image data: " + _cli_line(world, world / "truncated.png")

    # Bodies over the cap (the 64 MiB image limit + 1 MiB): a declared Content-Length is refused before any
    # byte is sent; a chunked body is counted as it streams.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=CALL_S) as sock:
        sock.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {65 * 2**20 + 1}\r\n\r\n".encode())
        status, body = _read_response(sock)
    assert status == 413 and "over the 68157440-byte limit" in json.loads(body)["error"], body

    def chunks():
        block = b"\0" * 2**20
        for _ in range(66):
            yield block

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "68157440-byte limit" in r.json()["error"]

    # Each refused with its own one line: strict JSON types, repeated file parts, seeds, text that is not UTF-8.
    lines_before = len(server.lines)
    image_part = ("image", ("p.png", valid, "image/png"))
    mask_part = ("mask", ("m.png", _png(Image.new("L", (48, 40), 255)), "image/png"))
    form = {"product_id": "sku-5", "prompts": "x"}
    worded = [
        ("/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "num_images_per_prompt": True}},
         "num_images_per_prompt: must be an integer, got true"),
        ("/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "num_images_per_prompt": "2"}},
         "num_images_per_prompt: must be an integer, got a string"),
        ("/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "seed": -1}},
         "seed: must be an integer from 0 to 2**63 - 1, got -1"),
        ("/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "seed": 2**63}},
         f"seed: must be an integer from 0 to 2**63 - 1, got {2**63}"),
        ("/v1/generate", {"json": {"product_id": "sku-3", "prompts": ["x"], "seed": True}},
         "seed: must be an integer, got true"),
        ("/v1/generate", {"data": {**form, "seed": str(2**63)}, "files": [image_part]},
         f"seed: must be an integer from 0 to 2**63 - 1, got {2**63}"),
        ("/v1/generate", {"data": form, "files": [image_part, image_part]}, "image: given more than once"),
        ("/v1/generate", {"data": form, "files": [image_part, mask_part, mask_part]}, "mask: given more than once"),
        ("/v1/generate", {"data": {"product_id": "sku-5"},
                          "files": [image_part, ("prompts", (None, "café".encode("latin-1")))]},
         "prompts holds byte 0xE9, which is not valid UTF-8, at character 4 (after 'caf')"),
        ("/v1/generate", {"data": {"prompts": "x"},
                          "files": [image_part, ("product_id", (None, b"sku-\xff"))]},
         "product_id holds byte 0xFF, which is not valid UTF-8"),
        ("/v1/generate", {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
         "multipart body: "),
        ("/v1/select", {"content": b'{"product_id": "sku-3", "group_id": "g0", "budget_ms": Infinity}',
                        "headers": {"content-type": "application/json"}},
         "budget_ms: must be a positive number of milliseconds (or null for no budget), got inf"),
        ("/v1/select", {"json": {"product_id": "sku-3", "group_id": None}},
         "group_id: must be a string or an integer, got null"),
        ("/v1/select", {"json": {"product_id": "sku-3", "group_id": "g0", "k": "2"}}, "k: must be an integer"),
    ]
    for path, kwargs, expected in worded:
        r = client.post(path, **kwargs)
        assert r.status_code == 400, (path, kwargs, r.status_code, r.text)
        error = r.json()["error"]
        assert expected in error and "\n" not in error, (expected, error)
    # The server's stderr says nothing about a user's bad body (python-multipart's parser warnings included).
    assert server.lines[lines_before:] == []

    assert _stats(server.store) == before  # nothing written for any refused request
    m = _metrics(client)
    # Every refused generate request is counted once (the truncated PNG too); refused selects are not.
    refused = sum(path == "/v1/generate" for _, path, _, _ in cases) + 1
    refused += sum(path == "/v1/generate" for path, _, _ in worded)
    for reason, count in (("bad_input", refused), ("body_too_large", 2)):
        assert (_metric(m, "cg4ctr_rejections_total", reason=reason)
                - _metric(counted, "cg4ctr_rejections_total", reason=reason)) == count, reason
    assert not any(name == "cg4ctr_http_requests_total" and dict(labels)["status"] == "500"
                   for name, labels in m)


def test_damaged_creative_file_is_500_naming_store_verify(server, client):
    """A creative file changed on disk is never served as that creative: 500 (server-side damage) with one
    line naming `cg4ctr store verify`, logged once however often it is asked for; the file put back, 200."""
    r = _generate_multipart(client, "sku-d", _product_png(seed=12), prompts=["x"])
    assert r.status_code == 200, r.text
    creative = r.json()["creatives"][0]
    from cg4ctr_fast.serving.store import CreativeStore

    store = CreativeStore(server.store, create=False)
    try:
        path = Path(store.image_path(creative["id"]))
    finally:
        store.close()
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01  # one bit: same size, same PNG signature
    lines_before = len(server.lines)
    try:
        path.write_bytes(bytes(damaged))
        for method in ("get", "get", "head"):
            r = getattr(client, method)(creative["url"])
            assert r.status_code == 500, (method, r.status_code)
            if method == "get":
                error = r.json()["error"]
                assert "cg4ctr store verify" in error and creative["id"] in error and "\n" not in error, error
        logged = server.lines[lines_before:]
        assert len(logged) == 1 and creative["id"] in logged[0] and "cg4ctr store verify" in logged[0], logged
    finally:
        path.write_bytes(original)
    r = client.get(creative["url"])
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == creative["id"]


def test_metrics_show_the_counts(server, client):
    """/metrics counts exactly what this test does: one generate of 3 creatives, one select, one 401."""
    before = _metrics(client)
    r = _generate_multipart(client, "sku-m", _product_png(seed=11), prompts=["a", "b", "c"], group_ids=GROUPS)
    assert r.status_code == 200
    assert client.post("/v1/select", json={"product_id": "sku-m", "group_id": "g1"}).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    after = _metrics(client)

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("cg4ctr_http_requests_total", route="/v1/generate", status="200") == 1
    assert delta("cg4ctr_http_requests_total", route="/v1/select", status="200") == 1
    assert delta("cg4ctr_http_requests_total", route="/metrics", status="401") == 1
    assert delta("cg4ctr_http_requests_total", route="/metrics", status="200") == 1  # the `before` scrape
    assert delta("cg4ctr_rejections_total", reason="unauthorized") == 1
    assert delta("cg4ctr_batch_creatives_count") == 1 and delta("cg4ctr_batch_creatives_sum") == 3
    assert delta("cg4ctr_batch_requests_count") == 1 and delta("cg4ctr_batch_requests_sum") == 1
    assert delta("cg4ctr_generate_seconds_count", status="ok") == 1
    for stage in ("queue", "generate", "reward", "store", "select"):
        assert delta("cg4ctr_stage_seconds_count", stage=stage) == 1, stage
        assert delta("cg4ctr_stage_seconds_sum", stage=stage) >= 0, stage
    assert _metric(after, "cg4ctr_queue_depth") == 0
    assert 1 <= _metric(after, "cg4ctr_queue_depth_max") <= MAX_QUEUE


def _send_raw(server, product_id: str, png: bytes, prompts: list[str]) -> socket.socket:
    """Send a whole multipart generate request on a raw socket and return it unread (the client stays)."""
    request = httpx.Request("POST", f"{server.url}/v1/generate", headers={"X-API-Key": KEY},
                            files={"image": ("p.png", png, "image/png")},
                            data={"product_id": product_id, "prompts": prompts})
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=CALL_S)
    sock.sendall(f"POST /v1/generate HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def _wait_for(client, condition) -> dict:
    deadline = time.monotonic() + CALL_S
    while time.monotonic() < deadline:
        m = _metrics(client)
        if condition(m):
            return m
        time.sleep(0.005)
    raise AssertionError("the server never reached the awaited state")


def _start_busy(server, client, product_id: str, png: bytes) -> socket.socket:
    """A request of MAX_BATCH creatives (a batch to itself), returned once its batch is running."""
    batches = _metric(_metrics(client), "cg4ctr_batch_creatives_count")
    busy = _send_raw(server, product_id, png, [f"p{i}" for i in range(MAX_BATCH)])
    _wait_for(client, lambda m: _metric(m, "cg4ctr_batch_creatives_count") > batches)
    return busy


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the one response on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def _answer(sock: socket.socket) -> int:
    return _read_response(sock)[0]


def test_client_disconnect_cancels_queued_work(server, client):
    """A request still queued when its client goes away is never run: no product row, counted as cancelled."""
    before = _metric(_metrics(client), "cg4ctr_rejections_total", reason="cancelled")
    png = _product_png(seed=5)
    busy = _start_busy(server, client, "sku-busy", png)
    # Two more full batches behind the running one: the request below waits behind them. Two, because the
    # worker's torch calls can keep the event loop from reading them until the running batch ends; then one of
    # them runs and the other still stands in the queue with the request below.
    queued = [_send_raw(server, f"sku-busy-{k}", png, [f"p{i}" for i in range(MAX_BATCH)]) for k in (2, 4)]
    with _send_raw(server, "sku-gone", png, ["never"]):
        _wait_for(client, lambda m: _metric(m, "cg4ctr_queue_depth") >= 2)
    # Closed: the client is gone while its request waits.
    for sock in (busy, *queued):
        with sock:
            assert _answer(sock) == 200
    m = _wait_for(client, lambda m: _metric(m, "cg4ctr_rejections_total", reason="cancelled") > before)
    assert _metric(m, "cg4ctr_rejections_total", reason="cancelled") == before + 1
    from cg4ctr_fast.serving.store import CreativeStore

    store = CreativeStore(server.store, create=False)
    try:
        assert store.product("sku-busy") is not None
        assert store.product("sku-gone") is None and store.creatives("sku-gone") == []
    finally:
        store.close()


def test_deadline_passed_in_queue_is_504_never_run(server, client):
    """A request whose timeout_s runs out while it waits behind a running batch gets 504 and is never run."""
    before = _metric(_metrics(client), "cg4ctr_rejections_total", reason="deadline")
    png = _product_png(seed=6)
    busy = _start_busy(server, client, "sku-busy-3", png)
    late = client.post("/v1/generate", files={"image": ("p.png", png, "image/png")},
                       data={"product_id": "sku-late", "prompts": "x", "timeout_s": "0.01"})
    assert late.status_code == 504 and "deadline" in late.json()["error"], late.text
    with busy:
        assert _answer(busy) == 200
    assert _metric(_metrics(client), "cg4ctr_rejections_total", reason="deadline") == before + 1
    from cg4ctr_fast.serving.store import CreativeStore

    store = CreativeStore(server.store, create=False)
    try:
        assert store.product("sku-late") is None and store.creatives("sku-late") == []
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- overload
async def _offer(url: str, rate: float, duration: float, limit: int, timeout_s: float):
    """Open-loop load: a request every 1/rate s for `duration` s (at most `limit`); (sent, [(status, s, headers)]).

    Raw asyncio streams sending bytes built once: an httpx.AsyncClient juggling hundreds of connections in
    this one process spent up to 16 s per request itself on 2 shared cores (p99 of client latency minus the
    server's own Server-Timing), and fell behind the offered rate (786 of 2220 sent), so it measured itself.
    """
    answers: list = []
    host, port = url.removeprefix("http://").split(":")
    requests = []
    for i in range(8):
        request = httpx.Request("POST", f"{url}/v1/generate", headers={"X-API-Key": KEY, "Connection": "close"},
                                files={"image": ("p.png", _product_png(seed=100 + i), "image/png")},
                                data={"product_id": f"load-{i}", "prompts": "x", "timeout_s": str(timeout_s)})
        body = request.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        requests.append(f"POST /v1/generate HTTP/1.1\r\n{head}\r\n".encode() + body)

    async def one(i: int):
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CALL_S)
            try:
                writer.write(requests[i % 8])
                data = await asyncio.wait_for(reader.read(), CALL_S)  # Connection: close: read to the end
            finally:
                writer.close()
            head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            answers.append((int(head[0].split(" ", 2)[1]), time.perf_counter() - started, headers))
        except (OSError, asyncio.TimeoutError, IndexError, ValueError) as exc:  # a hang or a dropped connection
            answers.append((type(exc).__name__, time.perf_counter() - started, {}))

    tasks = []
    start = time.perf_counter()
    while len(tasks) < limit and time.perf_counter() - start < duration:
        tasks.append(asyncio.create_task(one(len(tasks))))
        await asyncio.sleep(max(0.0, start + len(tasks) / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    return len(tasks), answers


def _server_ms(headers: dict) -> float:
    """The server's own time for a request, ms: the sum of its Server-Timing durations."""
    return sum(float(part.split(";dur=")[1]) for part in headers["server-timing"].split(","))


def test_overload_every_request_answered_queue_bounded(server, client):
    # Capacity: sequential one-creative requests, as the load below sends them.
    png = _product_png(seed=100)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        assert _generate_multipart(client, "load-0", png, prompts=["x"]).status_code == 200
        times.append(time.perf_counter() - started)
    capacity = 1.0 / float(np.median(times))  # requests per second
    rate = 10 * capacity
    sent, answers = asyncio.run(_offer(server.url, rate, duration=20.0, limit=2000, timeout_s=2.0))
    statuses = [a[0] for a in answers]
    counts = {s: statuses.count(s) for s in set(statuses)}
    accepted = sorted(a[1] for a in answers if a[0] == 200)
    server_ms = sorted(_server_ms(a[2]) for a in answers if a[0] == 200)
    m = _metrics(client)
    max_queue = _metric(m, "cg4ctr_queue_depth_max")
    p99 = float(np.percentile(accepted, 99)) if accepted else float("nan")
    print(f"\noverload: capacity {capacity:.1f} req/s, offered {rate:.0f} req/s for 20 s: sent {sent}, answered "
          f"{len(answers)} {dict(sorted(counts.items(), key=str))}, max queue {max_queue:.0f} (--max-queue "
          f"{MAX_QUEUE}), p99 of accepted {1000 * p99:.0f} ms, p50 {1000 * float(np.median(accepted)):.0f} ms "
          f"(server's own: p99 {float(np.percentile(server_ms, 99)):.0f} ms, p50 {float(np.median(server_ms)):.0f} "
          "ms)")
    assert len(answers) == sent
    assert set(counts) <= {200, 503, 504}, counts
    assert counts.get(200, 0) > 0 and counts.get(503, 0) > 0, counts  # served, and refused at 10× capacity
    assert all(int(a[2]["retry-after"]) >= 1 for a in answers if a[0] == 503)  # Retry-After
    assert 1 <= max_queue <= MAX_QUEUE
    assert _metric(m, "cg4ctr_rejections_total", reason="queue_full") == counts.get(503, 0)


# ---------------------------------------------------------------------------------------------------- start and stop
def test_readyz_is_503_until_warmed_up(world, tmp_path):
    """The app over a real runtime, in process: /readyz says 503 until warmup() is done, /healthz 200 always."""
    from fastapi.testclient import TestClient

    from cg4ctr_fast.serving.http import create_app
    from cg4ctr_fast.serving.runtime import CreativeRuntime

    runtime = CreativeRuntime.from_preset("tiny", random_weights=True, store=tmp_path / "store",
                                          reward=world / "reward", groups=world / "groups.json",
                                          num_inference_steps=STEPS)
    try:
        with TestClient(create_app(runtime, api_key=None, timeout_s=5.0)) as http:
            assert http.get("/healthz").status_code == 200
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json()["ready"] is False
            runtime.warmup()
            assert http.get("/readyz").status_code == 200
            assert http.get("/healthz").status_code == 200
    finally:
        runtime.close()
    assert _stats(tmp_path / "store")["rows"] == 0  # warmup stores nothing


def test_refused_at_start_in_one_line(world, tmp_path):
    from cg4ctr_fast.serving.store import CreativeStore

    newer = tmp_path / "newer-store"
    CreativeStore(newer).close()
    with sqlite3.connect(newer / "store.sqlite3") as conn:
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    empty_key = tmp_path / "empty.txt"
    empty_key.write_text(" \n")
    common = ["--store", str(tmp_path / "s"), "--reward", str(world / "reward"), "--groups", str(world / "groups.json")]
    cases = [
        (["--preset", "tiny", "--store", str(newer), "--reward", str(world / "reward")], "schema version 2"),
        (["--preset", "tiny", *common, "--api-key-file", str(empty_key)], "empty"),
        (["--preset", "tiny", *common, "--api-key-file", str(tmp_path / "none.txt")], "no such file"),
        (["--preset", "tiny", *common, "--timeout-s", "0"], "--timeout-s"),
        (["--preset", "tiny", *common, "--max-queue", "0"], "--max-queue"),
        (["--preset", "tiny", *common, "--api-key-file", str(tmp_path)], "is a directory"),
        (["--preset", "tiny", *common, "--max-body-mb", "1e30"], "--max-body-mb 1e+30 is over 1024"),
        (["--preset", "tiny", *common, "--body-timeout-s", "nan"], "--body-timeout-s"),
        (["--preset", "tiny", "--store", str(tmp_path / "s"), "--reward", str(world / "reward"), "--groups",
          str(tmp_path / "missing.json")], f"--groups {tmp_path / 'missing.json'}: no such file"),
        (["--preset", "tiny", "--engines", str(tmp_path), *common], "one of"),
        (["--preset", "tiny", "--store", str(tmp_path / "s")], "no reward model: pass --reward DIR"),
    ]
    for args, expected in cases:
        # Neither the shipped toy set nor a cache: nothing to default to.
        env = ({**ENV, "CG4CTR_CACHE": str(tmp_path / "no-cache"), "CG4CTR_TOY_SET": str(tmp_path / "no-set")}
               if expected.startswith("no reward model") else ENV)
        done = subprocess.run([sys.executable, "-m", "cg4ctr_fast.cli.main", "serve", "--port", "0", *args],
                              capture_output=True, text=True, env=env, timeout=CALL_S)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("cg4ctr: error: "), (args, done.stderr)
        assert expected in lines[0], (expected, lines[0])
    assert not (tmp_path / "s").exists() or _stats(tmp_path / "s")["rows"] == 0


def test_sigterm_drains_in_flight_requests(server, client):
    """Runs last: SIGTERM while one request runs and two wait; each gets its 200, then exit code 0."""
    png = _product_png(seed=7)
    running = _start_busy(server, client, "drain-0", png)
    # Full batches each: whenever the two arrive (the worker's torch calls can keep the event loop from reading
    # them until the running batch ends), one runs while the other waits, so a request is queued at SIGTERM.
    waiting = [_send_raw(server, f"drain-{i}", png, [f"q{j}" for j in range(MAX_BATCH)]) for i in (1, 2)]
    _wait_for(client, lambda m: _metric(m, "cg4ctr_queue_depth") >= 1)
    server.proc.send_signal(signal.SIGTERM)
    statuses = []
    for sock in [running, *waiting]:
        with sock:
            statuses.append(_answer(sock))
    assert server.stop(signal_first=False) == 0, server.lines
    assert statuses == [200, 200, 200], (statuses, server.lines)
    assert any("SIGTERM" in line for line in server.lines), server.lines
    from cg4ctr_fast.serving.store import CreativeStore

    store = CreativeStore(server.store, create=False)
    try:
        assert all(store.product(f"drain-{i}") is not None for i in range(3))
        assert store.verify() == []
    finally:
        store.close()


def _half_sent(url: str, path: str, head: bytes, declared: int = 100000) -> socket.socket:
    """A raw request whose body is declared `declared` bytes long and of which only `head` is sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=CALL_S)
    kind = "multipart/form-data; boundary=b" if path == "/v1/generate" else "application/json"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {declared}\r\n\r\n"
                 .encode() + head)
    return sock


def test_stalled_and_abandoned_bodies_and_bounded_sigterm(world, tmp_path):
    """Its own server (--body-timeout-s 2, --shutdown-timeout-s 3): a body that stalls gets 408 and the
    connection closed; one abandoned half-way counts as 499 with nothing on stderr; SIGTERM while a body
    trickles in (never stalling) still exits 0, the wait bounded by --shutdown-timeout-s."""
    srv = Server(["--preset", "tiny", "--store", str(tmp_path / "store"), "--reward", str(world / "reward"),
                  "--groups", str(world / "groups.json"), "--port", "0", "--steps", str(STEPS),
                  "--body-timeout-s", "2", "--shutdown-timeout-s", "3"])
    trickling = threading.Event()
    try:
        srv.wait_ready()
        quiet = len(srv.lines)
        for path, head in (("/v1/generate", b"--b\r\n"), ("/v1/select", b'{"product_id": "p')):
            with _half_sent(srv.url, path, head) as sock:
                status, body = _read_response(sock)
                assert status == 408, (path, status, body)
                error = json.loads(body)["error"]
                assert "no byte of the request body arrived for 2 s" in error and "\n" not in error, error
                assert sock.recv(1) == b""  # closed by the server: the rest of that body is no next request
        with httpx.Client(base_url=srv.url, timeout=CALL_S) as c:
            before = _metrics(c)
            for path, head in (("/v1/generate", b"--b\r\n"), ("/v1/select", b'{"product_id": "p')):
                _half_sent(srv.url, path, head).close()  # the client leaves half-way through its body
            deadline = time.monotonic() + CALL_S
            while time.monotonic() < deadline:
                m = _metrics(c)
                gone = {p: _metric(m, "cg4ctr_http_requests_total", route=p, status=499)
                        - _metric(before, "cg4ctr_http_requests_total", route=p, status=499)
                        for p in ("/v1/generate", "/v1/select")}
                if all(gone.values()):
                    break
                time.sleep(0.01)
            assert gone == {"/v1/generate": 1, "/v1/select": 1}, gone
            assert not any(status == "500" for name, labels in m for key, status in labels if key == "status")
            assert _metric(m, "cg4ctr_rejections_total", reason="body_timeout") == 2
        assert srv.lines[quiet:] == []  # no traceback, no parser warning

        # A body that trickles a byte every 0.5 s never trips the 2 s body timeout: only the bounded
        # graceful shutdown ends it.
        sock = _half_sent(srv.url, "/v1/generate", b"--b\r\n")

        def trickle():
            try:
                while not trickling.wait(0.5):
                    sock.sendall(b"x")
            except OSError:  # the server closed it
                pass

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(1.0)
        assert srv.stop() == 0, srv.lines
        assert any("SIGTERM" in line for line in srv.lines), srv.lines
    finally:
        trickling.set()
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
