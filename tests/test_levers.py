"""The pipeline's latency levers: guidance cut-off, DeepCache feature reuse, preview ranking.

References and tolerances:
- guidance_cutoff=1.0 and cache_interval=1 are the plain loop: torch.equal on the float ("np") outputs.
- guidance_cutoff=0.5 against diffusers' own StableDiffusionInpaintPipeline loop with a callback_on_step_end
  that does the cut-off there (after the last guided step: keep the prompt half of prompt_embeds, mask and
  masked_image_latents, and set `_guidance_scale` to 0 so its loop stops doubling; this is
  SDCFGCutoffCallback plus the mask halving it lacks). Tolerance 1e-5 on [0, 1] images (same fp32 modules,
  only batching differs: ≤ 1.1e-6 measured; a cut-off one step late moves pixels by ≥ 2.2e-4).
- DeepCache: the split UNet (runtime/deepcache.py) against the diffusers UNet's own forward, exactly; the
  non-key step against the diffusers forward with a hook that swaps the deep part's output for the cached
  feature, exactly; the whole pipeline at cache_interval=3 against the plain loop run through a hooked
  diffusers UNet (key steps store the feature, others replace the deep output by it), exactly (torch.equal):
  the same modules run the same ops in the same order.
- preview_top_k against a run whose full decoder is the preview decoder (its rewards are the preview rewards)
  and a run without previews (the chosen creatives' full decodes): rewards equal, images within 1e-5 (the
  VAE decodes a smaller batch).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import CreativePipeline, ProductJob
from cg4ctr_fast.runtime.deepcache import DeepCacheUNet
from tests.conftest import make_product

TOL = 1e-4
# Cut-off against diffusers: measured ≤ 1.1e-6 (four configurations below); a cut-off one step late moves
# pixels by ≥ 2.2e-4 (Euler, 5 steps) to 2.5e-3, so 1e-5 separates them with 10× margin on both sides.
CUTOFF_TOL = 1e-5
PROMPTS = ["a warm sunset beach", "cool blue studio backdrop"]

_PIPES: dict = {}


def _pipe(channels: int, scheduler: str) -> CreativePipeline:
    key = (channels, scheduler)
    if key not in _PIPES:
        _PIPES[key] = CreativePipeline.from_preset("tiny", unet_in_channels=channels, scheduler=scheduler,
                                                   seed=channels)
    return _PIPES[key]


def _np(creatives) -> torch.Tensor:
    return torch.from_numpy(np.stack([c.image for c in creatives]))


def _run(pipe, image, mask, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("seed", 3)
    return pipe(PROMPTS, image, mask, output_type="np", show_progress=False, **kwargs)


# ---------------------------------------------------------------------------------------- identity at 1
@pytest.mark.parametrize("channels,scheduler,fused", [(9, "ddim", False), (4, "dpm++", True), (9, "euler", True)])
def test_cutoff_one_and_interval_one_are_the_plain_loop(channels, scheduler, fused):
    pipe = _pipe(channels, scheduler)
    pipe.fuse_step = fused
    image, mask = make_product(53, 47, seed=channels)
    plain = _np(_run(pipe, image, mask))
    assert torch.equal(_np(_run(pipe, image, mask, guidance_cutoff=1.0)), plain)
    assert torch.equal(_np(_run(pipe, image, mask, cache_interval=1)), plain)
    # ... and a lever that is set does something, so the comparison can fail.
    assert (_np(_run(pipe, image, mask, cache_interval=3)) - plain).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------- cut-off
class _DiffusersCutoff:
    """callback_on_step_end for diffusers' inpainting pipeline: guidance off after `guided` steps."""

    tensor_inputs = ["prompt_embeds", "mask", "masked_image_latents"]

    def __init__(self, guided: int):
        self.guided = guided

    def __call__(self, pipeline, i, t, kwargs):
        if i == self.guided - 1:
            pipeline._guidance_scale = 0.0
            return {name: kwargs[name].chunk(2)[1] for name in self.tensor_inputs}
        return {}


