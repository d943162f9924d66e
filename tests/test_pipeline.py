"""The data path's invariants: product pixels bit for bit, derived seeds, one loop, prompt cache, lean import."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import CreativePipeline, derive_seed
from tests.conftest import make_product


@pytest.fixture(scope="module")
def pipe9():
    return CreativePipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def pipe4():
    return CreativePipeline.from_preset("tiny", unet_in_channels=4, scheduler="euler")


def _random_mask(width, height, seed):
    """Blobby random masks with both values present: white = repaint."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, height // 8), max(2, width // 8))) > 0.5
    small[0, 0], small[-1, -1] = True, False
    mask = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)
    return mask


@pytest.mark.parametrize("size", [(64, 64), (53, 47), (71, 30), (33, 90)])
@pytest.mark.parametrize("which", ["pipe9", "pipe4"])
def test_product_pixels_bit_exact(request, size, which):
    pipe = request.getfixturevalue(which)
    width, height = size
    image, _ = make_product(width, height, seed=width)
    for mask_seed in range(2):
        mask = _random_mask(width, height, mask_seed + width)
        creatives = pipe(["a", "b"], image, mask, num_inference_steps=2, show_progress=False,
                         num_images_per_prompt=2)
        keep = np.asarray(mask) < 128
        original = np.asarray(image)
        assert len(creatives) == 4
        for creative in creatives:
            out = np.asarray(creative.image)
            assert out.shape == original.shape and out.dtype == np.uint8
            assert np.array_equal(out[keep], original[keep])
            # ...and the background really was repainted.
            assert np.abs(out[~keep].astype(int) - original[~keep]).mean() > 5


def test_np_output_keeps_product_exact(pipe9, product):
    image, mask = product
    creative = pipe9("warm", image, mask, num_inference_steps=2, output_type="np", show_progress=False)[0]
    keep = np.asarray(mask) < 128
    assert creative.image.dtype == np.float32
    assert np.array_equal(creative.image[keep], np.asarray(image, dtype=np.float32)[keep] / 255.0)


def test_creative_records(pipe9, product):
    image, mask = product
    # Float output: batch rows 0 and 4 run through the same batched kernels, where BLAS may round a row
    # differently by position (≤ 1e-6 seen nowhere, allowed for); 8-bit images would turn that into a 1/255 flip.
    creatives = pipe9(["p0", "p1", "p0"], image, mask, num_inference_steps=1, num_images_per_prompt=2,
                      output_type="np", show_progress=False)
    assert [(c.group, c.index, c.prompt) for c in creatives] == [
        (0, 0, "p0"), (0, 1, "p0"), (1, 0, "p1"), (1, 1, "p1"), (2, 0, "p0"), (2, 1, "p0")
    ]
    assert all(c.reward is None and c.mask.size == image.size for c in creatives)
    # Same prompt, same index, same product: same seed and the same pixels, in whichever group.
    assert creatives[0].seed == creatives[4].seed
    assert np.abs(creatives[0].image - creatives[4].image).max() <= 1e-5
    assert creatives[0].seed != creatives[1].seed


def test_seeds_are_stable_across_processes(pipe9, product):
    image, mask = product
    code = (
        "from cg4ctr_fast.pipeline import derive_seed; from cg4ctr_fast.imaging import image_sha256;"
        "from tests.conftest import make_product; import json;"
        "print(json.dumps(derive_seed(image_sha256(make_product()[0]), 'warm', 0, 0)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                            env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}, cwd=str(_repo_root()))
    from cg4ctr_fast.imaging import image_sha256

    assert json.loads(result.stdout) == derive_seed(image_sha256(image), "warm", 0, 0)
    creative = pipe9("warm", image, mask, num_inference_steps=1, show_progress=False)[0]
    assert creative.seed == derive_seed(image_sha256(image), "warm", 0, 0)


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_batch_composition_does_not_change_a_creative(pipe9, product):
    """A creative depends on (product, prompt, index, seed), not on which other groups share its batch."""
    image, mask = product
    # composite=False: compare the float decoder output, not uint8 levels where 1e-7 can flip a rounding.
    alone = pipe9(["warm"], image, mask, num_inference_steps=2, output_type="np", composite=False,
                  show_progress=False)[0]
    batched = pipe9(["cool", "warm", "neon"], image, mask, num_inference_steps=2, output_type="np",
                    composite=False, show_progress=False)[1]
    assert alone.seed == batched.seed
    assert np.abs(alone.image - batched.image).max() < 1e-4


def test_prompt_embeddings_are_cached(pipe9, product, monkeypatch):
    image, mask = product
    pipe9.clear_prompt_cache()
    calls = []
    original = pipe9.components.text_encoder

    def counting(ids):
        calls.append(ids.shape[0])
        return original(ids)

    monkeypatch.setattr(pipe9.components, "text_encoder", counting)
    pipe9(["a", "b", "a"], image, mask, num_inference_steps=1, show_progress=False)
    assert calls == [3]  # "a", "b" and the empty negative prompt, once each, in one batch
    pipe9(["b", "c"], image, mask, num_inference_steps=1, show_progress=False)
    assert calls == [3, 1]  # only "c" is new


def test_one_denoising_loop_for_all_groups(pipe9, product, monkeypatch):
    image, mask = product
    batches = []
    unet = pipe9.components.unet

    def recording(sample, t, embeds):
        batches.append(sample.shape[0])
        return unet(sample, t, embeds)

    monkeypatch.setattr(pipe9.components, "unet", recording)
    pipe9(["a", "b", "c", "d", "e"], image, mask, num_inference_steps=3, guidance_scale=5.0, show_progress=False)
    assert batches == [10, 10, 10]  # 5 groups × 2 (guidance), 3 steps, one call per step


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"strength": 1.5}, "strength"),
        ({"strength": 0.01, "num_inference_steps": 5}, "no denoising step"),
        ({"output_type": "tensor"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"negative_prompt": ["x", "y"]}, "negative prompts"),
        ({"height": 60}, "multiple of 8"),
    ],
)
def test_bad_arguments(pipe9, product, kwargs, needle):
    image, mask = product
    with pytest.raises(InputError, match=needle):
        pipe9("warm", image, mask, show_progress=False, **kwargs)


