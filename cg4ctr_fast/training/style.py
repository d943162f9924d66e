"""Style LoRAs (the paper's open question 2): K LoRAs, each trained on one designer's seed set, and generation
that runs every user group of a product in one batch even when the groups use different LoRAs.

In the simulated world a designer's seed set is the backgrounds of one *style family*: creatives whose captions
draw their palette and lighting tokens from a fixed subset (`STYLE_FAMILIES`), with texture and scene free.
Palette and lighting are the categories that set the world's colour features (sim/render.py: palette → hue and
saturation, lighting → brightness), so the families separate on `STYLE_COLUMNS` of `world.features`
(`family_separation` measures it; docs/cycle/style_loras.md has the numbers).

The pieces:
- `StyleFamily`, `STYLE_FAMILIES`, `seed_set`: families and their seed sets (world renders + exact masks);
- `train_style_loras`: one LoRA per family with the project's trainer (training/lora.py), saved in diffusers'
  format (`CreativePipeline.from_pretrained(..., lora=folder)` loads one);
- `MixedLoraPipeline`: one product, one prompt and one LoRA (or none) per group, in either of two modes:
  "per_row": every LoRA is an unfused peft adapter of ONE UNet and each batch row runs its own adapter (peft's
  mixed-batch inference, `adapter_names` per row, injected by `row_adapters`);
  "split": one UNet per LoRA with the LoRA fused (`export.lora.fuse_loras`), the groups split by LoRA, one
  pipeline call per LoRA, the creatives put back in group order.
  Both give the same creatives (tests/test_style_lora.py; the pipeline's noise is per creative, seeded by
  (product, prompt, index), so it does not depend on which other rows share the batch);
- `steering_report`: per family, how far its LoRA moves generated backgrounds toward the family, against the
  base generator on the same prompts and seeds, on held-out products;
- `family_ctr_ceiling`: what choosing a family per (item, group) could gain over one family for all, by the
  world's oracle on its own renders (no generator): the ceiling of the 1-vs-K question;
- `run_style_experiment`: all of the above on the embedded toy models, with figures (the command in the docs).
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.sim.vocab import CATEGORIES, STYLE_VOCAB

__all__ = [
    "StyleFamily", "STYLE_FAMILIES", "STYLE_COLUMNS", "BASE", "seed_set", "family_features", "family_separation",
    "StyleLoraConfig", "train_style_loras", "load_adapters", "row_adapters", "MixedLoraPipeline",
    "steering_report", "family_ctr_ceiling", "run_style_experiment", "random_prompts", "free_prompt", "nearest",
    "ADAPTER_PREFIX", "ensure_style_loras", "check_style_folder", "STYLE_CATEGORY", "NO_STYLE", "StyleChoice",
    "style_tokens", "split_choice", "with_style",
]

# The world features palette and lighting set (sim/features.py): hue direction, saturation, brightness. Texture
# energy, contrast and brightness spread follow the texture token and the product, which a family leaves free.
STYLE_COLUMNS: tuple[str, ...] = ("hue_cos", "hue_sin", "saturation", "brightness")
# peft's name for "no adapter" in a mixed batch (LoraLayer._mixed_batch_forward skips it).
BASE = "__base__"
# MixedLoraPipeline's adapter names are "style_<LoRA name>", so a family called e.g. "pop" does not collide with
# ModuleDict.pop in peft's per-adapter ModuleDicts.
ADAPTER_PREFIX = "style_"


@dataclass(frozen=True)
class StyleFamily:
    """A style family: for some categories, the tokens its captions may use; the other categories are free.

    name: an identifier (also the LoRA's folder and adapter name); tokens: ((category, (token, ...)), ...).
    Raises InputError for an unknown category or token, or an empty token list.
    """

    name: str
    tokens: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise InputError(f"style family name must be an identifier, got {self.name!r}")
        for category, tokens in self.tokens:
            if category not in STYLE_VOCAB:
                raise InputError(f"style family {self.name}: unknown category {category!r}")
            unknown = [t for t in tokens if t not in STYLE_VOCAB[category]]
            if not tokens or unknown:
                raise InputError(f"style family {self.name}: {category} needs tokens from {STYLE_VOCAB[category]}")

    @property
    def fixed(self) -> dict[str, tuple[str, ...]]:
        """{category: allowed tokens} for the categories the family restricts."""
        return dict(self.tokens)

    @property
    def free_categories(self) -> tuple[str, ...]:
        """The categories the family leaves free, in canonical order."""
        return tuple(c for c in CATEGORIES if c not in self.fixed)

    def contains(self, caption: Sequence[str]) -> bool:
        """Whether a full caption (one token per category, canonical order) belongs to the family."""
        chosen = dict(zip(CATEGORIES, caption))
        return all(chosen.get(c) in tokens for c, tokens in self.tokens)

    def random_caption(self, rng: np.random.Generator) -> tuple[str, ...]:
        """A full caption of the family: each category's token drawn uniformly from what the family allows."""
        fixed = self.fixed
        out = []
        for category in CATEGORIES:
            options = fixed.get(category, STYLE_VOCAB[category])
            out.append(options[int(rng.integers(len(options)))])
        return tuple(out)


# K = 4 families by palette group × lighting group. Measured on world 0 (docs/cycle/style_loras.md): their
# centroids in STYLE_COLUMNS z-units are 1.9 to 2.8 apart and a nearest-centroid rule puts 85-98 % of held-out
# renders in their own family (128 seed creatives on training products, 128 test renders on held-out ones).
STYLE_FAMILIES: tuple[StyleFamily, ...] = (
    StyleFamily("sunlit", (("palette", ("warm", "earthy")), ("lighting", ("golden", "bright")))),
    StyleFamily("marine", (("palette", ("cool",)), ("lighting", ("soft", "backlit")))),
    StyleFamily("pop", (("palette", ("neon", "pastel")), ("lighting", ("bright", "soft")))),
    StyleFamily("noir", (("palette", ("monochrome",)), ("lighting", ("dim", "dramatic")))),
)


def free_prompt(family: StyleFamily, caption: Sequence[str]) -> str:
    """The caption without the family's fixed categories ("stripes beach" for a sunlit caption): the prompt a
    style LoRA is trained with, so that the LoRA, not the prompt, has to carry the family's palette and lighting."""
    chosen = dict(zip(CATEGORIES, caption))
    return " ".join(chosen[c] for c in family.free_categories)


def seed_set(world, family: StyleFamily, item_ids: Sequence[int], n_images: int, seed: int):
    """A designer's seed set: `n_images` world-rendered creatives of `family` on the given products.

    Returns (CreativeSet, captions): images [N, 3, H, W] float32 in [-1, 1], masks [N, 1, H, W] float32
    (1 = background), CreativeSet.captions = the training prompts (`free_prompt`), and the full captions
    (tuples of 4 tokens). Products are drawn uniformly from `item_ids`; everything is seeded by (seed, family).
    Raises InputError for no products or n_images < 1.
    """
    import torch

    from cg4ctr_fast.sim.vocab import stable_int
    from cg4ctr_fast.training.base import CreativeSet

    if not item_ids or n_images < 1:
        raise InputError("a seed set needs at least one product and one image")
    rng = np.random.default_rng([seed, stable_int("style-seed-set", family.name)])
    images, masks, prompts, captions = [], [], [], []
    for _ in range(n_images):
        item = int(item_ids[int(rng.integers(len(item_ids)))])
        caption = family.random_caption(rng)
        images.append(np.asarray(world.creative(item, caption, rng), dtype=np.float32) / 127.5 - 1.0)
        masks.append(np.asarray(world.product(item).mask, dtype=np.float32) / 255.0)
        prompts.append(free_prompt(family, caption))
        captions.append(caption)
    data = CreativeSet(images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                       masks=torch.from_numpy(np.stack(masks)).unsqueeze(1), captions=prompts)
    return data, captions


def family_features(world, images, masks) -> np.ndarray:
    """Standardised world features (z, `world.standardize`) of the STYLE_COLUMNS, float64 [N, 4].

    images: [N, 3, H, W] torch / numpy in [-1, 1], or a list of PIL images / uint8 arrays; masks: matching
    [N, 1, H, W] (1 = background) or a list of mode "L" masks (255 = background)."""
    from cg4ctr_fast.sim import FEATURE_NAMES

    cols = [FEATURE_NAMES.index(c) for c in STYLE_COLUMNS]
    rows = []
    for image, mask in zip(images, masks):
        if hasattr(image, "detach"):  # a [3, H, W] tensor in [-1, 1]
            image = ((image.detach().float().permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)
            image = image.astype(np.uint8)
            mask = (mask.detach().float().numpy()[0] * 255).round().astype(np.uint8)
        rows.append(world.standardize(world.features(image, mask))[cols])
    return np.asarray(rows, dtype=np.float64)


def family_separation(world, families: Sequence[StyleFamily] = STYLE_FAMILIES, *,
                      train_items: Sequence[int], test_items: Sequence[int], n_images: int = 96,
                      seed: int = 0) -> dict[str, Any]:
    """How distinct the families are in the world's own features.

    Centroids (mean z over STYLE_COLUMNS) from each family's seed set on `train_items`; then `n_images` fresh
    renders per family on `test_items` classified by the nearest centroid (Euclidean in z). Returns
    {"centroids": {family: [4 floats]}, "accuracy": {family: share of its test renders classified as it},
    "distance": {"a|b": centroid distance in z units}, "columns": STYLE_COLUMNS}.
    """
    centroids = {}
    for fam in families:
        data, _ = seed_set(world, fam, train_items, n_images, seed)
        centroids[fam.name] = family_features(world, data.images, data.masks).mean(0)
    names = [f.name for f in families]
    table = np.stack([centroids[n] for n in names])
    accuracy = {}
    for i, fam in enumerate(families):
        data, _ = seed_set(world, fam, test_items, n_images, seed + 1)
        z = family_features(world, data.images, data.masks)
        accuracy[fam.name] = float((nearest(z, table) == i).mean())
    distance = {f"{a}|{b}": float(np.linalg.norm(centroids[a] - centroids[b]))
                for i, a in enumerate(names) for b in names[i + 1:]}
    return {"columns": list(STYLE_COLUMNS), "centroids": {n: centroids[n].tolist() for n in names},
            "accuracy": accuracy, "distance": distance}


def nearest(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row: z [N, D], centroids [K, D] → int [N]."""
    return ((z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class StyleLoraConfig:
    """How the K style LoRAs are trained. `lora`: the cycle's trainer settings (training/lora.py)."""

    images_per_family: int = 128  # seed-set size: a designer's portfolio, not a data set
    # LoraTrainConfig; None: the cycle's LoRA shape with 1000 steps at lr 3e-3. On the toy generator that passed the
    # steering check for 3 of 4 families; 300 or 1000 steps at the cycle's lr 1e-3 passed 2 of 4
    # (docs/cycle/style_loras.md).
    lora: Any = None
    seed: int = 0

    def trainer(self):
        from cg4ctr_fast.training.lora import LoraTrainConfig

        return self.lora if self.lora is not None else LoraTrainConfig(steps=1000, lr=3e-3)


def train_style_loras(generator: Union[str, Path], world, out_dir: Union[str, Path], *,
                      families: Sequence[StyleFamily] = STYLE_FAMILIES, train_items: Sequence[int],
                      config: StyleLoraConfig = StyleLoraConfig(), log=print) -> dict[str, Path]:
    """Train one LoRA per family on its seed set and save each as `out_dir/<family>/` in diffusers' format
    (pytorch_lora_weights.safetensors; `CreativePipeline.from_pretrained(generator, lora=out_dir/<family>)`).

    generator: a diffusers folder (the toy generator); world: the sim World; train_items: the products the seed
    sets use (the world's logged products: never the held-out ones). Each LoRA starts from the same base UNet
    (a fresh load per family) and a seed derived from (config.seed, family). Each family's folder is written
    atomically, with `style.json` (family, seed-set size, training losses) beside the weights.
    Returns {family: folder}. Raises InputError for an unreadable generator folder or an empty family list.
    """
    import torch

    from cg4ctr_fast.fileio import atomic_dir, atomic_write_bytes
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.pipeline import derive_seed
    from cg4ctr_fast.training.lora import add_lora, encode_examples, save_lora, train_lora

    if not families:
        raise InputError("no style family to train")
    trainer = config.trainer()
    out = Path(out_dir)
    paths = {}
    for fam in families:
        modules = load_modules(str(generator))
        data, captions = seed_set(world, fam, train_items, config.images_per_family, config.seed)
        examples = encode_examples(modules.vae, data.images, data.masks)
        # peft draws lora_A at random: seeded, so a family's LoRA is a function of (config.seed, family).
        torch.manual_seed(derive_seed(config.seed, "style-lora-init", fam.name) % (2**63))
        add_lora(modules.unet, trainer)
        metrics = train_lora(modules.unet, modules.text_encoder, modules.tokenizer, modules.scheduler, examples,
                             data.captions, trainer, seed=derive_seed(config.seed, "style-lora", fam.name) % (2**63),
                             desc=f"style LoRA {fam.name}")
        record = {"family": fam.name, "tokens": {c: list(t) for c, t in fam.tokens},
                  "seed_set_images": len(captions), "train_items": [int(i) for i in train_items],
                  "seed": config.seed, "lora": asdict(trainer), **metrics}
        with atomic_dir(out / fam.name) as tmp:
            save_lora(modules.unet, tmp, extra_metadata={"style_family": fam.name})
            atomic_write_bytes(tmp / "style.json", (json.dumps(record, indent=2) + "\n").encode())
        log(f"[style] {fam.name}: {len(captions)} seed creatives, loss {metrics['lora_loss_first']:.4f} → "
            f"{metrics['lora_loss_last']:.4f} → {out / fam.name}")
        paths[fam.name] = out / fam.name
    return paths


def ensure_style_loras(generator: Union[str, Path], world, root: Union[str, Path], *, train_items: Sequence[int],
                       families: Sequence[StyleFamily] = STYLE_FAMILIES, config: StyleLoraConfig = StyleLoraConfig(),
                       log=print) -> dict[str, Path]:
    """The K style LoRAs under `root/<family>/`: reused where a folder's style.json records the same trainer
    settings, seed and seed-set size, trained (`train_style_loras`) where missing or different. Returns
    {family: folder}."""
    root = Path(root)
    want = json.loads(json.dumps({"lora": asdict(config.trainer()), "seed": config.seed,  # tuples as JSON lists
                                  "seed_set_images": config.images_per_family,
                                  "train_items": [int(i) for i in train_items]}))

    def current(fam: StyleFamily) -> bool:
        record = root / fam.name / "style.json"
        if not record.is_file():
            return False
        have = json.loads(record.read_text())
        return all(have.get(k) == v for k, v in want.items())

    stale = [f for f in families if not current(f)]
    if stale:
        train_style_loras(generator, world, root, families=stale, train_items=train_items, config=config, log=log)
    return {f.name: root / f.name for f in families}


def check_style_folder(folder: Union[str, Path], families: Sequence[StyleFamily] = STYLE_FAMILIES) -> dict[str, Path]:
    """{family: folder/<family>} for a folder of style LoRAs (`cg4ctr-train style` writes one); InputError (one line)
    when a family's sub-folder holds no LoRA weights."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: style LoRA folder not found")

    from cg4ctr_fast.export.lora import resolve_lora

    def missing_in(base: Path) -> list[str]:  # the loader's own rule (`load_adapters` reads through resolve_lora)
        missing = []
        for fam in families:
            try:
                resolve_lora(base / fam.name)
            except InputError:
                missing.append(fam.name)
        return missing

    missing = missing_in(root)
    if missing:
        # `cg4ctr-train style --out X` writes the LoRAs to X/loras.
        hint = f"; did you mean {root / 'loras'}?" if (root / "loras").is_dir() and not missing_in(root / "loras") else ""
        raise InputError(f"{root}: no style LoRA for {', '.join(missing)} (want one sub-folder per family: "
                         f"{', '.join(f.name for f in families)}){hint}")
    return {f.name: root / f.name for f in families}


# ------------------------------------------------------------------------------------------------ the choice
# The prompt model's extra category when the cycle has style LoRAs: "none" (the base generator) or a family name.
STYLE_CATEGORY = "style"
NO_STYLE = "none"


@dataclass(frozen=True)
class StyleChoice:
    """What one proposal of a style-aware prompt model asks the generator for.

    prompt: the text the generator (and the reward model) reads; lora: the family name or None;
    caption: the prompt model's training caption (the tokens that took effect, then the style token: a chosen
    family's fixed categories are absent, so the prompt model learns nothing about them from that row)."""

    prompt: str
    lora: Optional[str]
    caption: str

    @property
    def style(self) -> str:
        return self.lora or NO_STYLE


def style_tokens(families: Sequence[StyleFamily] = STYLE_FAMILIES) -> tuple[str, ...]:
    """The style category's tokens: "none", then the family names."""
    return (NO_STYLE, *(f.name for f in families))


def split_choice(proposal: str, families: Sequence[StyleFamily] = STYLE_FAMILIES) -> StyleChoice:
    """A style-aware proposal ("warm stripes beach golden marine": one token per category, the style last) →
    what the generator runs. With a family, its fixed categories' tokens are dropped (`free_prompt`): the LoRA
    carries them. Raises InputError for a proposal without exactly one style token or a caption token missing."""
    by_name = {f.name: f for f in families}
    words = proposal.split()
    styles = [w for w in words if w in by_name or w == NO_STYLE]
    tokens = [w for w in words if w not in by_name and w != NO_STYLE]
    if len(styles) != 1 or len(tokens) != len(CATEGORIES):
        raise InputError(f"style proposal {proposal!r}: want {len(CATEGORIES)} caption tokens and one style token")
    style = styles[0]
    if style == NO_STYLE:
        text = " ".join(tokens)
        return StyleChoice(prompt=text, lora=None, caption=f"{text} {NO_STYLE}")
    text = free_prompt(by_name[style], tokens)
    return StyleChoice(prompt=text, lora=style, caption=f"{text} {style}")


def with_style(proposal: str, style: str, families: Sequence[StyleFamily] = STYLE_FAMILIES) -> str:
    """The proposal with its style token replaced by `style` (the random-assignment arm)."""
    names = set(style_tokens(families))
    return " ".join([w for w in proposal.split() if w not in names] + [style])


# ------------------------------------------------------------------------------------------------ mixed batches
LoraSpec = Union[str, Path, tuple]  # a LoRA path, or (path, scale)


def _spec(spec: LoraSpec) -> tuple[str, float]:
    from cg4ctr_fast.export.lora import check_scale

    if isinstance(spec, tuple):
        path, scale = spec
        return str(path), check_scale(float(scale))
    return str(spec), 1.0


def _check_names(loras: Mapping[str, LoraSpec], *, adapter: bool = True) -> None:
    if not loras:
        raise InputError("no LoRA: pass at least one {name: path}")
    import torch

    for name in loras:
        if not isinstance(name, str) or not name.isidentifier() or name == BASE:
            raise InputError(f"LoRA names must be identifiers other than {BASE!r}, got {name!r}")
        # peft keeps adapters in ModuleDicts keyed by name: a name like "pop" or "keys" collides with a method.
        if adapter and hasattr(torch.nn.ModuleDict(), name):
            raise InputError(f"LoRA name {name!r} is a torch ModuleDict attribute; peft cannot use it as an "
                             "adapter name")


def load_adapters(modules, loras: Mapping[str, LoraSpec]) -> None:
    """Load each LoRA as an unfused peft adapter of `modules.unet` named by its key, at its scale; in place.

    loras: {adapter name: path or (path, scale)}; paths as `export.lora.resolve_lora` reads them (diffusers /
    kohya .safetensors, a folder holding one, or a peft folder). The adapters are then disabled
    (`unet.disable_lora()`): outside `row_adapters` the UNet is the base UNet, so no call mixes all of them.
    Raises InputError (one line) for an unreadable LoRA, one that does not fit the UNet, or one that also adapts
    the text encoder (a per-row text encoder would need the prompts split by LoRA: use mode "split").
    """
    from cg4ctr_fast.export.lora import _load_diffusers, _load_peft_adapter, _lora_numel, lora_record, resolve_lora
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    _check_names(loras)
    specs = {name: _spec(spec) for name, spec in loras.items()}
    pipe = diffusers_inpaint_pipeline(modules)
    for name, (path, _scale) in specs.items():
        kind, files = resolve_lora(path)
        text_before = _lora_numel(modules.text_encoder)
        if lora_record(path, 1.0)["format"] == "peft":
            _load_peft_adapter(modules, Path(path), files[0], name)
        else:
            _load_diffusers(pipe, modules, files[0], name)
        if _lora_numel(modules.text_encoder) != text_before:
            pipe.unload_lora_weights()
            raise InputError(f"LoRA {path} also adapts the text encoder; per-row adapters cover UNet LoRAs only "
                             "(use mode 'split')")
    modules.unet.set_adapters(list(specs), weights=[scale for _path, scale in specs.values()])
    modules.unet.disable_lora()


@contextlib.contextmanager
def row_adapters(unet, names: Sequence[str]):
    """Within the block, row i of every UNet batch runs adapter `names[i]` (peft's mixed-batch inference).

    names: one adapter name per batch row (BASE = no adapter), length n. A LoRA layer that sees a batch of
    k × n rows (classifier-free guidance: [unconditional rows; conditional rows], k = 2) gets the names
    repeated k times, which is right for batches made of k copies of the rows stacked along dim 0, as the
    pipeline builds them; any other batch size raises RuntimeError. Enables the UNet's adapters for the block
    (`load_adapters` leaves them disabled) and disables them again after. Raises InputError for a name that is
    no adapter of the UNet.
    """
    from peft.tuners.lora import LoraLayer

    names = list(names)
    n = len(names)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    known = set().union(*(m.lora_A.keys() for m in layers)) if layers else set()
    unknown = sorted({x for x in names if x != BASE} - known)
    if unknown or not n:
        raise InputError(f"no adapter named {unknown[0]!r} in this UNet (loaded: {sorted(known)})" if unknown
                         else "row_adapters needs one adapter name per row")
    cache: dict[int, list[str]] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        rows = int(x.shape[0])
        if rows not in cache:
            if rows % n:
                raise RuntimeError(f"a LoRA layer got a batch of {rows} rows for {n} per-row adapter names")
            cache[rows] = names * (rows // n)
        kwargs["adapter_names"] = cache[rows]
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    unet.enable_lora()
    try:
        yield
    finally:
        unet.disable_lora()
        for handle in handles:
            handle.remove()


def _split_modules(modules):
    from cg4ctr_fast.models.diffusion import DiffusionModules

    return DiffusionModules(unet=copy.deepcopy(modules.unet), vae=modules.vae, text_encoder=modules.text_encoder,
                            tokenizer=modules.tokenizer, scheduler=modules.scheduler, model_id=modules.model_id)


@dataclass
class MixedLoraPipeline:
    """One product, one prompt and one LoRA (or none) per user group; see the module docstring for the modes.

    Build with `MixedLoraPipeline.build(modules, loras, mode)`. `pipes` maps a LoRA name (None = no LoRA) to the
    CreativePipeline that runs it: in "per_row" one pipeline serves every name, in "split" each has its own UNet.
    """

    mode: str
    pipes: dict = field(default_factory=dict)
    names: tuple = ()

    @classmethod
    def build(cls, modules, loras: Mapping[str, LoraSpec], mode: str = "per_row", **pipeline_kwargs):
        """modules: a DiffusionModules without adapters; loras: {name: path or (path, scale)}; mode: "per_row"
        (loads the LoRAs as adapters of modules.unet, in place) or "split" (one deep copy of the UNet per LoRA,
        fused by `export.lora.fuse_loras`; `modules` stays the base: K + 1 UNets in memory).
        pipeline_kwargs: passed to `CreativePipeline.from_modules` (scheduler, reward, ...).
        Raises InputError for another mode, a bad name, or a LoRA that cannot be loaded."""
        from cg4ctr_fast.export.lora import fuse_loras
        from cg4ctr_fast.pipeline import CreativePipeline

        if mode not in ("per_row", "split"):
            raise InputError(f"mode must be 'per_row' or 'split', got {mode!r}")
        _check_names(loras, adapter=False)  # adapters get ADAPTER_PREFIX
        if any(".lora_" in n for n, _ in modules.unet.named_parameters()):
            raise InputError("the UNet already holds LoRA adapters; pass base modules")
        if mode == "per_row":
            load_adapters(modules, {ADAPTER_PREFIX + name: spec for name, spec in loras.items()})
            pipe = CreativePipeline.from_modules(modules, **pipeline_kwargs)
            return cls(mode=mode, pipes={None: pipe, **{name: pipe for name in loras}}, names=tuple(loras))
        pipes = {}
        for name, spec in loras.items():
            fused = _split_modules(modules)
            fuse_loras(fused, [_spec(spec)])
            pipes[name] = CreativePipeline.from_modules(fused, **pipeline_kwargs)
        pipes[None] = CreativePipeline.from_modules(modules, **pipeline_kwargs)
        return cls(mode=mode, pipes=pipes, names=tuple(loras))

    def __call__(self, prompt: Sequence[str], lora: Sequence[Optional[str]], image, mask_image=None, *,
                 num_images_per_prompt: int = 1, negative_prompt=None, generator=None, **kwargs):
        """Creatives for one product, group-major as `CreativePipeline.__call__` returns them (group g = prompt g).

        prompt: one prompt per group; lora: one LoRA name (a key of the build's `loras`) or None per group.
        Other arguments as in `CreativePipeline.__call__`. With mode "split", `generator` must be None (seeds
        derived per creative, the default) or a list of one per creative, so that each row's noise does not
        depend on how the batch is split. Raises InputError for a length mismatch or an unknown LoRA name.
        """
        prompts = list(prompt)
        loras = list(lora)
        if len(loras) != len(prompts):
            raise InputError(f"got {len(loras)} LoRA names for {len(prompts)} prompts (one per group)")
        unknown = [x for x in loras if x not in self.pipes]
        if unknown:
            raise InputError(f"unknown LoRA {unknown[0]!r}; this pipeline holds {list(self.names)} (and None)")
        per = num_images_per_prompt
        if self.mode == "per_row":
            rows = [BASE if name is None else ADAPTER_PREFIX + name for name in loras for _ in range(per)]
            pipe = self.pipes[None]
            with row_adapters(pipe.components.unet.module, rows):
                return pipe(prompts, image, mask_image, num_images_per_prompt=per, negative_prompt=negative_prompt,
                            generator=generator, **kwargs)
        if generator is not None and not isinstance(generator, list):
            raise InputError("mode 'split' needs generator=None (per-creative seeds) or one generator per creative")
        negatives = None if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
        out = []
        for name in dict.fromkeys(loras):  # each LoRA once, in order of first use
            groups = [g for g, x in enumerate(loras) if x == name]
            sub_negative = [negatives[g] for g in groups] if negatives is not None else negative_prompt
            sub_generator = ([generator[g * per + i] for g in groups for i in range(per)]
                             if isinstance(generator, list) else None)
            creatives = self.pipes[name]([prompts[g] for g in groups], image, mask_image, num_images_per_prompt=per,
                                         negative_prompt=sub_negative, generator=sub_generator, **kwargs)
            for creative in creatives:
                creative.group = groups[creative.group]
            out += creatives
        out.sort(key=lambda c: c.group)  # stable: each group keeps its order (index, or preview rank)
        return out


# ------------------------------------------------------------------------------------------------ steering
def steering_report(mixed: MixedLoraPipeline, world, families: Sequence[StyleFamily], centroids: Mapping[str, Any],
                    item_ids: Sequence[int], *, prompts: Sequence[str], images_per_prompt: int = 2,
                    steps: int = 15, guidance: float = 5.0, seed: int = 0, d_min: float = 0.8,
                    min_shift: float = 0.1) -> dict[str, Any]:
    """Per family, whether its LoRA moves generated backgrounds toward the family, against the base generator.

    For each product in `item_ids` (held-out ones), ONE batch: every prompt with no LoRA and with each family's
    LoRA (names = family names in `mixed`), `images_per_prompt` creatives each, the same seeds per (prompt,
    index) for every LoRA, so base and LoRA creatives are paired. Per creative, the distance (z units, world
    features, STYLE_COLUMNS) from its background to the family's centroid (`centroids`: {family: [4 floats]} from
    the seed sets, every family's, since the shares below pick the nearest of all of them).
    Per family: mean distance with and without the LoRA, the paired Cohen's d_z of (base − LoRA) distances
    (mean difference / its standard deviation; > 0 = closer with the LoRA), the share of creatives whose nearest
    centroid is the family's, with and without. `passed`: d_z ≥ d_min (0.8, a "large" effect by Cohen's
    convention), the mean distance fell by ≥ min_shift z units (0.1: d_z alone is scale-free, so float noise
    between identical rows could pass it) and the share rose. A LoRA that changes nothing fails all three.
    Returns a JSON-ready dict: the settings and {"families": {name: {n, distance_base, distance_lora, shift,
    cohens_dz, share_base, share_lora, mean_z_base, mean_z_lora, passed}}}.
    """
    names = [f.name for f in families]
    # Nearest-centroid shares are taken over every centroid given, so one family can be checked alone.
    all_names = list(centroids)
    missing = [n for n in names if n not in centroids]
    if missing:
        raise InputError(f"no centroid for style family {missing[0]!r}")
    table = np.stack([np.asarray(centroids[n], dtype=np.float64) for n in all_names])
    lora_rows = [None] + names
    z: dict[Optional[str], list] = {name: [] for name in lora_rows}
    for item_id in item_ids:
        product = world.product(item_id)
        batch_prompts = [p for _ in lora_rows for p in prompts]
        batch_loras = [name for name in lora_rows for _ in prompts]
        creatives = mixed(batch_prompts, batch_loras, product.image, product.mask,
                          num_images_per_prompt=images_per_prompt, num_inference_steps=steps,
                          guidance_scale=guidance, seed=seed, show_progress=False)
        for creative in creatives:
            name = batch_loras[creative.group]
            z[name].append(family_features(world, [creative.image], [product.mask])[0])
    base = np.asarray(z[None])
    report: dict[str, Any] = {"columns": list(STYLE_COLUMNS), "items": [int(i) for i in item_ids],
                              "prompts": list(prompts), "images_per_prompt": images_per_prompt, "steps": steps,
                              "guidance": guidance, "d_min": d_min, "min_shift": min_shift, "families": {}}
    for name in names:
        i = all_names.index(name)
        styled = np.asarray(z[name])
        d_base = np.linalg.norm(base - table[i], axis=1)
        d_lora = np.linalg.norm(styled - table[i], axis=1)
        diff = d_base - d_lora
        d_z = float(diff.mean() / diff.std(ddof=1)) if diff.std(ddof=1) > 0 else 0.0
        share_base = float((nearest(base, table) == i).mean())
        share_lora = float((nearest(styled, table) == i).mean())
        report["families"][name] = {
            "n": int(diff.size), "distance_base": float(d_base.mean()), "distance_lora": float(d_lora.mean()),
            "shift": float(diff.mean()), "cohens_dz": d_z, "share_base": share_base, "share_lora": share_lora,
            "mean_z_base": base.mean(0).tolist(), "mean_z_lora": styled.mean(0).tolist(),
            "passed": bool(d_z >= d_min and diff.mean() >= min_shift and share_lora > share_base),
        }
    return report


# ------------------------------------------------------------------------------------------------ the experiment
def random_prompts(n: int, seed: int, *, categories: Sequence[str] = ("texture", "scene")) -> list[str]:
    """`n` distinct random prompts over `categories` (canonical order), seeded; the steering measure's prompts.
    ("texture", "scene"): the categories every family leaves free; CATEGORIES: full captions, whose palette and
    lighting tokens may name another family's. Raises InputError when fewer than n distinct prompts exist."""
    rng = np.random.default_rng([seed, 23])
    ordered = [c for c in CATEGORIES if c in categories]
    total = int(np.prod([len(STYLE_VOCAB[c]) for c in ordered]))
    if n > total:
        raise InputError(f"only {total} distinct prompts over {ordered}, asked for {n}")
    out: list[str] = []
    while len(out) < n:
        text = " ".join(STYLE_VOCAB[c][int(rng.integers(len(STYLE_VOCAB[c])))] for c in ordered)
        if text not in out:
            out.append(text)
    return out


def run_style_experiment(out_dir: Union[str, Path], *, seed: int = 0, eval_products: int = 6, n_prompts: int = 4,
                         images_per_prompt: int = 2, steps: int = 15, guidance: float = 5.0,
                         config: StyleLoraConfig = StyleLoraConfig(), retrain: bool = False, lora_scale: float = 1.0,
                         log=print) -> dict:
    """The whole measurement on the embedded toy models: family separation, K style LoRAs (reused from
    `out_dir/loras/<family>` when trained with the same settings, unless `retrain`), the steering report with prompts over the free categories and
    with full random captions, a sample grid and a feature plot. Writes `out_dir/style_loras.json`,
    `out_dir/style_samples.png` and (with matplotlib) `out_dir/style_steering.png`; returns the JSON's dict.
    lora_scale: every LoRA's adapter weight at generation (1.0 = as trained).
    Held-out products: HELD_OUT_ITEM_BASE + 1000 + k (never logged, never in a seed set)."""
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    out = Path(out_dir)
    toy_config = ToyConfig()
    toy = resolve_toy_models(toy_config)
    world = load_dataset(toy.world).world
    train_items = list(range(toy_config.products))
    test_items = [HELD_OUT_ITEM_BASE + 1000 + k for k in range(max(eval_products, 8))]
    log("[style] family separation (world features)")
    separation = family_separation(world, STYLE_FAMILIES, train_items=train_items, test_items=test_items,
                                   n_images=config.images_per_family, seed=seed)
    lora_dir = out / "loras"
    if retrain:
        train_style_loras(toy.generator, world, lora_dir, train_items=train_items, config=config, log=log)
    else:  # reuses a family's LoRA only when its style.json records these settings
        ensure_style_loras(toy.generator, world, lora_dir, train_items=train_items, config=config, log=log)
    loras = {f.name: (lora_dir / f.name, lora_scale) for f in STYLE_FAMILIES}
    training = {f.name: json.loads((lora_dir / f.name / "style.json").read_text()) for f in STYLE_FAMILIES}
    mixed = MixedLoraPipeline.build(load_modules(str(toy.generator)), loras, "per_row")
    items = test_items[:eval_products]
    reports = {}
    for label, categories in (("free_prompts", ("texture", "scene")), ("full_captions", CATEGORIES)):
        prompts = random_prompts(n_prompts, seed, categories=categories)
        log(f"[style] steering with {label}: {prompts}")
        reports[label] = steering_report(mixed, world, STYLE_FAMILIES, separation["centroids"], items,
                                         prompts=prompts, images_per_prompt=images_per_prompt, steps=steps,
                                         guidance=guidance, seed=seed)
        for name, row in reports[label]["families"].items():
            log(f"[style]   {name}: distance {row['distance_base']:.2f} → {row['distance_lora']:.2f} z, "
                f"d_z {row['cohens_dz']:+.2f}, share {row['share_base']:.2f} → {row['share_lora']:.2f}, "
                f"{'passed' if row['passed'] else 'FAILED'}")
    result = {"seed": seed, "generator": str(toy.generator), "lora_scale": lora_scale,
              "families": {f.name: {c: list(t) for c, t in f.tokens} for f in STYLE_FAMILIES},
              "separation": separation, "training": training, "steering": reports}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "style_loras.json", (json.dumps(result, indent=2) + "\n").encode())
    sample_grid(mixed, world, items[:2], random_prompts(2, seed + 1), out / "style_samples.png", seed=seed,
                steps=steps, guidance=guidance)
    plot_steering(result, out / "style_steering.png")
    return result


def sample_grid(mixed: MixedLoraPipeline, world, item_ids: Sequence[int], prompts: Sequence[str], path: Path, *,
                seed: int = 0, steps: int = 15, guidance: float = 5.0, upscale: int = 2) -> Path:
    """A PNG: one row per (product, prompt), one column per LoRA (none first, then the families in `mixed`);
    each row generated as ONE mixed batch. Pixels upscaled `upscale`× (nearest) for viewing."""
    from PIL import Image

    from cg4ctr_fast.fileio import atomic_write_bytes

    columns = [None, *mixed.names]
    rows = []
    for item_id in item_ids:
        product = world.product(item_id)
        batch_prompts = [p for p in prompts for _ in columns]
        batch_loras = [c for _ in prompts for c in columns]
        creatives = mixed(batch_prompts, batch_loras, product.image, product.mask, num_inference_steps=steps,
                          guidance_scale=guidance, seed=seed, show_progress=False)
        for r in range(len(prompts)):
            rows.append([creatives[r * len(columns) + c].image for c in range(len(columns))])
    size = rows[0][0].size[0] * upscale
    grid = Image.new("RGB", (size * len(columns), size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((size, size), Image.Resampling.NEAREST), (c * size, r * size))
    import io

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_steering(result: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Per family: distance to its centroid without and with its LoRA (both prompt sets), as bars; and the
    family centroids and generated means in the hue plane. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from cg4ctr_fast.fileio import atomic_write_bytes

    names = list(result["separation"]["centroids"])
    colours = dict(zip(names, ("tab:orange", "tab:blue", "tab:purple", "tab:gray", "tab:green", "tab:red")))
    fig, (bars, plane) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.2
    x = np.arange(len(names))
    for k, (label, report) in enumerate(result["steering"].items()):
        fams = report["families"]
        bars.bar(x + (2 * k - 1.5) * width, [fams[n]["distance_base"] for n in names], width, color="lightgray",
                 edgecolor="black", hatch="//" if k else None, label=f"no LoRA, {label}")
        bars.bar(x + (2 * k - 0.5) * width, [fams[n]["distance_lora"] for n in names], width,
                 color=[colours[n] for n in names], edgecolor="black", hatch="//" if k else None,
                 label=f"family LoRA, {label}")
    bars.set_xticks(x, names)
    bars.set_ylabel("distance to family centroid (z units, world features)")
    bars.set_title("generated backgrounds, held-out products")
    bars.legend(fontsize=7)
    report = result["steering"]["free_prompts"]["families"]
    for n in names:
        cx, cy = result["separation"]["centroids"][n][:2]
        plane.scatter([cx], [cy], s=160, color=colours[n], marker="*", edgecolor="black", label=f"{n} seed set")
        lx, ly = report[n]["mean_z_lora"][:2]
        plane.scatter([lx], [ly], s=60, color=colours[n], marker="o", edgecolor="black",
                      label="with the family's LoRA (mean)" if n == names[0] else None)
        plane.annotate("", (lx, ly), xytext=tuple(report[n]["mean_z_base"][:2]),
                       arrowprops={"arrowstyle": "->", "color": colours[n]})
    bx, by = report[names[0]]["mean_z_base"][:2]
    plane.scatter([bx], [by], s=60, color="white", edgecolor="black", label="no LoRA (mean)")
    plane.set_xlabel("hue_cos (z)")
    plane.set_ylabel("hue_sin (z)")
    plane.set_title("hue plane: no LoRA → family LoRA (free prompts)")
    plane.legend(fontsize=7)
    fig.tight_layout()
    from cg4ctr_fast.training.figures import png_bytes

    atomic_write_bytes(path, png_bytes(fig))
    return path


# ------------------------------------------------------------------------------------------------ the ceiling
def family_ctr_ceiling(world, families: Sequence[StyleFamily] = STYLE_FAMILIES, *, item_ids: Sequence[int],
                       renders: int = 8, seed: int = 0) -> dict[str, Any]:
    """What choosing a style per (item, group) could gain over one style for all, if each LoRA drew its family
    exactly as the world renders it: the oracle's ceiling for the 1-vs-K question, no generator involved.

    Per (family, item, group): the true CTR (`world.true_ctr_groups`) averaged over `renders` world renders of
    random family captions. Two independent sets of renders (seeds `seed` and `seed + 1`): choices are made on
    the first and scored on the second, so a choice does not profit from its own render noise (winner's curse).
    Arms: "any caption" (random captions over the whole vocabulary), each family alone, the best single family
    (by aggregate CTR), the best family per group, and the best family per (item, group). Aggregate CTR =
    Σ w_g·CTR / Σ w_g over (item, group) cells, w_g = `world.group_traffic()`; lifts against the best single family
    with 95 % cluster-bootstrap CIs over items (`training.metrics.aggregate_ctr_lift`).
    Returns {"aggregate_ctr": {arm: float}, "lift_vs_best_single": {arm: {lift, ci95, mean_of_ratios}},
    "best_family_per_group": [name per group], "share_of_cells": {family: share of (item, group) choices}}.
    """
    from cg4ctr_fast.sim.vocab import stable_int
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    names = [f.name for f in families]
    items = [int(i) for i in item_ids]
    weights = world.group_traffic()
    n_groups = len(weights)

    def table(draw_seed: int) -> np.ndarray:  # [arms = families + any caption, items, groups]
        out = np.zeros((len(families) + 1, len(items), n_groups))
        for a in range(len(families) + 1):
            key = names[a] if a < len(families) else "any"
            for j, item in enumerate(items):
                rng = np.random.default_rng([draw_seed, stable_int("style-ceiling", key), item])
                for _ in range(renders):
                    caption = families[a].random_caption(rng) if a < len(families) else world.random_caption(rng)
                    out[a, j] += world.true_ctr_groups(world.creative(item, caption, rng), item)
        return out / renders

    choose, score = table(seed), table(seed + 1)
    w = np.broadcast_to(weights, (len(items), n_groups))

    def aggregate(ctr: np.ndarray) -> float:
        return float((ctr * w).sum() / w.sum())

    single = [aggregate(choose[a]) for a in range(len(families))]
    best = int(np.argmax(single))
    per_group = choose[: len(families)].mean(1).argmax(0)  # [groups]
    per_cell = choose[: len(families)].argmax(0)  # [items, groups]
    cells = np.arange(len(items))[:, None], np.arange(n_groups)[None, :]
    arms = {"any caption": score[-1], **{f"{n} alone": score[a] for a, n in enumerate(names)},
            "best single family": score[best],
            "best family per group": score[per_group[None, :], cells[0], cells[1]],
            "best family per (item, group)": score[per_cell, cells[0], cells[1]]}
    clusters = np.repeat(np.arange(len(items)), n_groups)
    lifts = {}
    for arm, ctr in arms.items():
        result = aggregate_ctr_lift(ctr.ravel(), score[best].ravel(), w.ravel(), clusters=clusters, seed=seed)
        lifts[arm] = {"lift": result.lift, "ci95": list(result.ci95), "mean_of_ratios": result.mean_of_ratios}
    return {"items": items, "renders": renders, "best_single_family": names[best],
            "aggregate_ctr": {arm: aggregate(ctr) for arm, ctr in arms.items()},
            "lift_vs_best_single": lifts,
            "best_family_per_group": [names[k] for k in per_group],
            "share_of_cells": {n: float((per_cell == a).mean()) for a, n in enumerate(names)}}
