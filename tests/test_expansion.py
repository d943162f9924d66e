"""Object expansion E = |salient(output) \\ input product mask| / image area, and selection that drops creatives above
a threshold (training.metrics.object_expansion, pick_over_original(max_expansion=...))."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.metrics import object_expansion, pick_over_original, salient_region

H, W = 48, 64


def dark_is_salient(image: Image.Image) -> np.ndarray:
    """A deterministic stand-in for the saliency net: every dark pixel (luma < 128) is product."""
    return np.asarray(image.convert("L")) < 128


def _scene() -> tuple[Image.Image, np.ndarray]:
    """A dark 12 x 10 px product on a white background, and its exact mask (True = product)."""
    pixels = np.full((H, W, 3), 255, np.uint8)
    product = np.zeros((H, W), bool)
    product[20:32, 30:40] = True
    pixels[product] = (30, 40, 90)
    return Image.fromarray(pixels), product


def _paint(image: Image.Image, where: np.ndarray, rgb=(20, 20, 20)) -> Image.Image:
    pixels = np.asarray(image).copy()
    pixels[where] = rgb
    return Image.fromarray(pixels)


def test_zero_for_an_output_identical_to_the_input() -> None:
    image, product = _scene()
    assert object_expansion(dark_is_salient, image, product) == 0.0
    # The same mask in diffusers' convention (0 = keep product, 255 = repaint), as Product.mask holds it.
    mask = Image.fromarray(np.where(product, 0, 255).astype(np.uint8))
    assert object_expansion(dark_is_salient, image, mask) == 0.0
    # A new background that the net does not see as product leaves E at 0.
    repainted = _paint(image, ~product, (200, 230, 180))
    assert object_expansion(dark_is_salient, repainted, product) == 0.0


def test_planted_ghost_rim_and_second_product() -> None:
    image, product = _scene()
    grown = np.zeros_like(product)
    grown[18:34, 28:42] = True  # the outline grown by 2 px on every side
    rim = grown & ~product
    assert int(rim.sum()) == 16 * 14 - 12 * 10 == 104
    assert object_expansion(dark_is_salient, _paint(image, rim), product) == pytest.approx(104 / (H * W), abs=1e-12)
    second = np.zeros_like(product)
    second[4:12, 4:14] = True  # an 8 x 10 px second product in a corner
    both = _paint(_paint(image, rim), second)
    assert object_expansion(dark_is_salient, both, product) == pytest.approx((104 + 80) / (H * W), abs=1e-12)
    # The union counts a salient pixel inside the input mask once: E ignores what happens on the product.
    inside = _paint(both, product, (0, 0, 0))
    assert object_expansion(dark_is_salient, inside, product) == pytest.approx((104 + 80) / (H * W), abs=1e-12)


def test_float_saliency_maps_are_thresholded_at_one_half() -> None:
    image, product = _scene()
    ghost = np.zeros_like(product)
    ghost[0:4, 0:8] = True

    def soft(img: Image.Image) -> np.ndarray:
        out = np.where(product, 0.9, 0.1).astype(np.float32)
        out[ghost] = 0.5  # at the threshold: salient
        out[4, 0:8] = 0.49  # just below: not salient
        return out

    assert object_expansion(soft, image, product) == pytest.approx(32 / (H * W), abs=1e-12)


def test_the_real_net_is_zero_on_its_own_region() -> None:
    """The tiny U2NetP (untrained, fixed seed, eval mode, one thread: deterministic). The input mask is the
    region the same net finds on the input, so the identical output scores exactly 0; against an empty mask
    E is the whole salient fraction, against the whole image 0."""
    from cg4ctr_fast.models.saliency import SaliencyConfig, U2NetP, predict_saliency

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = U2NetP(config=SaliencyConfig(size=64)).eval()
        image, _ = _scene()
        # An untrained net's map is arbitrary: threshold at its median so the region is neither empty nor all.
        median = float(np.median(predict_saliency(net, image, size=64)))
        net.config = SaliencyConfig(size=64, threshold=median)
        region = salient_region(net, image)
        assert region.shape == (H, W) and region.dtype == np.bool_
        assert 0.3 < region.mean() < 0.7
        assert np.array_equal(region, salient_region(net, image))  # deterministic
        assert object_expansion(net, image, region) == 0.0
        assert object_expansion(net, image, np.ones((H, W), bool)) == 0.0
        assert object_expansion(net, image, np.zeros((H, W), bool)) == pytest.approx(region.mean(), abs=1e-12)
    finally:
        torch.set_num_threads(previous)


def test_bad_masks_are_one_line_input_errors() -> None:
    image, product = _scene()
    with pytest.raises(InputError, match="input mask is 64x47 px, the output 64x48"):
        object_expansion(dark_is_salient, image, product[:-1])
    with pytest.raises(InputError, match="2-D"):
        object_expansion(dark_is_salient, image, np.stack([product, product]))
    with pytest.raises(InputError, match="dtype float"):
        object_expansion(dark_is_salient, image, product.astype(np.float32))
    with pytest.raises(InputError, match="saliency function returned shape"):
        object_expansion(lambda img: np.zeros((4, 4), bool), image, product)


@pytest.mark.parametrize(("rewards", "expansions", "max_expansion", "expected"), [
    ([0.5, 0.9, 0.7], [0.0, 0.0, 0.0], 0.01, 1),  # nothing above the threshold: the plain pick
    ([0.5, 0.9, 0.7], [0.0, 0.05, 0.0], 0.01, 2),  # the best creative grew the product: the next one
    ([0.5, 0.9, 0.7], [0.0, 0.05, 0.02], 0.01, None),  # what is left does not beat the original (0.6)
    ([0.5, 0.9, 0.7], [0.05, 0.05, 0.05], 0.01, None),  # every creative dropped: the original
    ([0.5, 0.9, 0.7], [0.0, float("nan"), 0.0], 0.01, 2),  # an unmeasured expansion counts as above
    ([0.5, 0.9, 0.7], [0.0, 0.01, 0.0], 0.01, 1),  # at the threshold is kept
    ([0.5, 0.9, 0.7], None, None, 1),  # no threshold: expansions are not needed
])
def test_pick_over_original_drops_creatives_above_max_expansion(rewards, expansions, max_expansion, expected) -> None:
    assert pick_over_original(rewards, 0.6, expansions=expansions, max_expansion=max_expansion) == expected


def test_pick_over_original_max_expansion_needs_expansions() -> None:
    with pytest.raises(ValueError, match="one expansion per reward"):
        pick_over_original([0.5, 0.9], 0.1, max_expansion=0.01)
    with pytest.raises(ValueError, match="one expansion per reward"):
        pick_over_original([0.5, 0.9], 0.1, expansions=[0.0], max_expansion=0.01)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        pick_over_original([0.5, 0.9], 0.1, expansions=[0.0, 0.0], max_expansion=1.5)