@pytest.mark.parametrize("channels,scheduler,fused,cutoff,steps", [
    (9, "ddim", True, 0.5, 6), (4, "dpm++", True, 0.25, 5), (9, "euler", False, 0.5, 5),
])
def test_cutoff_matches_diffusers_loop_with_a_halving_callback(channels, scheduler, fused, cutoff, steps):
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    pipe = _pipe(channels, scheduler)
    pipe.fuse_step = fused
    ref = diffusers_inpaint_pipeline(pipe.components.modules)
    ref.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    image, mask = make_product(seed=11 + channels)
    guided = math.ceil(cutoff * steps)  # the spec's count: 0.25 × 5 → 2 guided steps
    batches: list[int] = []
    hook = pipe.components.modules.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        got = _np(pipe(PROMPTS, image, mask, generator=torch.Generator().manual_seed(5), num_inference_steps=steps,
                       guidance_cutoff=cutoff, output_type="np", composite=False, show_progress=False))
    finally:
        hook.remove()
    assert batches == [4] * guided + [2] * (steps - guided)  # the UNet batch halves after the cut-off
    expected = ref(PROMPTS, image=image, mask_image=mask, generator=torch.Generator().manual_seed(5),
                   num_inference_steps=steps, output_type="np", callback_on_step_end=_DiffusersCutoff(guided),
                   callback_on_step_end_tensor_inputs=_DiffusersCutoff.tensor_inputs).images
    err = (got - torch.from_numpy(expected)).abs().max().item()
    assert err <= CUTOFF_TOL, f"max abs error {err:.2e} > {CUTOFF_TOL}"
    # Off by one step is visible: the reference one step later differs by more than the tolerance.
    later = ref(PROMPTS, image=image, mask_image=mask, generator=torch.Generator().manual_seed(5),
                num_inference_steps=steps, output_type="np", callback_on_step_end=_DiffusersCutoff(guided + 1),
                callback_on_step_end_tensor_inputs=_DiffusersCutoff.tensor_inputs).images
    assert (got - torch.from_numpy(later)).abs().max().item() > 10 * CUTOFF_TOL


def test_cutoff_is_ignored_without_guidance():
    pipe = _pipe(9, "ddim")
    pipe.fuse_step = None
    image, mask = make_product(seed=2)
    plain = _np(_run(pipe, image, mask, guidance_scale=1.0))
    assert torch.equal(_np(_run(pipe, image, mask, guidance_scale=1.0, guidance_cutoff=0.3)), plain)


