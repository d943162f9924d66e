"""ONNX Runtime backend: the same `Components` slots, filled from a `cg4ctr-export onnx` folder.

Providers, in order, whichever this onnxruntime build has: TensorrtExecutionProvider, CUDAExecutionProvider,
CPUExecutionProvider. On a GPU the slots bind torch CUDA tensors to the session with IO binding (no host copy);
on the CPU they go through numpy. Every call checks its input shapes against the contract profiles the folder
was exported with, and says in one line what to re-export when a shape falls outside them.

The loop is the pipeline's own: only the slots differ.

A folder exported with --reward also holds the reward model: `load_reward_engine(DIR)` gives an object with
RewardModel's serving API (embed_images, score, encode_titles, ...), so a serving stack ranks stored creatives
in ONNX Runtime. `CreativePipeline.from_engines(DIR)` attaches it as the pipeline's reward (stage 10) through
`PipelineReward`, whose defaults for what the pipeline does not know (title, captions, user-group features)
are documented there.

Files are checked at load against the manifest (export/manifest.py): every runtime file (tokenizer/,
scheduler/, model_info.json, reward/) by size and sha256, graphs by sha256 up to LOAD_HASH_BYTES (256 MiB) and
by size above; `cg4ctr-export verify` hashes everything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import PIPELINE_COMPONENTS, REWARD_COMPONENTS, ComponentContract
from cg4ctr_fast.runtime.slots import Components

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def available_providers(requested: Optional[Sequence[str]] = None) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    order = list(requested) if requested else list(PROVIDER_ORDER)
    unknown = [p for p in order if p not in available]
    if requested and unknown:
        raise InputError(f"onnxruntime here has no {', '.join(unknown)}; it has {', '.join(sorted(available))}")
    return [p for p in order if p in available]


class OrtComponent:
    """One ONNX Runtime session with its contract: shape checks, numpy on the CPU, IO binding on CUDA."""

    def __init__(self, path: Path, contract: ComponentContract, providers: Sequence[str], device: torch.device,
                 threads: Optional[int] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            # The intra-op pool (default: one thread per physical core); benchmarks give torch the same count.
            options.intra_op_num_threads = int(threads)
        if device.type == "cpu":
            # ORT's worker threads busy-wait after each run by default. The loop runs torch (scheduler step,
            # guidance) between UNet calls on the same cores, and spinning threads starve it: on the 2-core
            # CPU the ORT pipeline measured 0.3-0.5 s per call without spinning against 1.1 s with it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile: the file does not load
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: onnxruntime cannot load it ({first[:200]}): {mf.REEXPORT}") from None
        self.contract = contract
        self.device = device
        self.name = contract.name
        self.input_dtypes = {s.name: s.dtype for s in contract.inputs}
        self.output_dtypes = {s.name: s.dtype for s in contract.outputs}

    def run(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        self.contract.check_shapes({k: tuple(v.shape) for k, v in feeds.items()}, where=f"{self.name} (onnxruntime)")
        feeds = {k: v.to(_TORCH_DTYPES[self.input_dtypes[k]]) for k, v in feeds.items()}
        if self.device.type == "cuda":
            return self._run_bound(feeds)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        outputs = self.session.run(self.contract.output_names, arrays)
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """IO binding: inputs and outputs stay in torch CUDA memory; outputs allocated from the contract."""
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        values: dict[str, int] = {}
        for spec in self.contract.inputs:
            tensor = feeds[spec.name].to(self.device).contiguous()
            feeds[spec.name] = tensor  # keep alive until the run ends
            for axis, size in zip(spec.shape, tensor.shape):
                if isinstance(axis, str):
                    values[axis] = int(size)
            binding.bind_input(
                name=spec.name, device_type="cuda", device_id=device_id,
                element_type=_NUMPY_DTYPES[spec.dtype], shape=tuple(tensor.shape), buffer_ptr=tensor.data_ptr(),
            )
        for name, source, num, den in self.contract.derived:
            values[name] = values[source] * num // den
        outputs = []
        for spec in self.contract.outputs:
            out = torch.empty(self.contract.shape(spec, values), dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
            binding.bind_output(
                name=spec.name, device_type="cuda", device_id=device_id,
                element_type=_NUMPY_DTYPES[spec.dtype], shape=tuple(out.shape), buffer_ptr=out.data_ptr(),
            )
            outputs.append(out)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


class OrtTextEncoderSlot:
    def __init__(self, component: OrtComponent):
        self.component = component

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.component.run(input_ids=input_ids)[0]


class OrtUNetSlot:
    # An exported graph is the whole UNet: no shallow-only path, so no DeepCache (cache_interval > 1 is refused).
    supports_feature_cache = False

    def __init__(self, component: OrtComponent):
        self.component = component

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # The loop passes one 0-dim timestep for the whole batch; the graph takes float32 [B].
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).to(torch.float32).expand(sample.shape[0]) if t.numel() == 1 else t.to(torch.float32)
        return self.component.run(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states)[0]


class OrtVaeEncoderSlot:
    def __init__(self, component: OrtComponent):
        self.component = component

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.component.run(image=image)[0]


class OrtVaeDecoderSlot:
    def __init__(self, component: OrtComponent):
        self.component = component

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.component.run(latent_sample=latents)[0]


class OrtSaliency(torch.nn.Module):
    """The exported U2NetP behind the interface predict_saliency uses: model(batch) → [B, 1, H, W] in [0, 1].

    `config` (SaliencyConfig: input side in px, threshold, dilation) is the net's own, read from the folder's
    saliency/config.json (`read_saliency_config`): the pipeline runs the graph at that size and threshold, as
    the torch path runs the net from its weights (`load_saliency`). Any engine part with `run(**inputs)`, a
    contract and a device serves (ONNX Runtime or TensorRT).
    `refusal`: set when the folder records no config (exported before sizes were recorded): the folder still
    loads, so masks given by the caller work, but running the net raises InputError with this one line.
    """

    def __init__(self, component, config=None, refusal: Optional[str] = None):
        super().__init__()
        from cg4ctr_fast.models.saliency import SaliencyConfig

        self.component = component
        self.config = config if config is not None else SaliencyConfig()
        self.refusal = refusal
        # predict_saliency reads device and dtype from the first parameter: an empty anchor carries them.
        dtype = _TORCH_DTYPES[component.contract.inputs[0].dtype]
        self.anchor = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=component.device), requires_grad=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.refusal:
            raise InputError(self.refusal)
        return self.component.run(image=image)[0]


def _load_scheduler(root: Path):
    from cg4ctr_fast.models.diffusion import make_scheduler

    config_file = root / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise InputError(f"{root}: no scheduler/scheduler_config.json: {mf.REEXPORT}")
    config = json.loads(config_file.read_text())
    class_name = config.pop("_class_name", "DDIMScheduler")
    return make_scheduler(class_name, {k: v for k, v in config.items() if not k.startswith("_")})


def _device_for(providers: Sequence[str]) -> torch.device:
    gpu = providers and providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    return torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")


def load_engine_folder(folder: str | Path, *, require: Sequence[str] = PIPELINE_COMPONENTS) -> dict[str, Any]:
    """The checked manifest of an ONNX folder: format, version, the required components, sizes and sha256."""
    return _checked_manifest(Path(folder), require, "(exported with --components?): export every pipeline "
                             "component with `cg4ctr-export onnx`")


def _checked_manifest(root: Path, require: Sequence[str], how: str, check: Optional[Sequence[str]] = None) -> dict:
    """The folder's manifest, refused with one line when a required component is missing or a file differs."""
    manifest = mf.read_manifest(root)
    missing = [c for c in require if c not in manifest["components"]]
    if missing:
        raise InputError(f"{root}: no {', '.join(missing)} in this folder {how}")
    mf.check_files(root, manifest, check, hash_limit=mf.LOAD_HASH_BYTES)
    return manifest


