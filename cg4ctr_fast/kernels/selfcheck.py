"""GPU self-check of the fused step kernels: ``python -m cg4ctr_fast.kernels.selfcheck [--quick]``.

Needs CUDA, triton and diffusers. Prints, then exits non-zero on any failure:
1. each compiled kernel vs its torch reference on CUDA tensors (fp32/fp16/bf16, CFG, blend, LCM/TCD step noise),
2. full denoising loops: FusedStep (backend triton) vs the unfused diffusers sequence, with the fused
   steps after the first run under torch.cuda.set_sync_debug_mode("error") (a step must not wait
   for the GPU; the first may copy the schedule to the host once),
3. time per step of a 20-step inpainting loop: unfused vs FusedStep(torch) vs FusedStep(triton).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LOOP_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def check_kernels(dev: str) -> int:
    from .ddim_step import ddim_step, ddim_step_ref
    from .dpm_solver_step import dpm_solver_step, dpm_solver_step_ref
    from .euler_step import euler_step, euler_step_ref
    from .lcm_step import lcm_step, lcm_step_ref
    from .tcd_step import tcd_step, tcd_step_ref

    fails = 0
    worst: dict = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for shape in [(1, 4, 64, 64), (7, 4, 13, 11), (4, 4, 96, 96)]:
        b = shape[0]
        for dtype in KERNEL_TOL:
            for cfg in (True, False):
                for blend in (None, "noisy", "last"):
                    r = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
                    mo = r(2 * b if cfg else b, *shape[1:]).to(dtype)
                    x = (3 * r(*shape)).to(dtype)
                    kw: dict = {"guidance_scale": 7.5 if cfg else None}
                    if blend:
                        kw["mask"] = torch.rand(b, 1, *shape[2:], generator=g, device=dev).to(dtype)
                        kw["image_latents"] = r(1, *shape[1:]).to(dtype)
                        kw["noise"] = r(*shape).to(dtype) if blend == "noisy" else None
                        kw["init_image"], kw["init_noise"] = 0.6, 0.8
                    pairs = [
                        ("ddim", ddim_step, ddim_step_ref,
                         dict(x0_sample=1.3, x0_model=-0.7, eps_sample=0.1, eps_model=0.95, prev_x0=0.8,
                              prev_eps=0.6, clip_range=0.9 if cfg else None)),
                        ("euler", euler_step, euler_step_ref, dict(x0_sample=0.25, x0_model=-0.9, sigma_hat=2.5, dt=-0.8)),
                        ("dpm", dpm_solver_step, dpm_solver_step_ref,
                         dict(x0_sample=1.2, x0_model=-0.5, coef_sample=0.7, coef_x0=0.4, coef_diff=0.3,
                              prev_x0=r(*shape).to(dtype) if blend != "last" else None)),
                        ("lcm", lcm_step, lcm_step_ref,
                         dict(x0_sample=1.3, x0_model=-0.7, c_skip=0.15, c_out=0.92, prev_denoised=0.8, prev_noise=0.6,
                              clip_range=0.9 if cfg else None,
                              step_noise=r(*shape).to(dtype) if blend != "last" else None)),
                        ("tcd", tcd_step, tcd_step_ref,
                         dict(x0_sample=1.3, x0_model=-0.7, eps_sample=0.1, eps_model=0.95, noised_x0=0.85,
                              noised_eps=0.53, prev_noised=0.9, prev_noise=0.44,
                              step_noise=r(*shape).to(dtype) if blend != "last" else None)),
                    ]
                    for name, fn, ref, coefs in pairs:
                        got, want = fn(mo, x, **coefs, **kw), ref(mo, x, **coefs, **kw)
                        if name == "dpm":
                            errs = [_rel(got[0], want[0]), _rel(got[1], want[1])]
                        else:
                            errs = [_rel(got, want)]
                        err = max(errs)
                        key = (name, str(dtype).split(".")[-1])
                        worst[key] = max(worst.get(key, 0.0), err)
                        if err > KERNEL_TOL[dtype]:
                            fails += 1
                            print(f"FAIL kernel {name} {dtype} {shape} cfg={cfg} blend={blend}: {err:.2e}")
    for key, err in sorted(worst.items()):
        print(f"kernel {key[0]:5s} {key[1]:8s} max rel err vs ref {err:.2e}")
    return fails


def _loop(cls, kw, steps, strength, dtype, dev, mode, shape=(1, 4, 64, 64), cfg=True, seed=0, blend=True,
          sync_check=False, eta=0.0):
    """One inpainting-style loop; mode: 'unfused' | 'torch' | 'triton'. Returns final latents.

    ``eta``: TCD's gamma (0 for the others). LCM/TCD draw their injected noise from a step generator seeded
    the same way in every mode, so the modes see the same noise."""
    from .step import Blend, FusedStep, unfused_step

    s = cls(**kw)
    s.set_timesteps(steps, device=dev)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = s.timesteps[t_start * s.order:]
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(t_start * s.order)
    g = torch.Generator(device=dev).manual_seed(seed)
    b = shape[0]
    image_latents = torch.randn(1, *shape[1:], generator=g, device=dev).to(dtype)
    noise = torch.randn(*shape, generator=g, device=dev).to(dtype)
    mask = (torch.rand(b, 1, *shape[2:], generator=g, device=dev) > 0.4).to(dtype)
    preds = [torch.randn(2 * b if cfg else b, *shape[1:], generator=g, device=dev).to(dtype) for _ in timesteps]
    if strength >= 1.0:
        latents = noise * s.init_noise_sigma
    else:
        latents = s.add_noise(image_latents, noise, timesteps[:1].repeat(b))
    latents = latents.to(dtype)
    step_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    step = None if mode == "unfused" else FusedStep(s, 7.5, cfg, mode, eta=eta, generator=step_gen)
    for i, t in enumerate(timesteps):
        s.scale_model_input(latents, t)
        nt = timesteps[i + 1] if i < len(timesteps) - 1 else None
        bl = Blend(mask, image_latents, noise, nt) if blend else None
        if step is None:
            latents = unfused_step(s, preds[i], t, latents, 7.5, cfg, bl, step_gen, eta=eta)
        elif sync_check and i > 0:
            # after the first step (which may read the schedule once into a host copy), any
            # GPU->host sync inside the fused step raises
            torch.cuda.set_sync_debug_mode("error")
            try:
                latents = step(preds[i], t, latents, blend=bl)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            latents = step(preds[i], t, latents, blend=bl)
    return latents, len(timesteps)


def _cases():
    """name -> (scheduler class, config, eta: TCD's gamma, 0 otherwise)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    return {
        "ddim": (DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 0.0),
        "euler": (EulerDiscreteScheduler, dict(SD, steps_offset=1, timestep_spacing="leading"), 0.0),
        "dpm++2m": (DPMSolverMultistepScheduler, dict(SD), 0.0),
        "dpm++2m-v-karras": (DPMSolverMultistepScheduler, dict(SD, prediction_type="v_prediction", use_karras_sigmas=True),
                             0.0),
        "lcm": (LCMScheduler, dict(SD), 0.0),
        "tcd": (TCDScheduler, dict(SD), 0.3),
    }