# ---------------------------------------------------------------------------------------- DeepCache split
def _sd_like_unet(seed: int):
    """Three levels with cross-attention in the shallow blocks too (SD's layout, small): odd latent sizes
    exercise diffusers' forward_upsample_size path."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def _deep_output_hook(unet, branch: int, store: dict):
    """A forward hook on the last deep up block: records its output (key) or replaces it by store["feature"]."""
    last_deep = unet.up_blocks[len(unet.up_blocks) - branch - 2]

    def hook(module, args, output):
        if store.get("replace"):
            return store["feature"]
        store["feature"] = output
        return output

    return last_deep.register_forward_hook(hook)


@pytest.mark.parametrize("which,shape", [("tiny", (3, 9, 16, 16)), ("tiny", (2, 9, 10, 6)),
                                         ("sd", (2, 9, 9, 11)), ("sd", (1, 9, 16, 12))])
def test_split_unet_equals_the_diffusers_forward(which, shape):
    unet = _pipe(9, "ddim").components.modules.unet if which == "tiny" else _sd_like_unet(1)
    g = torch.Generator().manual_seed(shape[2] * 100 + shape[3])
    sample = torch.randn(shape, generator=g)
    ehs = torch.randn(shape[0], 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(417)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
        for branch in range(len(unet.up_blocks) - 1):
            split = DeepCacheUNet(unet, branch)
            store: dict = {}
            handle = _deep_output_hook(unet, branch, store)
            try:
                unet(sample, t, encoder_hidden_states=ehs, return_dict=False)
                out, feature = split.full(sample, t, ehs)
                assert torch.equal(out, ref)
                assert torch.equal(feature, store["feature"])  # the feature is what enters the shallow up block
                # a non-key step fed the feature just cached is the full UNet again
                assert torch.equal(split.shallow(sample, t, ehs, feature), ref)
                # a non-key step at another timestep / sample = diffusers' forward with the deep output replaced
                sample2 = sample + 0.1 * torch.randn(shape, generator=g)
                t2 = torch.tensor(250)
                fresh = unet(sample2, t2, encoder_hidden_states=ehs, return_dict=False)[0]
                store["feature"], store["replace"] = feature, True  # the key step's feature, not sample2's
                expected = unet(sample2, t2, encoder_hidden_states=ehs, return_dict=False)[0]
                got = split.shallow(sample2, t2, ehs, feature)
                assert torch.equal(got, expected)
                assert not torch.equal(got, fresh)  # the stale feature matters: reuse is not the full UNet
            finally:
                handle.remove()
        # branch = last: the deep part is the mid block alone, and its shallow step still equals the full one
        split = DeepCacheUNet(unet, len(unet.up_blocks) - 1)
        out, feature = split.full(sample, t, ehs)
        assert torch.equal(out, ref) and torch.equal(split.shallow(sample, t, ehs, feature), ref)


@pytest.mark.parametrize("channels,scheduler,interval,branch", [(9, "ddim", 3, 0), (4, "dpm++", 2, 1)])
def test_cache_interval_equals_the_hooked_diffusers_unet(channels, scheduler, interval, branch):
    """The pipeline at cache_interval N = the plain loop whose diffusers UNet reuses its deep output by hook."""
    pipe = _pipe(channels, scheduler)
    pipe.fuse_step = None
    unet = pipe.components.modules.unet
    image, mask = make_product(47, 61, seed=channels + interval)
    got = _np(_run(pipe, image, mask, num_inference_steps=6, cache_interval=interval, cache_branch=branch))
    if branch == len(unet.up_blocks) - 1:
        last_deep = unet.mid_block
    else:
        last_deep = unet.up_blocks[len(unet.up_blocks) - branch - 2]
    store: dict = {"step": -1}

    def count(module, args):
        store["step"] += 1

    def hook(module, args, output):
        if store["step"] % interval == 0:
            store["feature"] = output
            return output
        return store["feature"]

    handles = [unet.register_forward_pre_hook(count), last_deep.register_forward_hook(hook)]
    try:
        expected = _np(_run(pipe, image, mask, num_inference_steps=6))
    finally:
        for handle in handles:
            handle.remove()
    assert store["step"] == 5
    assert torch.equal(got, expected)


def test_cache_interval_with_cutoff_and_batch_of_products():
    """cut-off + cache together through generate_batch: each product equals its own call (batching only)."""
    pipe = _pipe(9, "ddim")
    pipe.fuse_step = True
    a, mask_a = make_product(seed=21)
    b, mask_b = make_product(seed=22)
    kwargs = dict(num_inference_steps=6, guidance_cutoff=0.5, cache_interval=2, output_type="np", show_progress=False)
    batched = pipe.generate_batch([ProductJob(PROMPTS, a, mask_a), ProductJob(PROMPTS[:1], b, mask_b)], **kwargs)
    alone = [pipe(PROMPTS, a, mask_a, **kwargs), pipe(PROMPTS[:1], b, mask_b, **kwargs)]
    for got, want in zip(batched, alone):
        assert (_np(got) - _np(want)).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------- refusals
def test_engine_slots_refuse_cache_interval():
    from cg4ctr_fast.runtime.onnxruntime_backend import OrtUNetSlot

    pipe = _pipe(9, "ddim")
    image, mask = make_product(seed=4)

    class BareSlot:  # any slot without supports_feature_cache
        def __call__(self, sample, timestep, encoder_hidden_states):
            raise AssertionError("the UNet must not run")

    for slot, backend in ((OrtUNetSlot(component=None), "onnxruntime"), (BareSlot(), "tensorrt")):
        engine = CreativePipeline(dataclasses.replace(pipe.components, unet=slot, backend=backend))
        with pytest.raises(InputError) as err:
            _run(engine, image, mask, cache_interval=2)
        message = str(err.value)
        assert backend in message and "\n" not in message


class _Reward:
    """A deterministic stand-in reward: a fixed random weighting of the 8-bit pixels (any size)."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images, groups):
        self.calls.append(len(images))
        out = []
        for image in images:
            a = np.asarray(image, dtype=np.float64) / 255.0
            w = np.random.default_rng(a.shape[0] * 1000 + a.shape[1]).random(a.shape)
            out.append(float((a * w).mean()))
        return out


