"""Several style LoRAs in one product's batch: per-row adapters against one fused UNet per LoRA (split batch).

    OMP_NUM_THREADS=1 python bench/style_lora_bench.py [--groups 8] [--loras 1,2,4] [--steps 15] [--runs 5]
        [--warmup 1] [--json bench/results/cpu/style_lora_bench.json] [--md bench/results/cpu/style_lora_bench.md]

One product, `--groups` user groups (one creative each), group g using LoRA g mod K, on the embedded toy
generator (tiny preset architecture) with random rank-4 LoRAs on the attention projections (the style LoRAs'
shape; the cost does not depend on the weights). Per K, three rows run interleaved call by call (base, per_row,
split, base, …) on one thread:
  base    — the plain pipeline, no LoRA: the floor;
  per_row — ONE batch, every LoRA an unfused peft adapter, each row through its own adapter (peft's
            adapter_names): the base matmul on all rows plus, per adapter layer, K small low-rank matmuls on
            that adapter's rows (gathered and scattered back);
  split   — one UNet per LoRA with the LoRA fused, K pipeline calls of groups/K rows each: no adapter cost,
            but K smaller batches (K × the per-call overhead: text encode, VAE encode, scheduler, Python).
Reported: median wall seconds per call, the paired ratio split / per_row (median over rounds, with min–max),
each against base, and the largest difference between the two modes' outputs (they must agree).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _random_loras(unet, k: int, root: Path, *, rank: int = 4) -> dict[str, Path]:
    """K random LoRAs (peft init_lora_weights=False, seeded) on the UNet's attention projections, saved as
    diffusers files. The UNet is left without adapters."""
    from diffusers import StableDiffusionInpaintPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from cg4ctr_fast.training.lora import DEFAULT_TARGETS

    paths = {}
    for i in range(k):
        name = f"style{i}"
        with torch.random.fork_rng():
            torch.manual_seed(100 + i)
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(DEFAULT_TARGETS))
            unet.add_adapter(config, adapter_name=name)
        state = get_peft_model_state_dict(unet, adapter_name=name)
        StableDiffusionInpaintPipeline.save_lora_weights(str(root / name), unet_lora_layers=state,
                                                         unet_lora_adapter_metadata=config.to_dict())
        unet.delete_adapters(name)
        paths[name] = root / name
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--loras", default="1,2,4", help="comma-separated K values")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    try:
        ks = [int(x) for x in args.loras.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1 or args.groups < 1 or args.runs < 1 or args.steps < 1 or any(k > args.groups for k in ks):
        print("style_lora_bench.py: error: --loras needs K values in 1..--groups, and --groups, --runs, --steps ≥ 1",
              file=sys.stderr)
        return 2

    from cg4ctr_fast.bench import (
        environment,
        load_during,
        load_snapshot,
        load_warnings,
        paired_ratio,
        percentiles,
        row_flags,
        run_interleaved,
        Variant,
    )
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.style import MixedLoraPipeline, random_prompts
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    torch.set_num_threads(1)
    toy = resolve_toy_models(ToyConfig())
    product = load_dataset(toy.world).world.product(HELD_OUT_ITEM_BASE)
    prompts = random_prompts(args.groups, 0, categories=("palette", "texture", "scene", "lighting"))
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, show_progress=False, seed=0)
    base = CreativePipeline.from_modules(load_modules(str(toy.generator)))
    device = torch.device("cpu")
    load_before = load_snapshot()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            loras = _random_loras(load_modules(str(toy.generator)).unet, k, Path(tmp) / f"k{k}")
            names = list(loras)
            assigned = [names[g % k] for g in range(args.groups)]
            mixed = {mode: MixedLoraPipeline.build(load_modules(str(toy.generator)), loras, mode)
                     for mode in ("per_row", "split")}
            outputs = {mode: np.stack([c.image for c in pipe(prompts, assigned, product.image, product.mask,
                                                            output_type="np", composite=False, **call)])
                       for mode, pipe in mixed.items()}
            max_diff = float(np.abs(outputs["per_row"] - outputs["split"]).max())
            variants = [
                Variant("base", lambda: base(prompts, product.image, product.mask, **call), groups=args.groups),
                *[Variant(mode, (lambda p=pipe: p(prompts, assigned, product.image, product.mask, **call)),
                          groups=args.groups) for mode, pipe in mixed.items()],
            ]
            samples = run_interleaved(variants, runs=args.runs, warmup=args.warmup, device=device)
            wall = {v.name: samples[v.key].wall_s for v in variants}
            # Process CPU seconds (one thread): the time the call itself ran. On the shared development machine
            # they tracked wall time (CPU / wall ≈ 0.3-0.5 per call, the share of a core the job got), so they are
            # recorded beside wall time, not instead of it.
            cpu = {v.name: samples[v.key].cpu_s for v in variants}
            row = {
                "loras": k,
                "groups": args.groups,
                "assignment": assigned,
                "seconds": {name: percentiles(values) for name, values in wall.items()},
                "flags": {name: row_flags(percentiles(values)) for name, values in wall.items()},
                "samples_s": wall,
                "cpu_seconds": {name: percentiles(values) for name, values in cpu.items()},
                "cpu_samples_s": cpu,
                "cpu_split_over_per_row": paired_ratio(cpu["split"], cpu["per_row"]),
                "cpu_per_row_over_base": paired_ratio(cpu["per_row"], cpu["base"]),
                "cpu_split_over_base": paired_ratio(cpu["split"], cpu["base"]),
                "split_over_per_row": paired_ratio(wall["split"], wall["per_row"]),
                "per_row_over_base": paired_ratio(wall["per_row"], wall["base"]),
                "split_over_base": paired_ratio(wall["split"], wall["base"]),
                "max_abs_diff_per_row_vs_split": max_diff,
            }
            rows.append(row)
            r, c = row["split_over_per_row"], row["cpu_split_over_per_row"]
            seconds = row["seconds"]
            print(f"K={k}: base {seconds['base']['p50']:.3f} s, per_row {seconds['per_row']['p50']:.3f} s, "
                  f"split {seconds['split']['p50']:.3f} s; split / per_row {r['ratio']:.2f}× "
                  f"[{r['min']:.2f}–{r['max']:.2f}] {' '.join(r['flags'])}; CPU s split / per_row {c['ratio']:.2f}× "
                  f"[{c['min']:.2f}–{c['max']:.2f}]; outputs differ by ≤ {max_diff:.1e}")
    load_after = load_snapshot()
    during = load_during(load_before, load_after)
    warnings = load_warnings(load_before, during)
    for line in warnings:
        print(line)
    report = {
        "environment": environment(device),
        "threads": torch.get_num_threads(),
        "load": {"before": load_before, "after": load_after, "during": during, "warnings": warnings},
        "generator": str(toy.generator),
        "product": int(HELD_OUT_ITEM_BASE),
        "steps": args.steps, "guidance": args.guidance, "runs": args.runs, "warmup": args.warmup,
        "lora": "random, rank 4, alpha 4, to_q/to_k/to_v/to_out.0 (the style LoRAs' shape)",
        "rows": rows,
    }
    from cg4ctr_fast.fileio import atomic_write_bytes

    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    if args.md:
        atomic_write_bytes(args.md, markdown(report).encode())
    return 0


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Style LoRAs in one batch: per-row adapters vs one fused UNet per LoRA",
        "",
        f"{env['device']['name']}, {report['threads']} thread, torch {env['versions']['torch']}, "
        f"diffusers {env['versions']['diffusers']}, peft {env['versions']['peft']}; git {env.get('git_sha')}; "
        f"{env['timestamp']}.",
        f"Command: `{env['command']}`",
        "",
        f"One product, {report['rows'][0]['groups']} groups × 1 creative, {report['steps']} DDIM steps, guidance "
        f"{report['guidance']:g} (batch ×2), toy generator; {report['lora']}. Median of {report['runs']} interleaved "
        "rounds (after warm-up); ratios are medians of per-round ratios [min–max].",
        "",
        "| K LoRAs | base s | per_row s | split s | per_row / base | split / base | split / per_row | flags "
        "| max abs diff, modes |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in report["rows"]:
        s = row["seconds"]

        def ratio(r):
            return f"{r['ratio']:.2f}× [{r['min']:.2f}–{r['max']:.2f}]"

        flags = sorted(set(row["split_over_per_row"]["flags"]) | {f for v in row["flags"].values() for f in v})
        lines.append(f"| {row['loras']} | {s['base']['p50']:.3f} | {s['per_row']['p50']:.3f} "
                     f"| {s['split']['p50']:.3f} | {ratio(row['per_row_over_base'])} | {ratio(row['split_over_base'])} | "
                     f"{ratio(row['split_over_per_row'])} | {', '.join(flags) or '—'} | "
                     f"{row['max_abs_diff_per_row_vs_split']:.1e} |")
    lines += [
        "",
        "Process CPU seconds of the same calls (one thread):",
        "",
        "| K LoRAs | base CPU s | per_row CPU s | split CPU s | per_row / base | split / base | split / per_row "
        "| flags |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        s = row["cpu_seconds"]

        def ratio(r):
            return f"{r['ratio']:.2f}× [{r['min']:.2f}–{r['max']:.2f}]"

        lines.append(f"| {row['loras']} | {s['base']['p50']:.3f} | {s['per_row']['p50']:.3f} "
                     f"| {s['split']['p50']:.3f} | {ratio(row['cpu_per_row_over_base'])} | {ratio(row['cpu_split_over_base'])} | "
                     f"{ratio(row['cpu_split_over_per_row'])} "
                     f"| {', '.join(row['cpu_split_over_per_row']['flags']) or '—'} |")
    if report["load"]["warnings"]:
        lines += ["", *[f"> {w}" for w in report["load"]["warnings"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
