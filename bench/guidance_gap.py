"""How far a LoRA moves the gap between the conditional and unconditional noise predictions.

Classifier-free guidance multiplies eps_c − eps_u by the guidance scale; a LoRA that widens that gap
raises the effective guidance of every later sampling. Prints the RMS of eps_c − eps_u at a few
timesteps for the base UNet and for the UNet with each given LoRA (a `cg4ctr-train cycle` checkpoint's
lora/ folder), on fixed random 9-channel inputs and four prompts.

    python bench/guidance_gap.py --generator ~/.cache/cg4ctr_fast/toy-v1-…/generator --lora RUN/cycles/cycle_004/lora
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

PROMPTS = ("warm smooth studio soft", "cool rough beach dim", "neon marble city bright", "pastel wood forest soft")


def gaps(unet, text_encoder, tokenizer, timesteps, side: int) -> list[float]:
    ids = tokenizer(list(PROMPTS) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        x = torch.randn(len(PROMPTS), unet.config.in_channels, side, side, generator=gen)
        out = []
        for t in timesteps:
            tt = torch.full((len(PROMPTS),), t)
            cond = unet(x, tt, encoder_hidden_states=hidden[:-1]).sample
            uncond = unet(x, tt, encoder_hidden_states=hidden[-1:].expand(len(PROMPTS), -1, -1)).sample
            out.append(float((cond - uncond).pow(2).mean().sqrt()))
    return out


def main() -> int:
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora, load_lora_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="diffusers folder of the base generator")
    parser.add_argument("--lora", action="append", default=[], help="LoRA folder saved by a cycle (repeatable)")
    parser.add_argument("--rank", type=int, default=4, help="the LoRA's rank, as in its [lora] config")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--timesteps", default="900,500,100")
    parser.add_argument("--side", type=int, default=16, help="latent side (the toy generator: 64 px / 4 = 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    base = load_modules(args.generator)
    side = args.side
    report = {"timesteps": timesteps, "base": gaps(base.unet, base.text_encoder, base.tokenizer, timesteps, side)}
    for path in args.lora:
        tuned = load_modules(args.generator)
        add_lora(tuned.unet, LoraTrainConfig(rank=args.rank, alpha=args.alpha))
        load_lora_file(tuned.unet, path)
        report[path] = gaps(tuned.unet, tuned.text_encoder, tuned.tokenizer, timesteps, side)
    for name, values in report.items():
        if name != "timesteps":
            ratio = [v / b for v, b in zip(values, report["base"])]
            print(f"{name}: " + ", ".join(f"t={t}: {v:.4f} ({r:.2f}× base)" for t, v, r in zip(timesteps, values, ratio)),
                  file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
