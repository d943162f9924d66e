"""Tests of cg4ctr_fast.kernels: the fused per-step Triton kernels and FusedStep.

The Triton kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1 must be set
before triton is first imported, hence the first lines). `@triton.autotune` is not used by the
kernels; the tests pass large fixed blocks because the interpreter's cost grows with the number of
programs.

Tolerances are "relative to magnitude": max|got - want| <= tol * max(1, max|want|).

Kernel vs its torch reference (same fp32 math, different op order / FMA contraction):
  * fp32 1e-5: a handful of fp32 roundings (~6e-8 each) on values of order 1..15.
  * fp16 2e-3: both compute in fp32 and round once on store; when the fp32 results straddle a
    rounding boundary the stored values differ by one fp16 ulp, <= 2**-10 ~ 9.8e-4 of the magnitude.
  * bf16 2e-2: the same with a bf16 ulp, <= 2**-7 ~ 7.8e-3 of the magnitude (8-bit significand).
Multi-step loops vs the unfused diffusers sequence (see LOOP_TOL): fp32 errors stay ~1e-7, the
tolerance is 2e-5 over 6..10 steps. In fp16/bf16 diffusers itself computes its intermediates (CFG
combine, DDIM x0, add_noise, the blend) in the low precision while the fused path keeps fp32
registers, so the two drift apart by several low-precision ulps per step; the loop tolerances are a
few ulps times the step count (fp16 1e-2, bf16 8e-2), and a second check asserts that the fused
result is no further from an fp32 run than the unfused one is (it is usually closer).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import subprocess
import sys
import warnings

import pytest
import torch

from cg4ctr_fast.kernels import step as step_mod
from cg4ctr_fast.kernels.step import (
    Blend,
    FusedStep,
    UnfusedStep,
    fused_unsupported_reason,
    make_step,
    resolve_backend,
    supports_fused,
    unfused_step,
)

diffusers = pytest.importorskip("diffusers")
triton = pytest.importorskip("triton")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from cg4ctr_fast.kernels.ddim_step import ddim_step, ddim_step_ref  # noqa: E402
from cg4ctr_fast.kernels.dpm_solver_step import dpm_solver_step, dpm_solver_step_ref  # noqa: E402
from cg4ctr_fast.kernels.euler_step import euler_step, euler_step_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LOOP_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}
BLOCK = 2048  # 7*4*13*11 = 4004 elements -> 2 programs with a masked tail; batch 1 -> 1 program


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> float:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    g, w = got.float(), want.float()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    scale = max(1.0, w.abs().max().item())
    err = (g - w).abs().max().item() / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


# ---------------------------------------------------------------------------------------------
# Kernel vs reference on random inputs.


def _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch, seed=0):
    """Random UNet output / latents / blend tensors. blend: None | "noisy" | "last"."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mo = r(2 * batch if cfg else batch, *shape).to(dtype)
    sample = (3 * r(batch, *shape)).to(dtype)
    kw = {"guidance_scale": 7.5 if cfg else None}
    if blend is not None:
        mb = {"1": 1, "B": batch, "2B": 2 * batch}[mask_batch]
        # soft mask values in [0, 1] exercise both blend terms; exact 0/1 too
        mask = torch.rand(mb, 1, *shape[1:], generator=g)
        mask[..., :2] = 0.0
        mask[..., -2:] = 1.0
        kw["mask"] = mask.to(dtype)
        kw["image_latents"] = r(1 if image_batch == "1" else batch, *shape).to(dtype)
        kw["noise"] = r(batch, *shape).to(dtype) if blend == "noisy" else None
        kw["init_image"], kw["init_noise"] = 0.6, 0.8
    return mo, sample, kw


# (batch, per-item shape, mask batch, image batch): odd sizes, batch 1 and 7, other ranks too
SHAPES = [
    (1, (4, 13, 11), "1", "1"),
    (7, (4, 13, 11), "B", "1"),
    (7, (4, 13, 11), "2B", "B"),
    (3, (2, 5, 7, 3), "1", "B"),
    (2, (3, 37), "B", "B"),
]


