"""Few-step schedulers (diffusers' LCMScheduler, TCDScheduler): fused kernels and FusedStep.

* Each Triton kernel vs its torch reference under TRITON_INTERPRET=1 (set by tests/test_kernels.py, whose
  helpers, shapes and tolerances are reused: KERNEL_TOL fp32 1e-5, fp16 2e-3, bf16 2e-2, relative to
  magnitude; the reasoning is in that module's docstring), odd shapes, with and without CFG, the 4-channel
  blend and the injected step noise.
* FusedStep vs the scheduler's own ``step`` (through ``unfused_step``), step by step, with equally seeded
  generators: the injected noise must be the same draw, so the generators must also end in the same state
  (same number of draws; none on the schedule's last step; none for TCD with gamma 0). LOOP_TOL as in
  test_kernels (fp32 2e-5; fp16 1e-2 and bf16 8e-2, where diffusers keeps its intermediates in the low
  precision and the fused path in fp32 registers). A wrong coefficient or a different noise draw moves the
  latents by > 1e-1 relative (z has unit variance), far above these.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_kernels import BLOCK, DTYPES, KERNEL_TOL, LOOP_TOL, SD, _cases, _inputs, assert_close

from cg4ctr_fast.kernels import step as step_mod  # noqa: E402  (after test_kernels set TRITON_INTERPRET)
from cg4ctr_fast.kernels.step import (  # noqa: E402
    Blend,
    FusedStep,
    UnfusedStep,
    fused_unsupported_reason,
    make_step,
    supports_fused,
    unfused_step,
)

from diffusers import LCMScheduler, TCDScheduler  # noqa: E402

from cg4ctr_fast.kernels.lcm_step import lcm_step, lcm_step_ref  # noqa: E402
from cg4ctr_fast.kernels.tcd_step import tcd_step, tcd_step_ref  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Kernel vs reference.


def _step_noise(kw, sample, blend, seed):
    # the scheduler injects z on every step but the last; "last" blend cases run without it
    if blend == "last":
        return None
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(sample.shape, generator=g).to(sample.dtype)


@pytest.mark.parametrize("dname,batch,shape,mask_batch,image_batch,cfg,blend", _cases())
def test_lcm_kernel_matches_ref(dname, batch, shape, mask_batch, image_batch, cfg, blend):
    dtype = DTYPES[dname]
    mo, sample, kw = _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch, seed=3)
    # epsilon-style x0 at a mid timestep; clip on for odd batches (0.9 clips a good share of |x0|)
    coefs = dict(x0_sample=1.3, x0_model=-0.7, c_skip=0.15, c_out=0.92, prev_denoised=0.8, prev_noise=0.6,
                 clip_range=0.9 if batch % 2 else None, step_noise=_step_noise(kw, sample, blend, 3))
    got = lcm_step(mo, sample, **coefs, **kw, block_size=BLOCK)
    want = lcm_step_ref(mo, sample, **coefs, **kw)
    assert_close(got, want, KERNEL_TOL[dtype], "lcm")


@pytest.mark.parametrize("dname,batch,shape,mask_batch,image_batch,cfg,blend", _cases())
def test_tcd_kernel_matches_ref(dname, batch, shape, mask_batch, image_batch, cfg, blend):
    dtype = DTYPES[dname]
    mo, sample, kw = _inputs(batch, shape, dtype, cfg, blend, mask_batch, image_batch, seed=4)
    coefs = dict(x0_sample=1.3, x0_model=-0.7, eps_sample=0.1, eps_model=0.95, noised_x0=0.85, noised_eps=0.53,
                 prev_noised=0.9, prev_noise=0.44, step_noise=_step_noise(kw, sample, blend, 4))
    got = tcd_step(mo, sample, **coefs, **kw, block_size=BLOCK)
    want = tcd_step_ref(mo, sample, **coefs, **kw)
    assert_close(got, want, KERNEL_TOL[dtype], "tcd")


def test_fewstep_kernels_default_block_inplace_and_errors():
    mo, sample, kw = _inputs(3, (4, 9, 5), torch.float32, True, "noisy", "B", "1", seed=5)
    z = torch.randn(sample.shape)
    lcm = dict(x0_sample=1.1, x0_model=-0.4, c_skip=0.2, c_out=0.9, prev_denoised=0.7, prev_noise=0.7, step_noise=z)
    tcd = dict(x0_sample=1.1, x0_model=-0.4, eps_sample=0.0, eps_model=1.0, noised_x0=0.8, noised_eps=0.6,
               prev_noised=0.9, prev_noise=0.4, step_noise=z)
    for fn, ref, coefs in ((lcm_step, lcm_step_ref, lcm), (tcd_step, tcd_step_ref, tcd)):
        want = ref(mo, sample, **coefs, **kw)
        x = sample.clone()
        got = fn(mo, x, **coefs, **kw, out=x)  # in place, default block
        assert got is x
        assert_close(got, want, KERNEL_TOL[torch.float32], fn.__name__)
        # the step noise really enters: without it the result moves by ~prev_noise * |z|
        assert (ref(mo, sample, **{**coefs, "step_noise": None}, **kw) - want).abs().max() > 0.1
        with pytest.raises(ValueError, match="step_noise"):
            fn(mo, sample, **{**coefs, "step_noise": z[:2]}, **kw)
        with pytest.raises(TypeError, match="step_noise"):
            fn(mo, sample, **{**coefs, "step_noise": z.to(torch.int32)}, **kw)
        with pytest.raises(ValueError, match="model_output shape"):
            fn(mo[:3], sample, **coefs, **kw)


# ---------------------------------------------------------------------------------------------
# FusedStep vs scheduler.step, with generators.

FEW_CASES = {
    # (scheduler class, config, gamma = the step's eta; LCM ignores it)
    "lcm-eps": (LCMScheduler, dict(SD), 0.0),
    # SD folder config as swap_scheduler passes it; v-prediction with clip_sample (x0 clamped to [-1, 1])
    "lcm-v-clip": (LCMScheduler, dict(SD, prediction_type="v_prediction", clip_sample=True, set_alpha_to_one=False,
                                      steps_offset=1), 0.0),
    "lcm-sample-scaling5": (LCMScheduler, dict(SD, prediction_type="sample", timestep_scaling=5.0,
                                               original_inference_steps=40), 0.0),
    "tcd-eps-gamma0.3": (TCDScheduler, dict(SD), 0.3),
    "tcd-v-gamma0.9": (TCDScheduler, dict(SD, prediction_type="v_prediction"), 0.9),
    "tcd-sample-gamma0": (TCDScheduler, dict(SD, prediction_type="sample"), 0.0),
}

# (steps, custom timesteps or (steps, set_timesteps strength), start index, cfg, blend, dtype name,
#  call set_begin_index, generator list)
FEW_VARIANTS = {
    "4-cfg-blend-fp32": (4, 0, True, True, "fp32", True, False),
    # diffusers' LCM img2img pipelines pass strength to set_timesteps (4 steps from the first half of the
    # distillation schedule) instead of slicing the schedule as the inpainting pipeline does
    "set_timesteps-strength0.5-cfg-blend-fp32": ((4, 0.5), 0, True, True, "fp32", True, False),
    "strength0.5-nocfg-blend-fp32-genlist": (6, 3, False, True, "fp32", True, True),
    "4-nocfg-noblend-fp32-nobegin": (4, 0, False, False, "fp32", False, False),
    "1-step-cfg-blend-fp32": (1, 0, True, True, "fp32", True, False),
    "4-cfg-blend-fp16": (4, 0, True, True, "fp16", True, False),
    "4-nocfg-blend-bf16": (4, 1, False, True, "bf16", True, False),
}


def _few_make(cls, kw, steps, start, set_begin):
    s = cls(**kw)
    if isinstance(steps, list):
        s.set_timesteps(timesteps=steps)
    elif isinstance(steps, tuple):
        s.set_timesteps(steps[0], strength=steps[1])
    else:
        s.set_timesteps(steps)
    if set_begin:
        s.set_begin_index(start)
    return s


def _gens(seed, batch, as_list):
    if as_list:
        return [torch.Generator().manual_seed(seed + k) for k in range(batch)]
    return torch.Generator().manual_seed(seed)


def _gen_states(g):
    return [x.get_state() for x in g] if isinstance(g, list) else [g.get_state()]


def _run_few(case, steps, start, cfg, use_blend, dname, set_begin, gen_list, backend, schedule=None):
    """FusedStep (or a fused/unfused mix per `schedule`) and scheduler.step side by side; check every step."""
    cls, kw, gamma = FEW_CASES[case]
    dtype = DTYPES[dname]
    s_fused = _few_make(cls, kw, steps, start, set_begin)
    s_ref = _few_make(cls, kw, steps, start, set_begin)
    timesteps = s_ref.timesteps[start:]
    g = torch.Generator().manual_seed(99)
    batch, shape = 2, (4, 7, 9)
    image_latents = torch.randn(1, *shape, generator=g).to(dtype)
    noise = torch.randn(batch, *shape, generator=g).to(dtype)
    mask = (torch.rand(batch, 1, *shape[1:], generator=g) > 0.4).to(dtype)
    if start == 0:
        latents = noise * s_ref.init_noise_sigma
    else:  # strength < 1: noised image latents at the first timestep
        latents = s_ref.add_noise(image_latents.float(), noise.float(), timesteps[:1]).to(dtype)
    a = b = latents.to(dtype)
    gen_fused, gen_ref = _gens(7, batch, gen_list), _gens(7, batch, gen_list)
    fused = FusedStep(s_fused, 1.5, cfg, backend, eta=gamma, generator=gen_fused)
    for i, t in enumerate(timesteps):
        noise_pred = (torch.randn(2 * batch if cfg else batch, *shape, generator=g) + 0.1 * b.float().repeat(
            2 if cfg else 1, 1, 1, 1)).to(dtype)
        next_t = timesteps[i + 1] if i < len(timesteps) - 1 else None
        blend = Blend(mask, image_latents, noise, next_t) if use_blend else None
        if schedule is not None and not schedule[i]:
            a = unfused_step(s_fused, noise_pred, t, a, 1.5, cfg, blend, gen_fused, eta=gamma)
        else:
            a = fused(noise_pred, t, a, blend=blend)
        b = unfused_step(s_ref, noise_pred, t, b, 1.5, cfg, blend, gen_ref, eta=gamma)
        what = f"{case}/{backend} step {i} (t={int(t)})"
        assert a.dtype == b.dtype == dtype
        assert s_fused.step_index == s_ref.step_index, what
        assert all(torch.equal(x, y) for x, y in zip(_gen_states(gen_fused), _gen_states(gen_ref))), \
            f"{what}: the step drew a different number of random numbers than diffusers"
        assert_close(a, b, LOOP_TOL[dtype], what)
    return a, gen_fused


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(FEW_VARIANTS))
@pytest.mark.parametrize("case", list(FEW_CASES))
def test_fused_step_matches_scheduler_step(case, variant, backend):
    _, gen = _run_few(case, *FEW_VARIANTS[variant], backend)
    steps, start = FEW_VARIANTS[variant][:2]
    steps = steps[0] if isinstance(steps, tuple) else steps
    gamma = FEW_CASES[case][2]
    fresh = _gens(7, 2, FEW_VARIANTS[variant][6])
    drew = not all(torch.equal(x, y) for x, y in zip(_gen_states(gen), _gen_states(fresh)))
    # noise on every step but the schedule's last one; TCD only with gamma > 0
    assert drew == (steps - start > 1 and (case.startswith("lcm") or gamma > 0))


@pytest.mark.parametrize("case", ["lcm-eps", "tcd-eps-gamma0.3"])
def test_fused_and_unfused_steps_mix(case):
    # the state (step index, generator stream) FusedStep leaves is what scheduler.step expects, and vice versa
    _run_few(case, 4, 0, True, True, "fp32", True, False, "torch", schedule=[True, False, True, False])
    _run_few(case, 4, 0, True, True, "fp32", True, False, "torch", schedule=[False, True, False, True])


def test_tcd_timestep_s_rounds_as_float32():
    # gamma 0.3: floor(0.7 * t_prev) is 455/238/63 in fp32 but 454/237/62 in fp64 for t_prev 650/340/90, which
    # selects other alphas_cumprod entries: a float64 floor gave 3.9e-4 relative error at step 0, 20x LOOP_TOL fp32
    _run_few("tcd-eps-gamma0.3", [999, 650, 340, 90], 0, True, True, "fp32", True, False, "torch")


def test_supports_fused_fewstep():
    assert supports_fused(LCMScheduler(**SD))
    assert supports_fused(TCDScheduler(**SD), eta=0.3)
    assert supports_fused(TCDScheduler(**SD, thresholding=True, clip_sample=True))  # TCD's step ignores both
    unsupported = [
        (LCMScheduler(**SD, thresholding=True), 0.0, "thresholding"),
        (LCMScheduler(**SD, prediction_type="flow_prediction"), 0.0, "prediction_type"),
        (TCDScheduler(**SD, prediction_type="flow_prediction"), 0.0, "prediction_type"),
        (TCDScheduler(**SD), 1.5, "gamma"),
        (TCDScheduler(**SD), -0.1, "gamma"),
    ]
    for s, eta, word in unsupported:
        reason = fused_unsupported_reason(s, eta)
        assert reason and word in reason and "\n" not in reason
        with pytest.raises(ValueError, match="no fused step"):
            make_step(s, 1.5, True, fused=True, eta=eta)
        assert isinstance(make_step(s, 1.5, True, fused=False, eta=eta), UnfusedStep)
    # make_step hands the generator to either implementation
    g = torch.Generator()
    assert make_step(LCMScheduler(**SD), 1.0, False, fused=True, backend="torch", generator=g).generator is g
    assert make_step(LCMScheduler(**SD), 1.0, False, fused=False, generator=g).generator is g
    assert set(step_mod._FAMILY_BY_CLASS) >= {"LCMScheduler", "TCDScheduler"}
    assert step_mod._ops("torch")[3] is lcm_step_ref and step_mod._ops("triton")[4] is tcd_step


def test_mixed_dtype_fallback_keeps_the_generator():
    # fp32 UNet output on fp16 latents runs diffusers' own step, which must still draw from the generator
    s_f, s_r = LCMScheduler(**SD), LCMScheduler(**SD)
    for s in (s_f, s_r):
        s.set_timesteps(4)
    x = torch.randn(1, 4, 5, 6).half()
    mo = torch.randn(1, 4, 5, 6)
    fused = FusedStep(s_f, 1.0, False, "torch", generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="unfused"):
        got = fused(mo, s_f.timesteps[0], x)
    want = unfused_step(s_r, mo, s_r.timesteps[0], x, 1.0, False, None, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
