"""`cg4ctr demo`: the whole data path on the embedded default, on a laptop CPU.

A procedurally drawn product (an RGBA image whose alpha is the product mask) goes through one denoising
loop with one prompt per user group; the creatives, a contact sheet and creatives.json land in --out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_GROUPS = (
    ("18-24 urban gamers", "neon city lights at night, vivid magenta and cyan"),
    ("25-34 outdoor fans", "green forest moss, soft morning light"),
    ("35-44 home cooks", "warm wooden kitchen table, golden light"),
    ("45+ travellers", "calm blue sea and sky, bright daylight"),
)


def draw_product(size: int = 64, seed: int = 0) -> Image.Image:
    """A bottle-like product on a transparent background: the alpha channel is the exact product mask."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    body = tuple(int(c) for c in rng.integers(40, 220, 3)) + (255,)
    cap = tuple(int(c) for c in rng.integers(0, 255, 3)) + (255,)
    s = size / 64
    draw.rounded_rectangle([22 * s, 22 * s, 42 * s, 56 * s], radius=int(5 * s), fill=body)
    draw.rectangle([28 * s, 12 * s, 36 * s, 22 * s], fill=body)
    draw.rectangle([27 * s, 8 * s, 37 * s, 13 * s], fill=cap)
    draw.rectangle([24 * s, 32 * s, 40 * s, 42 * s], fill=(245, 245, 235, 255))  # label
    return image


def contact_sheet(rows: list[list[Image.Image]], cell: int = 128, pad: int = 4) -> Image.Image:
    n_cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (n_cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = img.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), pad + r * (cell + pad)))
    return sheet


def run_demo(out: Path, *, steps: int = 20, seed: int = 0, quiet: bool = False) -> dict:
    from cg4ctr_fast.imaging import atomic_dir
    from cg4ctr_fast.pipeline import CreativePipeline

    started = time.perf_counter()
    pipe = CreativePipeline.from_preset("tiny")
    products = [draw_product(64, seed=s) for s in range(2)]
    prompts = [prompt for _, prompt in DEMO_GROUPS]
    records, rows = [], []
    results = []
    for p_index, product in enumerate(products):
        creatives = pipe(prompts, product, num_inference_steps=steps, seed=seed, show_progress=not quiet)
        results.append((product, creatives))
    with atomic_dir(out) as tmp:
        for p_index, (product, creatives) in enumerate(results):
            white = Image.new("RGBA", product.size, (255, 255, 255, 255))
            original = Image.alpha_composite(white, product).convert("RGB")
            original.save(tmp / f"product{p_index}.png")
            rows.append([original] + [c.image for c in creatives])
            for creative in creatives:
                name = f"product{p_index}_group{creative.group}.png"
                creative.image.save(tmp / name)
                records.append(
                    {
                        "file": name,
                        "product": p_index,
                        "group": creative.group,
                        "group_name": DEMO_GROUPS[creative.group][0],
                        "prompt": creative.prompt,
                        "seed": creative.seed,
                        "reward": creative.reward,
                    }
                )
        contact_sheet(rows).save(tmp / "contact_sheet.png")
        summary = {
            "model_id": pipe.components.info.model_id,
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 2),
            "creatives": records,
        }
        (tmp / "creatives.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