def _cases():
    out = []
    for dname in DTYPES:
        for i, (b, shape, mb, ib) in enumerate(SHAPES):
            for cfg in (True, False):
                for blend in (None, "noisy", "last"):
                    # full product on the main shapes, a rotating subset on the others
                    if i >= 3 and (cfg, blend) not in ((True, "noisy"), (False, "last")):
                        continue
                    out.append(pytest.param(dname, b, shape, mb, ib, cfg, blend,
                                            id=f"{dname}-B{b}-{'x'.join(map(str, shape))}-m{mb}-i{ib}"
                                               f"-{'cfg' if cfg else 'nocfg'}-{blend or 'noblend'}"))
    return out


@pytest.mark.parametrize("dname,batch,shape,mask_batch,image_batch,cfg,blend", _cases())
def test_ddim_kernel_matches_ref(dname, batch, shape, mask_batch, image_batch, cfg, blend):
    dtype = DTYPES[dname]
    mo, sample, kw = _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch)
    # epsilon-style coefficients; clip on for half the cases (0.9 clips a good share of |x0|)
    coefs = dict(x0_sample=1.3, x0_model=-0.7, eps_sample=0.1, eps_model=0.95, prev_x0=0.8, prev_eps=0.6,
                 clip_range=0.9 if batch % 2 else None)
    got = ddim_step(mo, sample, **coefs, **kw, block_size=BLOCK)
    want = ddim_step_ref(mo, sample, **coefs, **kw)
    assert_close(got, want, KERNEL_TOL[dtype], "ddim")


@pytest.mark.parametrize("dname,batch,shape,mask_batch,image_batch,cfg,blend", _cases())
def test_euler_kernel_matches_ref(dname, batch, shape, mask_batch, image_batch, cfg, blend):
    dtype = DTYPES[dname]
    mo, sample, kw = _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch, seed=1)
    coefs = dict(x0_sample=0.25, x0_model=-0.9, sigma_hat=2.5, dt=-0.8)
    got = euler_step(mo, sample, **coefs, **kw, block_size=BLOCK)
    want = euler_step_ref(mo, sample, **coefs, **kw)
    assert_close(got, want, KERNEL_TOL[dtype], "euler")


@pytest.mark.parametrize("dname,batch,shape,mask_batch,image_batch,cfg,blend", _cases())
def test_dpm_kernel_matches_ref(dname, batch, shape, mask_batch, image_batch, cfg, blend):
    dtype = DTYPES[dname]
    mo, sample, kw = _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch, seed=2)
    second = blend != "last"  # first-order update on (what would be) the final step
    prev_x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(3)).to(dtype) if second else None
    coefs = dict(x0_sample=1.2, x0_model=-0.5, coef_sample=0.7, coef_x0=0.4,
                 coef_diff=0.3 if second else 0.0, prev_x0=prev_x0)
    got, got_x0 = dpm_solver_step(mo, sample, **coefs, **kw, block_size=BLOCK)
    want, want_x0 = dpm_solver_step_ref(mo, sample, **coefs, **kw)
    assert_close(got_x0, want_x0, KERNEL_TOL[dtype], "dpm x0")
    assert_close(got, want, KERNEL_TOL[dtype], "dpm prev_sample")


def test_kernels_default_block_and_inplace_out():
    mo, sample, kw = _inputs(7, (4, 13, 11), torch.float32, True, "noisy", "B", "1")
    coefs = dict(x0_sample=0.25, x0_model=-0.9, sigma_hat=2.5, dt=-0.8)
    want = euler_step_ref(mo, sample, **coefs, **kw)
    buf = sample.clone()
    got = euler_step(mo, buf, **coefs, **kw, out=buf)  # default block, in place
    assert got.data_ptr() == buf.data_ptr()
    assert_close(got, want, 1e-5, "euler in place")


def test_kernel_shape_errors():
    mo, sample, kw = _inputs(2, (4, 5, 6), torch.float32, True, "noisy", "B", "1")
    coefs = dict(x0_sample=1.0, x0_model=-1.0, sigma_hat=1.0, dt=-0.5)
    with pytest.raises(ValueError, match="model_output shape"):
        euler_step(mo[:3], sample, **coefs, **kw)
    with pytest.raises(ValueError, match="model_output shape"):
        euler_step_ref(mo, sample, **{**coefs, **kw, "guidance_scale": None})
    with pytest.raises(ValueError, match="mask shape"):
        euler_step(mo, sample, **{**coefs, **kw, "mask": kw["mask"][:, :, :4]})
    with pytest.raises(ValueError, match="noise shape"):
        euler_step(mo, sample, **{**coefs, **kw, "noise": kw["noise"][:, :3]})
    with pytest.raises(TypeError):
        euler_step(mo.double(), sample.double(), **coefs)


