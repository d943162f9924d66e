"""cg4ctr_fast.sim: a synthetic ad world for judging creative-generation policies before an A/B test.

Procedural products with exact masks, caption-controlled backgrounds, user groups with hidden
preferences over measurable background features, a click model, log sampling and an oracle
(`World.true_ctr`). Everything is deterministic under the world's seed. See docs/sim.md.

    from cg4ctr_fast.sim import World
    world = World(seed=0)
    logs = world.sample_logs(n_products=8, creatives_per_product=4, days=7, rng=world.logs_rng())
    world.true_ctr(logs.creatives[0].image, group_id=0, item_id=logs.creatives[0].item_id)
"""
from cg4ctr_fast.sim.features import ANALYSIS_SIZE, FEATURE_NAMES, image_features
from cg4ctr_fast.sim.groups import ATTRIBUTES, GROUP_FEATURE_NAMES, UserGroup
from cg4ctr_fast.sim.products import ITEM_FEATURE_NAMES, PATTERNS, SHAPES, Product, draw_product
from cg4ctr_fast.sim.render import render_background, render_background_array
from cg4ctr_fast.sim.vocab import ALL_TOKENS, CATEGORIES, STYLE_VOCAB, all_captions, caption_text, parse_caption
from cg4ctr_fast.sim.world import (
    CREATIVE_COLUMNS,
    ITEM_COLUMNS,
    LOG_COLUMNS,
    SimCreative,
    SimLogs,
    World,
    WorldConfig,
    compose,
)
from cg4ctr_fast.sim.dataset import SimDataset, load_dataset, save_dataset, write_dataset

__all__ = [
    "World",
    "WorldConfig",
    "STYLE_VOCAB",
    "CATEGORIES",
    "ALL_TOKENS",
    "render_background",
    "render_background_array",
    "image_features",
    "FEATURE_NAMES",
    "ANALYSIS_SIZE",
    "compose",
    "parse_caption",
    "caption_text",
    "all_captions",
    "Product",
    "draw_product",
    "SHAPES",
    "PATTERNS",
    "ITEM_FEATURE_NAMES",
    "UserGroup",
    "ATTRIBUTES",
    "GROUP_FEATURE_NAMES",
    "SimCreative",
    "SimLogs",
    "SimDataset",
    "save_dataset",
    "write_dataset",
    "load_dataset",
    "ITEM_COLUMNS",
    "CREATIVE_COLUMNS",
    "LOG_COLUMNS",
]