def test_masks_must_match_and_contain_both(pipe9, product):
    image, _ = product
    with pytest.raises(InputError, match="mask is"):
        pipe9("x", image, Image.new("L", (10, 10), 255), show_progress=False)
    with pytest.raises(InputError, match="nothing to repaint"):
        pipe9("x", image, Image.new("L", image.size, 0), show_progress=False)
    with pytest.raises(InputError, match="no product"):
        pipe9("x", image, Image.new("L", image.size, 255), show_progress=False)
    with pytest.raises(InputError, match="no mask"):
        pipe9("x", image, None, show_progress=False)


def test_save_and_from_pretrained_round_trip(pipe9, product, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.models.diffusion import save_modules

    save_modules(pipe9.components.modules, tmp_path / "model")
    loaded = CreativePipeline.from_pretrained(str(tmp_path / "model"))
    image, mask = product
    a = pipe9("warm", image, mask, num_inference_steps=2, output_type="np", show_progress=False)[0].image
    b = loaded("warm", image, mask, num_inference_steps=2, output_type="np", show_progress=False)[0].image
    # The same weights through a save/load round trip: float noise only (the tensors' memory layout may differ).
    assert np.abs(a - b).max() <= 1e-5
    # diffusers itself loads the folder, offline.
    StableDiffusionInpaintPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        CreativePipeline.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="missing"):
        CreativePipeline.from_pretrained(str(tmp_path / "half"))


def test_from_diffusers_reuses_components(pipe9, product):
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    m = pipe9.components.modules
    dpipe = diffusers_inpaint_pipeline(m)
    ours = CreativePipeline.from_diffusers(dpipe)
    assert ours.components.modules.unet is m.unet
    image, mask = product
    a = ours("x", image, mask, num_inference_steps=1, output_type="np", show_progress=False)[0].image
    b = pipe9("x", image, mask, num_inference_steps=1, output_type="np", show_progress=False)[0].image
    assert np.abs(a - b).max() <= 1e-5  # the same modules: equal up to float noise


def test_sd15_architecture_builds_with_random_weights_only_on_request():
    with pytest.raises(InputError, match="--model PATH"):
        CreativePipeline.from_preset("sd15-inpaint")