# ---------------------------------------------------------------------------------------------
# Multi-step loops with real diffusers schedulers: FusedStep vs unfused_step.

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LOOP_CASES = {
    # SD-1.5 style DDIM: epsilon, no clipping, leading spacing with offset
    "ddim-eps": (DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    # library defaults: linear betas, clip_sample=True (x0 clamped to [-1, 1]); v-prediction, trailing
    "ddim-v-clip": (DDIMScheduler, dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    "euler-eps": (EulerDiscreteScheduler, dict(SD, steps_offset=1, timestep_spacing="leading")),
    "euler-v-karras": (EulerDiscreteScheduler, dict(SD, prediction_type="v_prediction", use_karras_sigmas=True)),
    "dpm-eps": (DPMSolverMultistepScheduler, dict(SD)),
    "dpm-v-heun-sigmamin": (DPMSolverMultistepScheduler, dict(SD, prediction_type="v_prediction", solver_type="heun",
                                                             final_sigmas_type="sigma_min", use_karras_sigmas=True)),
}

# (steps, start index, cfg, blend, dtype name, call set_begin_index)
LOOP_VARIANTS = {
    "full-cfg-blend-fp32": (6, 0, True, True, "fp32", True),
    "strength0.6-nocfg-blend-fp32": (10, 4, False, True, "fp32", True),
    "noblend-cfg-fp32-nobegin": (6, 0, True, False, "fp32", False),
    "full-cfg-blend-fp16": (6, 0, True, True, "fp16", True),
    "strength0.5-cfg-blend-bf16": (8, 4, True, True, "bf16", True),
}


def _make(cls, kw, steps, start, set_begin):
    s = cls(**kw)
    s.set_timesteps(steps)
    if set_begin and hasattr(s, "set_begin_index"):
        s.set_begin_index(start * s.order)
    return s


def _state(s):
    st = {"step_index": getattr(s, "step_index", None)}
    if isinstance(s, DPMSolverMultistepScheduler):
        st["lower_order_nums"] = s.lower_order_nums
    return st


def _run_loop(case, variant, backend, schedule=None):
    """Run fused (or a fused/unfused mix per `schedule`) and unfused side by side; check every step."""
    cls, kw = LOOP_CASES[case]
    steps, start, cfg, use_blend, dname, set_begin = LOOP_VARIANTS[variant]
    dtype = DTYPES[dname]
    s_fused = _make(cls, kw, steps, start, set_begin)
    s_ref = _make(cls, kw, steps, start, set_begin)
    s_fp32 = _make(cls, kw, steps, start, set_begin) if dtype != torch.float32 else None
    timesteps = s_ref.timesteps[start:]
    g = torch.Generator().manual_seed(1234)
    batch, shape = 2, (4, 13, 11)
    image_latents = torch.randn(1, *shape, generator=g).to(dtype)
    noise = torch.randn(batch, *shape, generator=g).to(dtype)
    mask = (torch.rand(batch, 1, *shape[1:], generator=g) > 0.4).to(dtype)
    if start == 0:
        latents = noise * s_ref.init_noise_sigma
    else:  # img2img-style start: noised image latents at the first timestep
        latents = s_ref.add_noise(image_latents.float(), noise.float(), timesteps[:1]).to(dtype)
    a = b = latents.to(dtype)
    c = a.float()
    fused = FusedStep(s_fused, 7.5, cfg, backend)
    for i, t in enumerate(timesteps):
        model_in = []
        for s, x in ((s_fused, a), (s_ref, b)):
            model_in.append(s.scale_model_input(torch.cat([x] * 2) if cfg else x, t))
        if s_fp32 is not None:
            s_fp32.scale_model_input(torch.cat([c] * 2) if cfg else c, t)
        # a stand-in UNet: random, plus a weak dependence on its input
        noise_pred = (torch.randn(2 * batch if cfg else batch, *shape, generator=g) + 0.1 * model_in[1].float()).to(dtype)
        next_t = timesteps[i + 1] if i < len(timesteps) - 1 else None
        blend = Blend(mask, image_latents, noise, next_t) if use_blend else None
        if schedule is not None and not schedule[i]:
            a = unfused_step(s_fused, noise_pred, t, a, 7.5, cfg, blend)
        else:
            a = fused(noise_pred, t, a, blend=blend)
        b = unfused_step(s_ref, noise_pred, t, b, 7.5, cfg, blend)
        assert a.dtype == b.dtype == dtype
        assert _state(s_fused) == _state(s_ref), f"step {i}: {_state(s_fused)} != {_state(s_ref)}"
        what = f"{case}/{variant}/{backend} step {i} (t={int(t)})"
        assert_close(a, b, LOOP_TOL[dtype], what)
        if isinstance(s_ref, DPMSolverMultistepScheduler):
            for m_f, m_r in zip(s_fused.model_outputs, s_ref.model_outputs):
                assert (m_f is None) == (m_r is None)
                if m_f is not None:
                    assert_close(m_f, m_r, LOOP_TOL[dtype] * 4, what + " model_outputs")
        if s_fp32 is not None:
            blend32 = None
            if use_blend:
                blend32 = Blend(mask.float(), image_latents.float(), noise.float(), next_t)
            c = unfused_step(s_fp32, noise_pred.float(), t, c, 7.5, cfg, blend32)
            scale = max(1.0, c.abs().max().item())
            err_fused = (a.float() - c).abs().max().item() / scale
            err_unfused = (b.float() - c).abs().max().item() / scale
            ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
            assert err_fused <= 1.5 * err_unfused + 2 * ulp, f"{what}: fused {err_fused:.2e} vs unfused {err_unfused:.2e}"
    return a


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(LOOP_VARIANTS))
@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_loop_matches_unfused(case, variant, backend):
    _run_loop(case, variant, backend)


@pytest.mark.parametrize("case", ["dpm-eps", "euler-eps", "ddim-eps"])
def test_fused_and_unfused_steps_mix(case):
    # the scheduler state FusedStep leaves is what scheduler.step expects, and vice versa
    _run_loop(case, "full-cfg-blend-fp32", "torch", schedule=[True, False, True, True, False, True])


def test_dpm_second_order_and_final_step_taken():
    # 6 steps: first order, 4 second-order steps, first order at the end (final_sigmas_type "zero")
    cls, kw = LOOP_CASES["dpm-eps"]
    s = _make(cls, kw, 6, 0, True)
    orders = []
    fused = FusedStep(s, 5.0, False, "torch")
    x = torch.randn(1, 4, 8, 8)
    for t in s.timesteps:
        before = s.lower_order_nums
        n, i = len(s.timesteps), s.step_index if s.step_index is not None else 0
        orders.append(1 if before < 1 or i == n - 1 else 2)
        x = fused(torch.randn(1, 4, 8, 8), t, x)
    assert orders == [1, 2, 2, 2, 2, 1]
    assert s.step_index == 6 and s.lower_order_nums == 2


# ---------------------------------------------------------------------------------------------
# API: support checks, make_step, backends, fallbacks, import hygiene.


def test_supports_fused_and_errors():
    assert supports_fused(DDIMScheduler(**SD))
    assert supports_fused(EulerDiscreteScheduler(**SD))
    assert supports_fused(DPMSolverMultistepScheduler(**SD))
    unsupported = [
        PNDMScheduler(**SD),
        DDIMScheduler(**SD, thresholding=True),
        DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++"),
        DPMSolverMultistepScheduler(**SD, solver_order=3),
        DPMSolverMultistepScheduler(**SD, thresholding=True),
    ]
    for s in unsupported:
        assert not supports_fused(s)
        assert fused_unsupported_reason(s)
        with pytest.raises(ValueError, match="no fused step"):
            make_step(s, 7.5, True, fused=True)
        assert isinstance(make_step(s, 7.5, True, fused=False), UnfusedStep)
    assert not supports_fused(DDIMScheduler(**SD), eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        FusedStep(DDIMScheduler(**SD), 7.5, True, eta=0.5)
    with pytest.raises(ValueError, match="backend"):
        FusedStep(DDIMScheduler(**SD), 7.5, True, backend="cuda")
    assert isinstance(make_step(DDIMScheduler(**SD), 7.5, True, fused=True, backend="torch"), FusedStep)


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError):
        resolve_backend("numpy", torch.device("cpu"))


def test_unfused_step_object_and_out_and_dtype_fallback():
    cls, kw = LOOP_CASES["euler-eps"]
    s1, s2 = _make(cls, kw, 4, 0, True), _make(cls, kw, 4, 0, True)
    t = s1.timesteps[0]
    x = torch.randn(2, 4, 6, 6)
    npred = torch.randn(4, 4, 6, 6)
    s1.scale_model_input(x, t)
    s2.scale_model_input(x, t)
    buf = x.clone()
    got = FusedStep(s1, 3.0, True, "auto")(npred, t, buf, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    want = UnfusedStep(s2, 3.0, True)(npred, t, x)
    assert_close(got, want, 1e-5)
    # mismatched dtypes: FusedStep warns and runs the exact unfused sequence
    s3, s4 = _make(cls, kw, 4, 0, True), _make(cls, kw, 4, 0, True)
    with pytest.warns(RuntimeWarning, match="unfused"):
        got = FusedStep(s3, 3.0, True, "torch")(npred.half(), t, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = unfused_step(s4, npred.half(), t, x, 3.0, True, None)
    assert torch.equal(got, want) and s3.step_index == s4.step_index == 1


def test_blend_accepts_tuple_and_2b_mask():
    cls, kw = LOOP_CASES["dpm-eps"]
    s1, s2 = _make(cls, kw, 4, 0, True), _make(cls, kw, 4, 0, True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 7, generator=g)
    npred = torch.randn(6, 4, 5, 7, generator=g)
    mask = (torch.rand(3, 1, 5, 7, generator=g) > 0.5).float()
    img, noise = torch.randn(1, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
    t, nt = s1.timesteps[0], s1.timesteps[1]
    got = FusedStep(s1, 7.5, True, "triton")(npred, t, x, blend=(torch.cat([mask] * 2), img, noise, nt))
    want = unfused_step(s2, npred, t, x, 7.5, True, Blend(mask, img, noise, nt))
    assert_close(got, want, 1e-5)


def _run_clean(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_import_does_not_load_triton():
    out = _run_clean(
        "import sys\n"
        "import cg4ctr_fast.kernels, cg4ctr_fast.kernels.step, cg4ctr_fast.kernels.reference\n"
        "from cg4ctr_fast.kernels import FusedStep, make_step, supports_fused, ddim_step_ref\n"
        "import torch\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "ddim_step_ref(torch.randn(4, 4, 3, 3), x, guidance_scale=7.5, x0_sample=1.0, x0_model=-0.5,\n"
        "              eps_sample=0.0, eps_model=1.0, prev_x0=0.9, prev_eps=0.4)\n"
        "print('triton' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    assert out == "False False"


def test_step_module_has_no_triton_reference():
    # the torch backend never touches the kernel modules
    assert step_mod._ops("torch")[0] is ddim_step_ref
    assert step_mod._ops("triton")[0] is ddim_step


def test_timestep_lookup_without_item():
    # elements (and slices) of scheduler.timesteps are read from a host copy; anything else via .item()
    s = _make(DDIMScheduler, dict(SD), 10, 0, False)
    fused = FusedStep(s, 7.5, True, "torch")
    ts = s.timesteps
    sub = ts[3:]
    for i, t in enumerate(sub):
        assert fused._timestep_value(t) == int(ts[3 + i])
    assert fused._timestep_value(ts[-1].clone()) == int(ts[-1])
    assert fused._timestep_value(int(ts[2])) == int(ts[2])
    s.set_timesteps(7)  # a new schedule replaces the host copy
    assert fused._timestep_value(s.timesteps[1]) == int(s.timesteps[1])
    s.timesteps[1] = 5  # in-place edits too (version counter)
    assert fused._timestep_value(s.timesteps[1]) == 5


@pytest.mark.parametrize("case", ["dpm-eps", "euler-v-karras", "ddim-eps"])
def test_loop_under_inference_mode(case):
    with torch.inference_mode():
        _run_loop(case, "full-cfg-blend-fp32", "triton")


def test_bf16_store_rounds_to_nearest_even():
    # the interpreter truncates fp32 -> bf16; the kernels round with integer ops there (see _to_storage)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 21, 17, generator=g) * 10
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-40, 3e38])
    mo = torch.zeros(3, 4, 21, 17, dtype=torch.bfloat16)
    _, x0 = dpm_solver_step(mo, x, guidance_scale=None, x0_sample=1.0, x0_model=0.0, coef_sample=1.0, coef_x0=0.0)
    assert torch.equal(x0, x.to(torch.bfloat16))