def onnxruntime_components(
    folder: str | Path, *, providers: Optional[Sequence[str]] = None, scheduler: Optional[str] = None,
    threads: Optional[int] = None,
) -> Components:
    """Components whose slots run the folder's ONNX models in ONNX Runtime (`threads`: intra-op threads per
    session; None keeps ONNX Runtime's default)."""
    root = Path(folder)
    manifest = load_engine_folder(root)
    chosen = available_providers(providers)
    device = _device_for(chosen)
    parts = {
        name: OrtComponent(root / manifest["components"][name]["file"], mf.contract_of(manifest, name), chosen, device,
                           threads=threads)
        for name in PIPELINE_COMPONENTS
    }
    return engine_components(root, parts, backend="onnxruntime", device=device, scheduler=scheduler)


def _text_positions(component: Any) -> Optional[int]:
    """The text encoder graph's fixed sequence length (input_ids [B, 77]), or None if it is dynamic."""
    shape = component.contract.inputs[0].shape
    return shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None


def engine_components(root: Path, parts: dict[str, Any], *, backend: str, device: torch.device,
                      scheduler: Optional[str] = None) -> Components:
    """Slots over an exported folder's components (ONNX Runtime or TensorRT: each part only needs
    `run(**inputs)` and its contract), with the folder's model info, tokenizer and scheduler."""
    from cg4ctr_fast.models.diffusion import swap_scheduler
    from cg4ctr_fast.models.tokenizer import load_clip_tokenizer

    info = mf.read_model_info(root)
    sched = _load_scheduler(root)
    if scheduler is not None:
        sched = swap_scheduler(sched, scheduler)
    if not (root / "tokenizer").is_dir():
        raise InputError(f"{root}: no tokenizer/ folder: {mf.REEXPORT}")
    return Components(
        text_encoder=OrtTextEncoderSlot(parts["text_encoder"]),
        unet=OrtUNetSlot(parts["unet"]),
        vae_encoder=OrtVaeEncoderSlot(parts["vae_encoder"]),
        vae_decoder=OrtVaeDecoderSlot(parts["vae_decoder"]),
        # The graph's fixed sequence length (77) plays the text encoder's max_position_embeddings, as in
        # the torch model-folder path: an unusable model_max_length falls back to it.
        tokenizer=load_clip_tokenizer(root / "tokenizer", max_positions=_text_positions(parts["text_encoder"])),
        scheduler=sched,
        info=info,
        backend=backend,
        device=device,
        dtype=_TORCH_DTYPES[parts["unet"].contract.inputs[0].dtype],
        modules=None,
    )