def test_lean_import():
    code = (
        "import sys, cg4ctr_fast, cg4ctr_fast.serving;"
        "bad = [m for m in ('tensorrt', 'triton', 'onnx', 'onnxruntime', 'diffusers', 'transformers', 'ray', 'fastapi',"
        " 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules];"
        "import torch; print(','.join(bad)); print(torch.cuda.is_initialized())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy, cuda_initialized = result.stdout.split()[0:2] if result.stdout.split()[0] != "False" else ("", "False")
    assert heavy == "" and cuda_initialized == "False", result.stdout


def test_saliency_makes_the_mask_when_none_is_given(product):
    from cg4ctr_fast.models.saliency import U2NetP, mask_from_saliency, predict_saliency

    torch.manual_seed(0)
    saliency = U2NetP().eval()
    pipe = CreativePipeline.from_preset("tiny")
    pipe.saliency = saliency
    image, _ = product
    saliency_map = predict_saliency(saliency, image)
    # An untrained net's map is arbitrary: threshold at its median so both product and background exist.
    pipe.saliency_threshold = float(np.median(saliency_map))
    expected_mask = mask_from_saliency(saliency_map, threshold=pipe.saliency_threshold)
    keep = np.asarray(expected_mask) < 128
    assert keep.any() and (~keep).any()
    creative = pipe("warm", image, None, num_inference_steps=1, show_progress=False)[0]
    assert np.array_equal(np.asarray(creative.mask), np.asarray(expected_mask))
    assert np.array_equal(np.asarray(creative.image)[keep], np.asarray(image)[keep])


def test_nan_decode_falls_back_to_fp32(product, monkeypatch):
    from cg4ctr_fast.runtime.torch_backend import VaeDecoderSlot

    pipe = CreativePipeline.from_preset("tiny", dtype=torch.bfloat16)
    slot = pipe.components.vae_decoder
    real_call = VaeDecoderSlot.__call__
    calls = []

    def overflowing(self, latents):
        calls.append(self.module.dtype)
        out = real_call(self, latents)
        return out * float("nan") if self.module.dtype != torch.float32 else out

    monkeypatch.setattr(VaeDecoderSlot, "__call__", overflowing)
    image, mask = product
    creative = pipe("warm", image, mask, num_inference_steps=1, show_progress=False)[0]
    assert calls == [torch.bfloat16]  # the bf16 decode overflowed; decode_fp32 then ran the VAE in fp32
    assert slot.module.dtype == torch.bfloat16  # and put it back
    assert np.isfinite(np.asarray(creative.image, dtype=np.float32)).all()


# ------------------------------------------------------------------ output types (diffusers' names)
@pytest.mark.parametrize("size,composite", [((64, 64), True), ((53, 47), True), ((53, 47), False)])
def test_pt_and_np_are_the_same_floats(pipe9, size, composite):
    image, mask = make_product(*size, seed=3)
    kwargs = dict(num_inference_steps=2, composite=composite, show_progress=False)
    as_np = pipe9(["warm", "cool"], image, mask, output_type="np", **kwargs)
    as_pt = pipe9(["warm", "cool"], image, mask, output_type="pt", **kwargs)
    for a, b in zip(as_np, as_pt):
        assert isinstance(b.image, torch.Tensor) and b.image.dtype == torch.float32
        assert b.image.shape == (3, *a.image.shape[:2])
        assert torch.equal(b.image, torch.from_numpy(a.image.transpose(2, 0, 1).copy()))  # same floats, no tolerance
        assert 0.0 <= float(b.image.min()) and float(b.image.max()) <= 1.0
    if composite:  # at the input's size, float composite: product exactly C / 255
        keep = np.asarray(mask) < 128
        assert as_np[0].image.shape == (size[1], size[0], 3)
        assert np.array_equal(as_np[0].image[keep], np.asarray(image, np.float32)[keep] / np.float32(255))


def test_pil_is_the_rounded_np_output(pipe9, product):
    """At the working size (no resize) "pil" is "np" rounded to 8 bits: within half an 8-bit step, plus 1e-4
    for float32 rounding at exact .5 boundaries."""
    image, mask = product
    pil = pipe9("warm", image, mask, num_inference_steps=2, show_progress=False)[0].image
    flt = pipe9("warm", image, mask, num_inference_steps=2, output_type="np", show_progress=False)[0].image
    assert np.abs(np.asarray(pil, np.float64) - flt.astype(np.float64) * 255).max() <= 0.5 + 1e-4


def test_latent_output_skips_decode_and_reward(pipe9, product, monkeypatch):
    image, mask = product
    pipe9.reward = lambda images, groups: pytest.fail("no images to score with output_type='latent'")
    try:
        monkeypatch.setattr(pipe9.components, "vae_decoder", lambda x: pytest.fail("decoded"))
        latent = pipe9(["warm", "cool"], image, mask, num_inference_steps=2, output_type="latent",
                       show_progress=False)
    finally:
        pipe9.reward = None
    monkeypatch.undo()
    decoded = pipe9(["warm", "cool"], image, mask, num_inference_steps=2, output_type="np", return_latents=True,
                    show_progress=False)
    info = pipe9.components.info
    for lat, full in zip(latent, decoded):
        assert lat.image.shape == (info.latent_channels, 64 // info.vae_scale_factor, 64 // info.vae_scale_factor)
        assert torch.equal(lat.image.float().cpu(), full.latents)  # the scaled latents diffusers returns
        assert lat.reward is None and lat.seed == full.seed


# ------------------------------------------------------------------ callback_on_step_end
def test_callback_sees_every_step_and_its_tensors(pipe9, product):
    image, mask = product
    seen = []

    def callback(pipe, i, t, kwargs):
        assert pipe is pipe9
        seen.append((i, int(t), {k: tuple(v.shape) for k, v in kwargs.items()}))
        return {}

    names = ["latents", "prompt_embeds", "mask", "masked_image_latents"]
    plain = pipe9(["a", "b"], image, mask, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                  show_progress=False)
    called = pipe9(["a", "b"], image, mask, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                   show_progress=False, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    scheduler = pipe9.scheduler.__class__.from_config(pipe9.scheduler.config)
    scheduler.set_timesteps(3)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(int(t) for t in scheduler.timesteps))
    shapes = seen[0][2]
    assert shapes["latents"][0] == 2 and shapes["prompt_embeds"][0] == 4  # [negatives; prompts] under guidance
    assert shapes["mask"][:2] == (4, 1) and shapes["masked_image_latents"][0] == 4
    for a, b in zip(plain, called):  # returning nothing changes nothing
        assert np.array_equal(a.image, b.image)


def test_callback_returning_latents_is_honoured(pipe9, product):
    image, mask = product

    def zero_last(pipe, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 1 else {}

    out = pipe9(["a"], image, mask, num_inference_steps=2, output_type="latent", show_progress=False,
                callback_on_step_end=zero_last)[0]
    assert torch.count_nonzero(out.image) == 0
    with pytest.raises(InputError, match="must return a dict"):
        pipe9(["a"], image, mask, num_inference_steps=1, show_progress=False,
              callback_on_step_end=lambda pipe, i, t, kwargs: None)


# ------------------------------------------------------------------ alpha edges
def test_rgba_edge_blends_over_the_generated_background(pipe9):
    """An anti-aliased cut-out: opaque pixels stay bit-exact, partial ones become C·a + G·(1 − a) with G the
    generated background at those pixels (rounding as imaging.composite states), never C over white."""
    from cg4ctr_fast.imaging import composite, composite_float

    rng = np.random.default_rng(12)
    width, height = 51, 37
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot(xx - 25.0, yy - 18.0)
    alpha = np.clip((14.0 - distance) * 64.0, 0, 255).astype(np.uint8)  # a disc with a ~4-px soft edge
    colours = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)  # a dark product
    rgba = Image.fromarray(np.dstack([colours, alpha]))
    partial = (alpha > 0) & (alpha < 255)
    assert partial.sum() > 50
    kwargs = dict(num_inference_steps=2, show_progress=False)
    background = pipe9("neon", rgba, None, composite=False, **kwargs)[0].image  # G, at the input's size
    creative = pipe9("neon", rgba, None, **kwargs)[0]
    keep_region = Image.fromarray(np.where(alpha > 0, 0, 255).astype(np.uint8))
    expected = composite(Image.fromarray(colours), background, keep_region, alpha)
    # G comes from a second run: identical in this process, but one 8-bit step is allowed so float noise between
    # runs that flips G's rounding cannot fail the test; an "over white" edge is off by ≫ 1 step (checked below).
    assert np.abs(np.asarray(creative.image, int) - np.asarray(expected, int)).max() <= 1
    opaque = alpha == 255
    assert np.array_equal(np.asarray(creative.image)[opaque], colours[opaque])  # a copy: bit for bit
    # Float output: the same blend on the float background, and nothing like "over white" on the edge.
    background_np = pipe9("neon", rgba, None, composite=False, output_type="np", **kwargs)[0].image
    as_np = pipe9("neon", rgba, None, output_type="np", **kwargs)[0].image
    from cg4ctr_fast.pipeline import _resize_float

    want = composite_float(Image.fromarray(colours), _resize_float(background_np, (width, height)), keep_region,
                           alpha)
    assert np.abs(as_np - want).max() <= 1e-5  # floats from two runs: float noise only
    assert np.array_equal(as_np[opaque], colours[opaque].astype(np.float32) / np.float32(255))
    over_white = (colours.astype(np.float64) * alpha[..., None] + 255.0 * (255 - alpha[..., None])) / 255
    assert np.abs(np.asarray(creative.image, np.float64)[partial] - over_white[partial]).mean() > 20


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_reward_scores_the_8bit_images_for_every_output_type(pipe9, product, output_type):
    image, mask = product
    received = []

    def reward(images, groups):
        received.append([(type(im).__name__, im.mode, im.size) for im in images])
        return [float(np.asarray(im, np.float64).mean()) for im in images]

    pipe9.reward = reward
    try:
        creatives = pipe9(["a", "b"], image, mask, num_inference_steps=1, output_type=output_type,
                          show_progress=False)
    finally:
        pipe9.reward = None
    assert received == [[("Image", "RGB", image.size)] * 2]
    pil = pipe9(["a", "b"], image, mask, num_inference_steps=1, show_progress=False)
    for c, p in zip(creatives, pil):
        # The mean of an 8-bit image: equal up to rounding flips between runs (≤ 1 step on a pixel).
        assert abs(c.reward - float(np.asarray(p.image, np.float64).mean())) <= 1.0
