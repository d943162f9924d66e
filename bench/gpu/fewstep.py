"""Few-step rows of the GPU script: the SD1.5-inpaint architecture, random weights, 8 groups, in one run.

Rows, interleaved round by round (cg4ctr_fast.bench.run_interleaved), on the same product, mask and prompts:
  diffusers 20 guided DDIM steps (the reference) | ours 20 guided DDIM steps | ours 4 LCM steps without guidance,
  one candidate per group | ours 4 LCM steps, 2 candidates per group ranked by tiny-decoder previews, the best
  one fully decoded (preview_top_k=1).
Ours: the `compile` backend (torch.compile; CUDA graphs via reduce-overhead on CUDA) with the fused step on CUDA.
Every row ends with the toy reward model scoring its images (the ranking needs it), diffusers' too.
Random weights: a fused LCM-LoRA costs nothing per step, so the timing is that of a real LCM-LoRA plan.
The VAE decode and the preview decode are reported as their own stages (p50 ms per call).

    python3 bench/gpu/fewstep.py --device cuda --dtype fp16 --json /tmp/out/fewstep.json
    python3 bench/gpu/fewstep.py --preset tiny --device cpu --dtype fp32 --runs 1 --warmup 0 --json /tmp/f.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cg4ctr_fast import bench as hb
from cg4ctr_fast.cli.bench import GROUP_PROMPTS
from cg4ctr_fast.cli.demo import draw_product
from cg4ctr_fast.config import get_preset
from cg4ctr_fast.fileio import atomic_write_bytes
from cg4ctr_fast.imaging import to_rgb_and_alpha_mask
from cg4ctr_fast.models.diffusion import build_modules, diffusers_inpaint_pipeline, make_scheduler
from cg4ctr_fast.models.preview import build_preview_for
from cg4ctr_fast.models.reward import RewardModel
from cg4ctr_fast.pipeline import CreativePipeline
from cg4ctr_fast.runtime.preview import attach_preview_decoder
from cg4ctr_fast.runtime.timing import StageTimer
from cg4ctr_fast.runtime.torch_backend import torch_components
from cg4ctr_fast.training.toy_set import shipped_set_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15-inpaint")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="side in px (default: the preset's)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (compile and CUDA graphs happen here)")
    p.add_argument("--backend", default="compile", choices=("torch", "compile"))
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    preset = get_preset(args.preset)
    size = args.size or preset.resolution

    modules = build_modules(preset, seed=0)
    for module in (modules.unet, modules.vae, modules.text_encoder):
        module.to(device=device, dtype=dtype)
    rgb, mask = to_rgb_and_alpha_mask(draw_product(size))
    prompts = [GROUP_PROMPTS[i % len(GROUP_PROMPTS)] + f", variant {i}" for i in range(args.groups)]

    toy = shipped_set_dir()
    reward = RewardModel.load(toy / "reward")
    groups = json.loads((toy / "world" / "groups.json").read_text())
    features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in groups])
    features = features[np.arange(args.groups) % len(features)]
    score = reward.pipeline_scorer(features, captions=prompts)

    source = hb.compile_modules(modules, device) if args.backend == "compile" else modules
    pipe = CreativePipeline(torch_components(source, backend=args.backend), reward=score)
    pipe.fuse_step = True if device.type == "cuda" else None
    preview = build_preview_for(pipe.components.info, dtype=dtype).to(device)
    attach_preview_decoder(pipe, preview)
    ddim = pipe.scheduler
    lcm = make_scheduler("lcm", dict(ddim.config))

    rows = [  # (name, scheduler, steps, guidance, candidates per group, preview_top_k)
        ("ours ddim-20 w7.5", ddim, 20, 7.5, 1, None),
        ("ours lcm-4 w1", lcm, 4, 1.0, 1, None),
        ("ours lcm-4 w1 n2 preview-top1", lcm, 4, 1.0, 2, 1),
    ]
    variants = []
    timers = {}
    for name, sched, steps, guidance, n, top_k in rows:
        timer = StageTimer(device)
        timers[name] = timer

        def prepare(sched=sched, timer=timer):
            pipe.scheduler = sched
            pipe.timer = timer
            pipe.clear_prompt_cache()

        def call(steps=steps, guidance=guidance, n=n, top_k=top_k):
            try:
                pipe(prompts, rgb, mask, num_inference_steps=steps, guidance_scale=guidance,
                     num_images_per_prompt=n, preview_top_k=top_k, height=size, width=size, show_progress=False)
            finally:
                pipe.timer = None

        variants.append(hb.Variant(name=name, call=call, prepare=prepare, timer=timer, groups=args.groups,
                                   backend=args.backend, fused=pipe.fuse_step))
    dpipe = diffusers_inpaint_pipeline(modules)
    generator = torch.Generator("cpu")

    def dcall():
        images = dpipe(prompts, image=rgb, mask_image=mask, num_inference_steps=20, guidance_scale=7.5,
                       height=size, width=size, generator=generator).images
        score(images, list(range(args.groups)))

    variants.insert(0, hb.Variant(name="diffusers", call=dcall, prepare=lambda: generator.manual_seed(0),
                                  groups=args.groups, backend="diffusers-eager"))
    before = hb.load_snapshot()
    samples = hb.run_interleaved(variants, runs=args.runs, warmup=args.warmup, device=device)
    during = hb.load_during(before, hb.load_snapshot())
    results = hb.summarise(variants, samples)
    out = {"what": __doc__.splitlines()[0], "preset": preset.name, "size": size, "dtype": args.dtype,
           "device": str(device), "backend": args.backend, "groups": args.groups, "runs": args.runs,
           "warmup": args.warmup, "rows": [], "load": {"before": before, "during": during},
           "environment": hb.environment(device)}
    for r, v in zip(results, variants):
        stages = samples[v.key].stages
        stage_ms = {k: 1e3 * float(np.median([s.get(k, 0.0) for s in stages]))
                    for k in sorted({k for s in stages for k in s})}
        out["rows"].append({"name": r.name, "p50_ms": 1e3 * r.total["p50"], "min_ms": 1e3 * r.total["min"],
                            "max_ms": 1e3 * r.total["max"], "speedup_vs_diffusers_20": r.ratio_vs_diffusers,
                            "ratio_range": r.ratio_range, "flags": r.flags + r.ratio_flags, "stages_p50_ms": stage_ms})
    lines = [f"{'row':<34}{'p50 ms':>10}{'vs diffusers-20':>18}{'unet ms':>10}{'vae_decode ms':>15}{'preview ms':>12}"]
    for row in out["rows"]:
        st = row["stages_p50_ms"]
        ratio = f"{row['speedup_vs_diffusers_20']:.2f}x" if row["speedup_vs_diffusers_20"] else "-"
        lines.append(f"{row['name']:<34}{row['p50_ms']:>10.1f}{ratio:>18}{st.get('unet', 0):>10.1f}"
                     f"{st.get('vae_decode', 0):>15.1f}{st.get('preview_decode', 0):>12.1f}")
    out["table"] = "\n".join(lines)
    atomic_write_bytes(Path(args.json), (json.dumps(out, indent=2, default=str) + "\n").encode())
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