class NoSaliencyConfig(InputError):
    """The folder's saliency graph has no saliency/config.json: exported before the net's size was recorded."""


def saliency_config_or_refusal(root: Path, manifest: dict[str, Any]):
    """(SaliencyConfig, None), or (None, the one-line refusal) for a folder exported without the config."""
    try:
        return read_saliency_config(root, manifest), None
    except NoSaliencyConfig as exc:
        return None, str(exc)


def read_saliency_config(root: Path, manifest: dict[str, Any]):
    """The exported saliency net's SaliencyConfig (input side in px, threshold, dilation) from saliency/config.json.

    The file must be listed with the saliency component (so the manifest hashes it; callers check the files
    first) and its size must lie in the graph's profile. InputError (one line) otherwise; NoSaliencyConfig for a
    folder exported before the size was recorded, which ran every net at 320 px whatever it was trained at.
    """
    from cg4ctr_fast.models.saliency import SaliencyConfig

    path = root / mf.SALIENCY_CONFIG
    listed = {f["path"] for f in manifest["components"]["saliency"].get("files", [])}
    if mf.SALIENCY_CONFIG not in listed or not path.is_file():
        raise NoSaliencyConfig(f"{root}: the saliency component has no {mf.SALIENCY_CONFIG} (the net's input size and "
                         f"threshold): re-export with `cg4ctr-export onnx --saliency WEIGHTS`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        config = SaliencyConfig(**{k: raw[k] for k in ("size", "threshold", "dilate_px") if k in raw})
        if "size" not in raw:
            raise ValueError("no size")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:  # InputError is a ValueError
        raise InputError(f"{path}: unreadable saliency config ({' '.join(str(exc).split())[:200]}): {mf.REEXPORT}") from None
    height = mf.contract_of(manifest, "saliency").dim("height")
    if not height.min <= config.size <= height.max:
        raise InputError(f"{path}: size {config.size} is outside the graph's profile {height.min}..{height.max}: "
                         f"{mf.REEXPORT}")
    return config


def onnxruntime_saliency(folder: str | Path, *, providers: Optional[Sequence[str]] = None) -> Optional[OrtSaliency]:
    """The folder's exported saliency net with its own config (size, threshold), or None when it was exported
    without one. InputError (one line) for a changed file or a bad saliency/config.json; without one (an older
    export) the net refuses to run (see OrtSaliency.refusal) while the folder still serves given masks."""
    root = Path(folder)
    manifest = mf.read_manifest(root)
    if "saliency" not in manifest["components"]:
        return None
    mf.check_files(root, manifest, ["saliency"], hash_limit=mf.LOAD_HASH_BYTES)
    config, refusal = saliency_config_or_refusal(root, manifest)
    chosen = available_providers(providers)
    component = OrtComponent(
        root / manifest["components"]["saliency"]["file"], mf.contract_of(manifest, "saliency"), chosen, _device_for(chosen)
    )
    return OrtSaliency(component, config, refusal).eval()


class OrtRewardEngine:
    """The exported reward model with `RewardModel`'s serving semantics (cg4ctr_fast.models.reward).

    embed_images: images [B, 3, S, S] in [0, 1] → embeddings [B, D] float32 (reward_image).
    score: embeddings, title_ids / caption_ids [B or 1, ≤ L] int64, group_features [B or 1, G] → calibrated CTR
        [B] float32 (reward_head; the calibration is part of the graph). As in torch, inputs with batch 1 are
        broadcast; id rows shorter than the exported length are right-padded with <pad>, which the model's mean
        over token embeddings skips, so they score exactly as in torch.
    Batches over the exported profile's maximum run in several calls of at most that size.
    """

    def __init__(self, image: OrtComponent, head: OrtComponent, config, title_vocab, caption_vocab):
        self.image = image
        self.head = head
        self.config = config
        self.title_vocab = title_vocab
        self.caption_vocab = caption_vocab
        self.device = head.device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._run_batched(self.image, {"image": images}).float()

    def score(
        self, embeddings: torch.Tensor, title_ids: torch.Tensor, caption_ids: torch.Tensor, group_features: torch.Tensor
    ) -> torch.Tensor:
        batch = int(embeddings.shape[0])
        feeds = {
            "image_embedding": embeddings,
            "title_ids": self._ids(title_ids, "title_ids", batch),
            "caption_ids": self._ids(caption_ids, "caption_ids", batch),
            "group_features": _broadcast(torch.as_tensor(group_features), "group_features", batch),
        }
        return self._run_batched(self.head, feeds)

    def __call__(self, images, title_ids, caption_ids, group_features) -> torch.Tensor:
        return self.score(self.embed_images(images), title_ids, caption_ids, group_features)

    def encode_titles(self, titles: Sequence[str]) -> torch.Tensor:
        return self.title_vocab.encode(titles, self.config.max_title_tokens)

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        return self.caption_vocab.encode(captions, self.config.max_caption_tokens)

    def prepare_images(self, images) -> torch.Tensor:
        from cg4ctr_fast.models.reward import images_to_tensor

        return images_to_tensor(images, self.config.image_size)

    def score_images(self, images, titles: Sequence[str], captions: Sequence[str], group_features) -> np.ndarray:
        """One call from PIL images / paths: calibrated CTR as numpy [B] (RewardModel.score_images)."""
        groups = torch.as_tensor(np.asarray(group_features, dtype=np.float32)).reshape(-1, self.config.group_dim)
        ctr = self(self.prepare_images(images), self.encode_titles(list(titles)), self.encode_captions(list(captions)),
                   groups)
        return ctr.cpu().numpy()

    def pipeline_scorer(self, group_features, title: str = "",
                        captions: Optional[Sequence[str]] = None) -> Callable[[list, list], list]:
        """A `reward=` callable for `CreativePipeline` (RewardModel.pipeline_scorer): (images, groups) → CTRs."""
        table = np.asarray(group_features, dtype=np.float32).reshape(-1, self.config.group_dim)

        def reward(images: list, groups: list) -> list:
            caps = [captions[g] if captions is not None else "" for g in groups]
            return self.score_images(images, [title] * len(images), caps, table[list(groups)]).tolist()

        return reward

    # ------------------------------------------------------------------ helpers
    def _ids(self, ids: torch.Tensor, name: str, batch: int) -> torch.Tensor:
        ids = _broadcast(torch.as_tensor(ids), name, batch)
        length = self.head.contract.input(name).shape[1]
        if ids.dim() != 2 or ids.shape[1] > length:
            raise InputError(
                f"reward_head (onnxruntime): {name} has shape {list(ids.shape)}, expected [B, ≤ {length}] "
                f"(the config's token limit; encode with encode_titles / encode_captions)"
            )
        if ids.shape[1] < length:
            ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=0)  # 0 = <pad>
        return ids

    @staticmethod
    def _run_batched(component: OrtComponent, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = int(next(iter(feeds.values())).shape[0])
        if batch == 0:
            out = component.contract.outputs[0]  # its non-batch axes are fixed sizes
            return torch.zeros((0, *out.shape[1:]), dtype=_TORCH_DTYPES[out.dtype], device=component.device)
        step = component.contract.dim("batch").max
        parts = [
            component.run(**{k: v[i : i + step] for k, v in feeds.items()})[0] for i in range(0, batch, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def default_group_features(group_dim: int) -> np.ndarray:
    """The user-group row scored when none is given: float32 [group_dim].

    group_dim 1: [1.0], the one feature a log without user groups gives every row (cg4ctr_fast.training.data), so
    the model sees what it was trained on. group_dim > 1 (e.g. the synthetic world's one-hot attributes): zeros,
    "no attribute known"; the group tower then contributes its bias only. Scores stay comparable between the
    creatives of one call (what selection needs); pass the real groups' features for calibrated CTRs.
    """
    return np.ones(1, dtype=np.float32) if group_dim == 1 else np.zeros(group_dim, dtype=np.float32)


class PipelineReward:
    """A `reward=` callable for `CreativePipeline` (stage 10): (images, group indices) → calibrated CTRs.

    images: the creatives as PIL images (any size; resized to the reward model's square side as in torch);
    groups: the pipeline group (prompt index) of each. Returns a list of floats in (0, 1), one per image.

    The reward model scores (image, product title, caption, user group); the pipeline knows only the images and
    the group index, so the rest is set here (or later: `pipe.reward.title = ...`, `.captions`, `.group_features`):
    - title: the product's title; default "" (a product without a title): a title row of <pad> only, which the
      title tower averages to zeros exactly as RewardModel does for an empty title;
    - captions: one per group (e.g. the prompts, as the demo does), or None: no caption, encoded like "";
    - group_features: [n_groups, group_dim], row g for group g; None: `default_group_features` for every group.
    Scores equal `RewardModel.pipeline_scorer(table, title, captions)` on the same creatives within the reward
    contracts' tolerances. A group index beyond the table is an InputError.
    """

    def __init__(self, engine, *, title: str = "", captions: Optional[Sequence[str]] = None, group_features=None):
        self.engine = engine
        self.title = title
        self.captions = captions
        self.group_features = group_features

    def table(self, n_groups: int) -> np.ndarray:
        """The group-feature table [n_groups, group_dim] float32 this reward scores with."""
        dim = self.engine.config.group_dim
        if self.group_features is None:
            return np.tile(default_group_features(dim), (n_groups, 1))
        table = np.asarray(self.group_features, dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != dim:
            raise InputError(f"reward group_features has shape {list(table.shape)}, expected [n_groups, {dim}]")
        return table

    def __call__(self, images: list, groups: list) -> list:
        groups = [int(g) for g in groups]
        table = self.table(max(groups, default=-1) + 1)
        if groups and max(groups) >= len(table):
            raise InputError(f"reward: group {max(groups)} has no row in group_features ({len(table)} rows)")
        if self.captions is not None and groups and max(groups) >= len(self.captions):
            raise InputError(f"reward: group {max(groups)} has no caption ({len(self.captions)} given)")
        captions = [self.captions[g] if self.captions is not None else "" for g in groups]
        return self.engine.score_images(images, [self.title] * len(images), captions, table[groups]).tolist()


def _broadcast(tensor: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """RewardModel's rule: an input with batch 1 serves the whole batch."""
    if tensor.dim() >= 1 and tensor.shape[0] == batch:
        return tensor
    if tensor.dim() >= 1 and tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise InputError(f"reward_head (onnxruntime): {name} has batch {list(tensor.shape)[:1]}, expected {batch} or 1")


def _read_reward_files(root: Path):
    """(RewardConfig, title Vocabulary, caption Vocabulary) from the folder's reward/ copy (hash-checked)."""
    from cg4ctr_fast.models.reward import CONFIG_FILE, FORMAT, VOCAB_FILE, RewardConfig, Vocabulary

    folder = root / mf.REWARD_DIR
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{CONFIG_FILE} is not a {FORMAT} config")
        config = RewardConfig(**raw)
        return config, Vocabulary(vocab["title"]), Vocabulary(vocab["caption"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"{folder}: unreadable reward model files ({' '.join(str(exc).split())[:200]}): {mf.REEXPORT}") from None


def onnxruntime_reward(folder: str | Path, *, providers: Optional[Sequence[str]] = None) -> Optional[PipelineReward]:
    """The folder's reward model as the pipeline's reward callable, or None when it was exported without one."""
    manifest = mf.read_manifest(Path(folder))
    if not all(name in manifest["components"] for name in REWARD_COMPONENTS):
        return None
    return PipelineReward(load_reward_engine(folder, providers=providers))


def load_reward_engine(folder: str | Path, *, providers: Optional[Sequence[str]] = None) -> OrtRewardEngine:
    """The folder's exported reward model in ONNX Runtime (needs an export with `--reward DIR`)."""
    root = Path(folder)
    manifest = _checked_manifest(root, REWARD_COMPONENTS, "(export it with `cg4ctr-export onnx --reward DIR`)",
                                 check=REWARD_COMPONENTS)
    config, title_vocab, caption_vocab = _read_reward_files(root)
    chosen = available_providers(providers)
    device = _device_for(chosen)
    image, head = (
        OrtComponent(root / manifest["components"][name]["file"], mf.contract_of(manifest, name), chosen, device)
        for name in REWARD_COMPONENTS
    )
    return OrtRewardEngine(image, head, config, title_vocab, caption_vocab)