def check_loops(dev: str) -> int:
    fails = 0
    for name, (cls, kw, eta) in _cases().items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for strength in (1.0, 0.6):
                ref, _ = _loop(cls, kw, 20, strength, dtype, dev, "unfused", eta=eta)
                got, n = _loop(cls, kw, 20, strength, dtype, dev, "triton", sync_check=dev == "cuda", eta=eta)
                err = _rel(got, ref)
                ok = err <= LOOP_TOL[dtype]
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} loop {name:17s} {str(dtype):14s} strength {strength}: "
                      f"{n} steps, final rel err fused vs unfused {err:.2e}")
    return fails


def bench(dev: str, repeats: int) -> None:
    cases = _cases()
    for shape, label in [((1, 4, 64, 64), "512px B1"), ((4, 4, 96, 96), "768px B4"), ((1, 4, 128, 128), "1024px B1")]:
        for name in ("ddim", "euler", "dpm++2m", "lcm", "tcd"):
            cls, kw, eta = cases[name]
            row = []
            for mode in ("unfused", "torch", "triton"):
                times = []
                for rep in range(repeats + 2):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    _, n = _loop(cls, kw, 20, 1.0, torch.float16, dev, mode, shape=shape, eta=eta)
                    torch.cuda.synchronize()
                    if rep >= 2:
                        times.append((time.perf_counter() - t0) / n)
                row.append(statistics.median(times) * 1e6)
            print(f"bench {label:10s} fp16 cfg+blend {name:8s}: us/step unfused {row[0]:7.1f} | "
                  f"fused torch {row[1]:7.1f} | fused triton {row[2]:7.1f}  (x{row[0] / row[2]:.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run under TRITON_INTERPRET=1 (no timing)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    import triton

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (triton interpreter)"
    print(f"device {name} torch {torch.__version__} triton {triton.__version__}")
    fails = check_kernels(dev) + check_loops(dev)
    if dev == "cuda" and not args.no_bench:
        bench(dev, 3 if args.quick else 10)
    print("FAILURES:", fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