def _preview_decoder(seed: int = 0):
    """A random diffusers AutoencoderTiny with the tiny preset's latent channels (4) and scale factor 4
    (three decoder stages: 2 ** (3 - 1)), wrapped to the vae_decoder slot contract."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4).eval()

    @torch.no_grad()
    def decode(latents):
        return tiny.decode(latents, return_dict=False)[0]

    return decode


@pytest.mark.parametrize("k", [2])
def test_preview_top_k_keeps_the_best_previews_and_decodes_them_fully(k):
    base = _pipe(9, "ddim")
    base.fuse_step = None
    preview = _preview_decoder()
    reward = _Reward()
    pipe = CreativePipeline(dataclasses.replace(base.components, preview_decoder=preview), reward=reward)
    image, mask = make_product(59, 45, seed=8)
    kwargs = dict(num_images_per_prompt=4, num_inference_steps=4)
    got = _run(pipe, image, mask, preview_top_k=k, **kwargs)
    assert reward.calls == [8, 2 * k]  # every candidate's preview, then only the chosen full decodes
    # Reference: the preview decoder in the full decoder's slot gives every candidate's preview reward.
    # ("pil": the preview path scores 8-bit composites, as the reward stage does for "pil" output.)
    previewed = base.__class__(dataclasses.replace(base.components, vae_decoder=preview), reward=reward)(
        PROMPTS, image, mask, output_type="pil", show_progress=False, seed=3, **kwargs)
    full = _run(CreativePipeline(base.components, reward=reward), image, mask, **kwargs)
    assert len(got) == 2 * k
    for g in range(2):
        mine = got[g * k:(g + 1) * k]
        assert all(c.group == g for c in mine)
        candidates = [c for c in previewed if c.group == g]
        best = sorted(candidates, key=lambda c: (-c.reward, c.index))[:k]
        assert [c.index for c in mine] == [c.index for c in best]
        for c, b in zip(mine, best):
            assert c.preview_reward == pytest.approx(b.reward, abs=1e-9)
            twin = next(f for f in full if f.group == g and f.index == c.index)
            assert np.abs(c.image - twin.image).max() <= 1e-5
            assert c.reward == pytest.approx(twin.reward, abs=1e-6) and c.seed == twin.seed
    assert all(c.preview_reward is None for c in full)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(guidance_cutoff=0.0), "guidance_cutoff"),
    (dict(guidance_cutoff=1.5), "guidance_cutoff"),
    (dict(guidance_cutoff=float("nan")), "guidance_cutoff"),
    (dict(guidance_cutoff="0.5"), "guidance_cutoff"),
    (dict(cache_interval=0), "cache_interval"),
    (dict(cache_interval=2.0), "cache_interval"),
    (dict(cache_interval=True), "cache_interval"),
    (dict(cache_interval=2, cache_branch=2), "cache_branch"),
    (dict(cache_branch=-1), "cache_branch"),
    (dict(preview_top_k=0, num_images_per_prompt=2), "preview_top_k"),
    (dict(preview_top_k=3, num_images_per_prompt=2), "preview_top_k"),
    (dict(preview_top_k=1.0, num_images_per_prompt=2), "preview_top_k"),
    (dict(preview_top_k=1, num_images_per_prompt=2, no_decoder=True), "preview decoder"),
    (dict(preview_top_k=1, num_images_per_prompt=2, no_reward=True), "reward model"),
])
def test_bad_lever_values(kwargs, needle):
    base = _pipe(9, "ddim")
    no_decoder, no_reward = kwargs.pop("no_decoder", False), kwargs.pop("no_reward", False)
    comps = dataclasses.replace(base.components, preview_decoder=None if no_decoder else _preview_decoder())
    pipe = CreativePipeline(comps, reward=None if no_reward else _Reward())
    image, mask = make_product(seed=1)
    with pytest.raises(InputError) as err:
        _run(pipe, image, mask, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
