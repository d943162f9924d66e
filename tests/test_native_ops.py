"""The native (C++) CPU ops against their references.

Step ops vs cg4ctr_fast.kernels.reference.<name>_ref on random inputs and odd shapes, float32 / bfloat16 /
float16, with and without CFG, every blend variant (mask batch 1 / B / 2B, last step), clip on/off, DPM with and
without the previous data prediction, LCM/TCD with and without injected noise. Tolerances: float32 1e-6 (abs
and rel; the kernels do the references' fp32 operations in the same order, so they agree bit for bit here);
bfloat16 / float16 one ulp of the output's scale (2^-7 / 2^-10 times max |ref|). Composite ops vs
cg4ctr_fast.imaging: bit-exact (uint8) and within 1e-7 (float). A whole tiny-pipeline run with
step_backend="native" vs "torch" agrees within 1e-5.

When the library is not built these tests skip ("native ops not built: run `make native`"), unless
CG4CTR_REQUIRE_NATIVE=1, where they fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.kernels import native, reference
from tests.conftest import require_native

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture
def lib():
    require_native()
    return native


def test_require_native_skips_or_fails_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_LIB, str(tmp_path / "missing.so"))
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.delenv("CG4CTR_REQUIRE_NATIVE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="native ops not built: run `make native`"):
        require_native()
    monkeypatch.setenv("CG4CTR_REQUIRE_NATIVE", "1")
    with pytest.raises(pytest.fail.Exception, match="CG4CTR_REQUIRE_NATIVE=1 but native step ops are not built"):
        require_native()


# ---------------------------------------------------------------------------------------------
# Step ops.

SHAPES = [(3, 4, 5, 7), (1, 4, 9, 13), (7, 4, 3, 5), (2, 4, 67, 71)]  # the last: several tasks/tiles per item
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLENDS = ["none", "mask1_noise", "maskB_last", "mask2B_noise"]


def _tol(dtype: torch.dtype, ref: torch.Tensor) -> dict:
    if dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    scale = float(ref.float().abs().max())
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    return dict(rtol=0.0, atol=max(scale, 1e-30) * ulp)


def _inputs(gen: torch.Generator, shape, dtype, cfg: bool, blend: str) -> dict:
    b = shape[0]

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    kw = dict(model_output=rnd(2 * b if cfg else b, *shape[1:]), sample=rnd(*shape),
              guidance_scale=7.5 if cfg else None)
    if blend != "none":
        bm = {"mask1_noise": 1, "maskB_last": b, "mask2B_noise": 2 * b}[blend]
        mask = (torch.rand(bm, 1, *shape[2:], generator=gen) > 0.4).float()
        mask[..., :1] = torch.rand(bm, 1, *shape[2:-1], 1, generator=gen)  # soft values too
        kw.update(mask=mask.to(dtype), image_latents=rnd(1 if blend == "mask1_noise" else b, *shape[1:]),
                  noise=None if blend == "maskB_last" else rnd(b if bm > 1 else 1, *shape[1:]),
                  init_image=0.83, init_noise=0.56)
    return kw


def _scalars(family: str, variant: bool, gen: torch.Generator, shape, dtype) -> dict:
    u = torch.rand(8, generator=gen, dtype=torch.float64).tolist()
    if family == "ddim":
        return dict(x0_sample=1.0 / (0.3 + u[0]), x0_model=-0.4 - u[1], eps_sample=0.1 * u[2], eps_model=0.9 + u[3],
                    prev_x0=0.5 + 0.4 * u[4], prev_eps=0.3 + 0.5 * u[5], clip_range=0.7 if variant else None)
    if family == "euler":
        return dict(x0_sample=1.0, x0_model=-(2.0 + u[0]), sigma_hat=2.0 + u[0], dt=-(0.3 + u[1]) * (2.0 + u[0]))
    if family == "dpm":
        return dict(x0_sample=1.0 / (0.4 + u[0]), x0_model=-0.6 - u[1], coef_sample=0.5 + 0.3 * u[2],
                    coef_x0=0.2 + 0.3 * u[3], coef_diff=-0.1 - 0.2 * u[4],
                    prev_x0=torch.randn(*shape, generator=gen).to(dtype) if variant else None)
    noise = torch.randn(*shape, generator=gen).to(dtype) if variant else None
    if family == "lcm":
        return dict(x0_sample=1.0 / (0.3 + u[0]), x0_model=-0.5 - u[1], c_skip=0.01 * u[2], c_out=0.99 + 0.01 * u[3],
                    prev_denoised=0.6 + 0.3 * u[4], prev_noise=0.4 + 0.3 * u[5], step_noise=noise,
                    clip_range=1.0 if variant else None)
    return dict(x0_sample=1.0 / (0.3 + u[0]), x0_model=-0.5 - u[1], eps_sample=0.05 * u[2], eps_model=0.95 + u[3],
                noised_x0=0.6 + 0.3 * u[4], noised_eps=0.3 + 0.3 * u[5], prev_noised=0.7 + 0.2 * u[6],
                prev_noise=0.2 + 0.3 * u[7], step_noise=noise)


FAMILIES = {
    "ddim": ("ddim_step_ref", "ddim_step_native"),
    "euler": ("euler_step_ref", "euler_step_native"),
    "dpm": ("dpm_solver_step_ref", "dpm_solver_step_native"),
    "lcm": ("lcm_step_ref", "lcm_step_native"),
    "tcd": ("tcd_step_ref", "tcd_step_native"),
}


def _compare(family: str, dtype, got, want, label: str) -> None:
    pairs = list(zip(got, want)) if family == "dpm" else [(got, want)]
    for g, w in pairs:
        assert g.dtype == w.dtype and g.shape == w.shape, label
        torch.testing.assert_close(g.float(), w.float(), **_tol(dtype, w), msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_step_op_matches_reference(lib, family, dtype):
    ref_fn = getattr(reference, FAMILIES[family][0])
    nat_fn = getattr(lib, FAMILIES[family][1])
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family} {dtype}".encode()))
    for shape in SHAPES:
        if dtype == torch.float16 and shape[0] == 7:
            continue  # float16 shares the bfloat16 code path; keep the grid small
        for cfg in (False, True):
            for blend in BLENDS:
                for variant in (False, True):
                    kw = _inputs(gen, shape, dtype, cfg, blend)
                    kw.update(_scalars(family, variant, gen, shape, dtype))
                    label = f"{family} {dtype} {shape} cfg={cfg} blend={blend} variant={variant}"
                    _compare(family, dtype, nat_fn(**kw), ref_fn(**kw), label)


def test_step_ops_mixed_dtypes_and_in_place(lib):
    """bfloat16 model output with float32 latents (DPM stores x0 in bfloat16), a float16 mask, out=sample."""
    gen = torch.Generator().manual_seed(5)
    shape = (2, 4, 11, 13)
    kw = _inputs(gen, shape, torch.float32, True, "mask2B_noise")
    kw["model_output"] = kw["model_output"].bfloat16()
    kw["mask"] = kw["mask"].half()
    kw.update(_scalars("dpm", True, gen, shape, torch.float32))
    got, x0 = lib.dpm_solver_step_native(**kw)
    want, want_x0 = reference.dpm_solver_step_ref(**kw)
    assert x0.dtype == torch.bfloat16
    torch.testing.assert_close(x0.float(), want_x0.float(), rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    kw = _inputs(gen, shape, torch.float32, True, "mask1_noise")
    kw.update(_scalars("ddim", True, gen, shape, torch.float32))
    want = reference.ddim_step_ref(**kw)
    sample = kw["sample"]
    got = lib.ddim_step_native(**kw, out=sample)  # FusedStep allows out=latents
    assert got is sample
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_step_op_threads_split_one_item(lib):
    """Batch 1 with several threads: the item is split into chunks run in parallel, same result."""
    gen = torch.Generator().manual_seed(9)
    shape = (1, 4, 128, 129)
    kw = _inputs(gen, shape, torch.float32, True, "maskB_last")
    kw.update(_scalars("euler", False, gen, shape, torch.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = lib.euler_step_native(**kw)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, reference.euler_step_ref(**kw), rtol=1e-6, atol=1e-6)


def test_step_op_bad_input_messages(lib):
    s = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="does not match sample shape"):
        lib.ddim_step_native(torch.randn(3, 4, 3, 3), s, guidance_scale=2.0, x0_sample=1, x0_model=1,
                             eps_sample=0, eps_model=1, prev_x0=1, prev_eps=0)
    out = torch.empty_like(s)
    # the C++ checks, for callers that go straight to torch.ops
    with pytest.raises(RuntimeError, match="model_output must be float32, float16 or bfloat16"):
        torch.ops.cg4ctr.euler_step(torch.zeros(2, 4, 3, 3, dtype=torch.int32), s, None, 1.0, 1.0, 1.0, 1.0,
                                    None, None, None, 1.0, 0.0, out)
    with pytest.raises(RuntimeError, match="mask shape"):
        torch.ops.cg4ctr.euler_step(s, s, None, 1.0, 1.0, 1.0, 1.0, torch.ones(3, 1, 3, 3), s, None, 1.0, 0.0, out)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        torch.ops.cg4ctr.euler_step(s, s, None, 1.0, 1.0, 1.0, 1.0, None, None, None, 1.0, 0.0, out.half())


def test_step_op_refuses_inputs_that_need_grad(lib):
    """No backward: with grad enabled and an input that requires it, one line instead of a detached output."""
    s, e = torch.randn(1, 4, 3, 5), torch.randn(2, 4, 3, 5, requires_grad=True)
    kwargs = dict(guidance_scale=2.0, x0_sample=1.0, x0_model=-0.5, sigma_hat=1.2, dt=-0.3)
    with pytest.raises(RuntimeError, match="native step ops have no autograd"):
        lib.euler_step_native(e, s, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(lib.euler_step_native(e, s, **kwargs), reference.euler_step_ref(e, s, **kwargs),
                                   rtol=0, atol=0)


def test_ops_pass_opcheck(lib):
    """Schemas (mutation annotations), fake (meta) implementations and tracing agree with the kernels."""
    g = torch.Generator().manual_seed(11)
    s, mo = torch.randn(2, 4, 3, 5, generator=g), torch.randn(4, 4, 3, 5, generator=g)
    m, il, nz = torch.rand(4, 1, 3, 5, generator=g), torch.randn(1, 4, 3, 5, generator=g), torch.randn_like(s)
    z = torch.randn_like(s)
    ops = torch.ops.cg4ctr
    cases = [
        (ops.ddim_step.default, (mo, s, 7.5, 1.1, -0.5, 0.1, 0.9, 0.8, 0.6, 1.0, m, il, nz, 0.9, 0.4, torch.empty_like(s))),
        (ops.euler_step.default, (s, s, None, 1.0, -2.0, 2.0, -0.5, m[:2], il, None, 1.0, 0.0, torch.empty_like(s))),
        (ops.dpm_solver_step.default, (mo, s, 7.5, 1.1, -0.5, 0.7, 0.3, -0.1, z, m, il, nz, 0.9, 0.4,
                                       torch.empty_like(s), torch.empty_like(s))),
        (ops.lcm_step.default, (mo, s, 2.0, 1.1, -0.5, 0.01, 0.99, 0.7, 0.6, z, None, None, None, None, 1.0, 0.0,
                                torch.empty_like(s))),
        (ops.tcd_step.default, (mo, s, 2.0, 1.1, -0.5, 0.05, 0.95, 0.7, 0.6, 0.8, 0.3, z, m, il, nz, 0.9, 0.4,
                                torch.empty_like(s))),
    ]
    img = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (5, 6), dtype=torch.uint8, generator=g)
    cases += [(ops.composite.default, (img, img.flip(0).contiguous(), w)),
              (ops.composite_float.default, (img, torch.rand(5, 6, 3, generator=g), w))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ---------------------------------------------------------------------------------------------
# Composite.


@pytest.mark.parametrize("size,with_alpha", [((23, 17), True), ((40, 9), False)])
def test_composite_matches_imaging(lib, size, with_alpha):
    from cg4ctr_fast import imaging

    rng = np.random.default_rng(size[0])
    w, h = size
    original = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(rng.random((h, w)) < 0.5, 255, rng.integers(0, 256, (h, w))).astype(np.uint8))
    alpha = None
    if with_alpha:
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        alpha[:, :3] = 255
        alpha[:, 3:5] = 0
    weights = imaging._paste_weights(original, mask, alpha, "test")
    assert 0 < (weights > 0).mean() < 1

    want = np.asarray(imaging.composite(original, generated, mask, alpha))
    got = lib.composite_native(np.asarray(original), np.asarray(generated), weights)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want)

    gen_f = rng.random((h, w, 3), dtype=np.float32)
    want_f = imaging.composite_float(original, gen_f, mask, alpha)
    got_f = lib.composite_float_native(np.asarray(original), gen_f, weights)
    assert got_f.dtype == torch.float32
    np.testing.assert_allclose(got_f.numpy(), want_f, rtol=0, atol=1e-7)

    # a batch of images at once ([N, H, W, 3])
    batch = lib.composite_native(np.stack([np.asarray(original)] * 2), np.stack([np.asarray(generated)] * 2),
                                 np.stack([weights] * 2))
    np.testing.assert_array_equal(batch.numpy(), np.stack([want] * 2))
    with pytest.raises(ValueError, match="weights"):
        lib.composite_native(np.asarray(original), np.asarray(generated), weights[:-1])


# ---------------------------------------------------------------------------------------------
# Whole pipeline, loading and the missing-library error.


@pytest.mark.parametrize("channels,scheduler,guidance", [(9, "ddim", 6.0), (4, "dpm++", 6.0), (4, "lcm", 1.5)])
def test_pipeline_native_matches_torch_backend(lib, channels, scheduler, guidance):
    from cg4ctr_fast.pipeline import CreativePipeline
    from tests.conftest import make_product

    pipe = CreativePipeline.from_preset("tiny", unet_in_channels=channels, scheduler=scheduler)
    image, mask = make_product(seed=channels)
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance, strength=0.8, composite=False,
                  show_progress=False, seed=3)
    results = {}
    for backend in ("torch", "native"):
        pipe.fuse_step, pipe.step_backend = True, backend
        lat = torch.stack([c.image for c in pipe(["warm", "cool"], image, mask, output_type="latent", **kwargs)])
        img = np.stack([c.image for c in pipe(["warm", "cool"], image, mask, output_type="np", **kwargs)])
        results[backend] = lat.float(), img
    (lat_t, img_t), (lat_n, img_n) = results["torch"], results["native"]
    torch.testing.assert_close(lat_n, lat_t, rtol=0, atol=1e-5)
    np.testing.assert_allclose(img_n, img_t, rtol=0, atol=1e-5)
    assert np.abs(img_t[0] - img_t[1]).max() > 1e-3  # the two prompts differ: the comparison sees real images


def test_pipeline_native_missing_library_one_line(monkeypatch, tmp_path):
    from cg4ctr_fast.pipeline import CreativePipeline
    from tests.conftest import make_product

    missing = tmp_path / "nowhere" / "libcg4ctr_ops.so"
    monkeypatch.setenv(native.ENV_LIB, str(missing))
    monkeypatch.setattr(native, "_loaded", None)  # as in a process that has not loaded it yet
    pipe = CreativePipeline.from_preset("tiny", scheduler="ddim")
    pipe.step_backend = "native"  # fuse_step None: "native" fuses on CPU too
    image, mask = make_product()
    with pytest.raises(native.NativeUnavailableError) as info:
        pipe("x", image, mask, num_inference_steps=2, show_progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "make native" in msg and str(missing) in msg


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_pipeline_native_missing_library_fails_for_any_scheduler(monkeypatch, tmp_path, scheduler):
    """Asked for by name, native fails on a missing library even where the step would not be fused (PNDM)."""
    from cg4ctr_fast.pipeline import CreativePipeline
    from tests.conftest import make_product

    monkeypatch.setenv(native.ENV_LIB, str(tmp_path / "missing.so"))
    monkeypatch.setattr(native, "_loaded", None)
    pipe = CreativePipeline.from_preset("tiny", scheduler=scheduler)
    pipe.step_backend = "native"
    image, mask = make_product()
    with pytest.raises(native.NativeUnavailableError, match="make native"):
        pipe("x", image, mask, num_inference_steps=2, show_progress=False)


@pytest.mark.parametrize("value", ["NATIVE", "cuda", "", None, 3])
def test_pipeline_step_backend_is_checked(value):
    from cg4ctr_fast.pipeline import CreativePipeline

    pipe = CreativePipeline.from_preset("tiny", scheduler="ddim")
    with pytest.raises(ValueError, match="step_backend must be one of auto, triton, torch, native"):
        pipe.step_backend = value
    assert pipe.step_backend == "auto"


def test_pipeline_native_unfusable_scheduler_warns(lib):
    """A scheduler without a fused step runs diffusers' step under step_backend="native", and says so."""
    from cg4ctr_fast.pipeline import CreativePipeline
    from tests.conftest import make_product

    pipe = CreativePipeline.from_preset("tiny", scheduler="pndm")
    image, mask = make_product()
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, composite=False, show_progress=False, seed=1,
                  output_type="np")
    plain = pipe("x", image, mask, **kwargs)[0].image
    pipe.step_backend = "native"
    with pytest.warns(RuntimeWarning, match="step_backend='native': PNDMScheduler has no fused step"):
        native_run = pipe("x", image, mask, **kwargs)[0].image
    np.testing.assert_array_equal(native_run, plain)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_import_does_not_load_library(lib):
    code = (
        "import cg4ctr_fast, cg4ctr_fast.kernels, cg4ctr_fast.kernels.step, cg4ctr_fast.kernels.native\n"
        "import torch\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('loaded' if 'cg4ctr_ops' in maps else 'not loaded', hasattr(torch.ops.cg4ctr, 'ddim_step'))\n"
        "cg4ctr_fast.kernels.native.load()\n"
        "print('loaded' if 'cg4ctr_ops' in open('/proc/self/maps').read() else 'not loaded')\n"
    )
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["not", "loaded", "False", "loaded"], proc.stdout


def test_missing_library_error_and_info_exit():
    missing = "/nonexistent/cg4ctr/libcg4ctr_ops.so"
    code = (
        "from cg4ctr_fast.kernels import native\n"
        "try:\n    native.load()\nexcept native.NativeUnavailableError as exc:\n    print(exc)\n"
        "else:\n    print('loaded')\n"
    )
    proc = _run_python(code, CG4CTR_NATIVE_LIB=missing)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"native step ops are not built: run `make native` (no library at {missing}, named by "
                           "$CG4CTR_NATIVE_LIB)\n")
    info = subprocess.run([sys.executable, "-m", "cg4ctr_fast.kernels.native", "info"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       "CG4CTR_NATIVE_LIB": missing})
    assert info.returncode == 1 and "loadable: no: native step ops are not built: run `make native`" in info.stdout
