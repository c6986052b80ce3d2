"""Typed configs: dataclasses with a one-line doc per field, built from YAML plus dotted overrides.

Every key is checked against the dataclass: an unknown or misspelled key, or a value of the wrong type, fails
with the dotted key named, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

from .errors import ConfigError

WORD = re.compile(r"[\w-]+")  # a prompt word that can also name a file (lora.pivotal_word)
T = TypeVar("T")


def option(default: Any, doc: str) -> Any:
    """A dataclass field with its one-line documentation attached (shown by `finetune show-config`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        section: Any = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(section), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = " (it looks like an override: the config file comes first)" if "=" in str(path) else ""
        raise ConfigError(f"{path}: config file not found{hint}; pass the path of a YAML file (see recipes/configs/)")
    try:
        text = path.read_text(encoding="utf-8")
        repeated = repeated_key(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first_line}); fix the file and run again") from None
    if repeated:
        key, first, again = repeated
        raise ConfigError(f"{path}: line {again}: {key} is given twice (first on line {first}); YAML would keep "
                          "only the second, so delete or merge one of them")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    return data


def repeated_key(node, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, first line, second line) of the first key given twice in one mapping of a composed YAML
    document, or None. PyYAML's loaders keep the last of two equal keys without a word, so a second `train:`
    section would silently replace the first."""
    if isinstance(node, yaml.SequenceNode):
        return next(filter(None, (repeated_key(item, f"{prefix}[{i}].") for i, item in enumerate(node.value))),
                    None)
    if not isinstance(node, yaml.MappingNode):
        return None
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            return prefix + key_node.value, seen[key_node.value], line
        seen[key_node.value] = line
        found = repeated_key(value_node, f"{prefix}{key_node.value}.")
        if found:
            return found
    return None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars (`true`, `1e-4`, `[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. train.max_steps=800")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and every value's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        close = [prefix + name for name in fields if _similar(name, unknown[0])]
        hint = f"; did you mean {close[0]}?" if close else f"; known keys here: {', '.join(sorted(fields))}"
        raise ConfigError(f"unknown config key {key}{hint}")
    values = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**values)


def recipe_name(path: str | Path | None, default: str) -> str:
    """The recipe a YAML file's top-level `recipe:` key names (`default` without one, or without a file)."""
    name = read_yaml(path).get("recipe", default) if path else default
    if not isinstance(name, str):
        raise ConfigError(f"{path}: recipe: must be a recipe's name, e.g. dreambooth_lora")
    return name


def setting_as_written(path: str | Path | None, overrides: Sequence[str], section: str, key: str) -> Any:
    """One key's value as the YAML file, the overrides and train.mode's presets give it (None where unset), for
    what has to happen before the typed config exists: building it imports the recipe's module, and that import
    starts CUDA (finetune.allocator). The presets are MODES' (no recipe's own `modes` changes the keys asked for
    here). Bad input raises the same ConfigError that `load` would."""
    values = with_mode(apply_overrides(read_yaml(path) if path else {}, list(overrides))).get(section)
    return values.get(key) if isinstance(values, dict) else None


def load(cls: type, path: str | Path | None, overrides: Sequence[str] = ()) -> Any:
    """Read a YAML file (or nothing), apply dotted overrides, and build the typed config.

    A top-level `recipe:` key names the recipe for the CLI and is not part of the recipe's config.
    """
    data = read_yaml(path) if path else {}
    data.pop("recipe", None)
    return build(cls, with_mode(apply_overrides(data, list(overrides)), getattr(cls, "modes", MODES)))


# What train.mode sets; any of these keys set in the YAML or on the command line wins over the mode. Figures behind
# each choice are in BENCHMARKS.md.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "custom": {},
    # Small batches are bound by kernel launches, not arithmetic: graphs remove the launches, bf16 without autocast
    # removes the per-op casts, fused AdamW steps every LoRA tensor in one kernel.
    "fast": {"train": {"mixed_precision": "bf16", "autocast": False, "cuda_graphs": True, "optimizer": "adamw"}},
    # Activations recomputed instead of stored, the frozen U-Net's linear layers and convolutions in 4 bits (2387
    # MiB against nf4's 2891 on SD 1.5, 4023 against 4363 on SDXL, for 11% and 5% of the speed), 8-bit optimizer
    # state. Class images one at a time: a batch's activations would set the run's peak. A recipe may change a
    # preset where its family measured better otherwise (modes_with).
    "low_memory": {"model": {"quantize_unet": "nf4_all"},
                   "prior": {"generation_batch_size": 1, "generation_offload": True},
                   "train": {"mixed_precision": "bf16", "autocast": False, "cuda_graphs": True, "vae_tiling": True,
                             "expandable_segments": True,
                             "gradient_checkpointing": True, "optimizer": "adamw8bit"}},
}


def modes_with(changes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """MODES with some presets changed, for a recipe whose model family measured best with other settings."""
    return {mode: {section: {**presets.get(section, {}), **changes.get(mode, {}).get(section, {})}
                   for section in {*presets, *changes.get(mode, {})}}
            for mode, presets in MODES.items()}


def with_mode(data: dict, modes: dict[str, dict[str, dict[str, Any]]] = MODES) -> dict:
    """The config dict with train.mode's presets (a recipe Config's `modes`) filled in under the keys given
    explicitly."""
    train = data.get("train")
    mode = train.get("mode", "custom") if isinstance(train, dict) else "custom"
    presets = modes.get(mode, {})
    if mode not in modes:
        raise ConfigError(f"train.mode: {mode!r} is not one of {', '.join(modes)}")
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for section, preset in presets.items():
        if isinstance(merged.get(section, {}), dict):
            merged[section] = {**preset, **merged.get(section, {})}
    return merged


def resolved(value: T | None, key: str) -> T:
    """A value finetune.defaults fills in when a run starts (train.max_steps, train.learning_rate), once it has."""
    if value is None:
        raise ConfigError(f"{key} is unset; a training run derives it from the photos when it starts "
                          "(finetune.defaults.with_defaults), or set it")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def field_docs(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: the reference table in README and `show-config`.

    Defaults are read from a default instance, so a section a recipe sets differently (SDXL's
    TrainConfig(resolution=1024)) shows the recipe's value, not the section class's."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_docs(hints[f.name], prefix + f.name + ".", value)
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("doc", "")))
    return rows


def _similar(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a in b or b in a:
        return True
    common = sum(min(a.count(c), b.count(c)) for c in set(a))
    return common >= 0.75 * max(len(a), len(b))


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key) if len(inner) == 1 else value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` as false
            spelled = [w for w in (("yes", "true", "on") if value else ("no", "false", "off")) if w in args]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):  # YAML's .inf and .nan: a NaN learning rate trains a LoRA of NaNs
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# Choice keys, checked when the config is built (before any model loads). The samplers are inference.SCHEDULERS'
# names plus `default` and the schedules diffusers' get_scheduler takes; tests/test_config.py holds them equal.
Sampler = Literal["dpm++", "ddim", "euler", "euler_a", "pndm", "default"]
LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LRSchedule)

# Sections shared by the recipes. A recipe's Config composes the ones it needs.

@dataclasses.dataclass
class ModelConfig:
    pretrained: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "Hub id, local diffusers folder, or single-file .safetensors checkpoint")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the base model")
    variant: str | None = option(None, "weight variant to load from the Hub, e.g. fp16")
    single_file_config: str | None = option(None, "for a single-file checkpoint: Hub id or folder holding its "
                                                  "diffusers configs (default: inferred by diffusers)")
    allow_pickle: bool = option(False, "also load pickle weights (.ckpt/.bin/.pt), which can run code: only for "
                                       "files you trust")
    quantize_unet: Literal["none", "nf4", "nf4_all"] = option(
        "none", "store the frozen U-Net's linear layers (nf4), or its convolutions too (nf4_all), in 4-bit NF4 "
                "(bitsandbytes, CUDA; diffusers folder or Hub id): far less GPU memory, slower steps")


@dataclasses.dataclass
class DataConfig:
    instance_dir: str = option("", "folder of subject photos (jpg, png, webp, bmp, tiff: any format Pillow reads); "
                                   "a .txt beside a photo is its caption")
    instance_prompt: str = option("a photo of sks dog", "prompt with the trigger phrase, used for uncaptioned photos")
    class_dir: str | None = option(None, "folder of class images for prior preservation (generated if short)")
    class_prompt: str = option("a photo of dog", "prompt describing the class, without the trigger phrase")
    caption_extension: str = option(".txt", "caption file ending looked for first; .txt and .caption are also read")
    center_crop: bool = option(True, "center crop (true) or random crop (false) after resizing the short side")
    random_flip: bool = option(False, "flip photos horizontally at random")
    repeats: int = option(1, "how many times each instance photo appears per epoch")
    on_bad_image: Literal["error", "skip"] = option("error", "an unreadable photo or one with an extreme aspect "
                                                             "ratio: stop with an error, or skip it with a warning")
    trigger: str | None = option(None, "trigger phrase, e.g. 'sks dog': replaces {trigger} in captions, or is "
                                       "prepended to captions that lack it")
    caption_dropout: float = option(0.0, "probability that a photo's prompt is replaced by the empty prompt")
    shuffle_tags: bool = option(False, "shuffle a caption's comma-separated tags each step (text embeddings are "
                                       "then encoded per step, not cached)")
    keep_tags: int = option(1, "with shuffle_tags: how many leading tags stay in place (1 keeps the trigger first)")
    buckets: bool = option(False, "aspect-ratio buckets: train each photo at about resolution^2 pixels in its "
                                  "own shape (multiples of 64), batches from one bucket")
    allow_upscale: bool = option(False, "with buckets: let a photo smaller than its bucket be enlarged to it")
    dataset: str | None = option(None, "instead of instance_dir: a datasets folder (save_to_disk), an image "
                                       "folder with metadata.jsonl, or a Hub dataset name")
    dataset_split: str = option("train", "the split of data.dataset to train on")
    image_column: str = option("image", "data.dataset column holding the images")
    caption_column: str | None = option(None, "data.dataset column holding captions (unset: the instance prompt)")
    masks: str | None = option(None, "folder of loss masks, one per photo with the photo's file stem (white = "
                                     "subject, black = background), or `alpha` for each photo's alpha channel")
    mask_weight: float = option(0.0, "with masks: the loss weight of the background (black); the subject (white) "
                                     "has 1, grey in between; class images are unmasked")

    def __post_init__(self):
        check(self.repeats >= 1, "data.repeats", "must be at least 1")
        check(0 <= self.caption_dropout <= 1, "data.caption_dropout", "must be in [0, 1]")
        check(self.keep_tags >= 0, "data.keep_tags", "must be 0 or more")
        check(0 <= self.mask_weight <= 1, "data.mask_weight", "must be in [0, 1]")
        check(not (self.masks and self.dataset), "data.masks", "masks are matched to photos by file name, which "
                                                               "data.dataset rows do not have; use data.instance_dir "
                                                               "with data.masks")
        check(len(self.caption_extension) > 1 and self.caption_extension.startswith(".") and
              "/" not in self.caption_extension, "data.caption_extension", "must be a file ending such as .txt")


@dataclasses.dataclass
class PriorConfig:
    num_class_images: int = option(100, "class images to train with; missing ones are generated (0 turns prior "
                                        "preservation off)")
    loss_weight: float = option(1.0, "weight of the class-image loss against the instance loss")
    generation_batch_size: int = option(8, "class images generated per batch (low_memory mode: 1)")
    generation_steps: int = option(20, "sampler steps per generated class image")
    generation_offload: bool = option(False, "draw class images with each model on the GPU only while it runs "
                                             "(diffusers' model CPU offload; low_memory mode: on)")
    generation_scheduler: Sampler = option("dpm++", "sampler for class images: dpm++, ddim, euler, "
                                                              "euler_a, pndm or default")
    guidance_scale: float = option(7.5, "classifier-free guidance scale for class images")

    def __post_init__(self):
        check(self.num_class_images >= 0, "prior.num_class_images", "must be 0 (off) or more")
        check(self.generation_batch_size >= 1, "prior.generation_batch_size", "must be at least 1")
        check(self.generation_steps >= 1, "prior.generation_steps", "must be at least 1")
        check(self.loss_weight >= 0, "prior.loss_weight", "must be 0 or more")
        check(self.guidance_scale >= 0, "prior.guidance_scale", "must be 0 or more")


@dataclasses.dataclass
class LoraConfig:
    type: Literal["lora", "dora", "loha", "lokr"] = option(
        "lora", "adapter: lora, dora (LoRA with a learned magnitude per output row), loha (Hadamard product of two "
                "low-rank pairs) or lokr (Kronecker product), all through peft; see README, Adapter types")
    rank: int = option(4, "LoRA rank (dimension of the low-rank update; LoHa: of each pair; LoKr: of the "
                          "Kronecker product's second factor)")
    alpha: float = option(4.0, "LoRA alpha; the update is scaled by alpha / rank (kept in the exported file)")
    dropout: float = option(0.0, "dropout on the LoRA branch during training (LoHa/LoKr: peft's rank_dropout)")
    unet_targets: Literal["cross_attention", "all_attention"] = option(
        "cross_attention", "U-Net layers that get LoRA: cross_attention (attn2 q/k/v/out) or all_attention")
    text_encoder: bool = option(False, "also train LoRA on the text encoder's q/k/v/out projections")
    init_from: str | None = option(None, "start from an existing LoRA (diffusers or kohya file, or a run folder); "
                                         "its type, rank, alpha and layers must match the settings above")
    pivotal: bool = option(False, "pivotal tuning: the trigger word becomes new tokens (<s0><s1>...) whose "
                                  "embeddings train beside the LoRA, in every text encoder")
    pivotal_word: str | None = option(None, "with pivotal: the word of the prompts the new tokens replace (default: "
                                            "the first word of data.trigger, e.g. sks)")
    pivotal_tokens: int = option(2, "with pivotal: how many new tokens stand for the word")
    pivotal_init: Literal["class", "random"] = option(
        "class", "with pivotal: start the new embeddings at the class word's (class) or at random with the "
                 "vocabulary's spread (random)")
    pivotal_class_word: str | None = option(None, "with pivotal_init=class: the word whose embedding the tokens "
                                                  "start from (default: the last word of data.class_prompt)")
    pivotal_learning_rate: float = option(5e-4, "with pivotal: peak learning rate of the new embeddings (their own "
                                                "optimizer group, same schedule as the LoRA's)")
    pivotal_stop_step: int | None = option(None, "with pivotal: the optimizer step after which the embeddings stay "
                                                 "fixed (default: half of train.max_steps; past it: never)")

    def __post_init__(self):
        check(self.rank >= 1, "lora.rank", "must be at least 1")
        check(self.pivotal_tokens >= 1, "lora.pivotal_tokens", "must be at least 1")
        check(self.pivotal_learning_rate > 0, "lora.pivotal_learning_rate", "must be positive")
        check(self.pivotal_stop_step is None or self.pivotal_stop_step >= 0, "lora.pivotal_stop_step",
              "must be 0 or more")
        check(self.pivotal_word is None or bool(WORD.fullmatch(self.pivotal_word)), "lora.pivotal_word",
              "must be one word (letters, digits, _ or -), e.g. sks")
        check(self.alpha > 0, "lora.alpha", "must be positive")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")


@dataclasses.dataclass
class ExportConfig:
    kohya: bool = option(False, "also write <output_dir name>.safetensors in kohya format (A1111, Forge, ComfyUI)")
    kohya_precision: Literal["fp16", "bf16", "fp32"] = option("fp16", "precision of the kohya file's weights")
    bundle_embeddings: bool = option(True, "with lora.pivotal: bundle the token embeddings into the kohya file "
                                           "(A1111 and ComfyUI read them; diffusers' load_lora_weights refuses "
                                           "such a file)")
    model_card: bool = option(True, "write README.md (a Hub model card) beside the exported weights")
    license: str | None = option(None, "license field of the model card (unset: the base model's, from its model "
                                       "card or metadata; not found, the card states none and the run says so)")
    push_to_hub: str | None = option(None, "Hub repo id (org/name) to upload the exported files to at the end")


@dataclasses.dataclass
class TrainConfig:
    max_steps: int | None = option(None, "optimizer steps to train (unset: 100 per photo at batch 1, from the "
                                         "photo count; README, Defaults that fit the photos)")
    learning_rate: float | None = option(None, "peak learning rate (unset: 1e-4 for lora/dora, 2e-4 for loha/lokr; "
                                               "README, Defaults that fit the photos)")
    scale_lr: Literal["none", "linear", "sqrt"] = option(
        "none", "scale learning_rate by samples per step (batch_size x processes x gradient_accumulation): "
                "none, linear or sqrt")
    batch_size: int = option(1, "instance images per step per GPU (as many class images are added)")
    gradient_accumulation: int = option(1, "micro-batches accumulated per optimizer step")
    resolution: int = option(512, "training resolution in pixels (square)")
    seed: int = option(0, "seed for data order, noise, timesteps and LoRA initialisation")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("fp16", "precision of the frozen weights and "
                                                                     "activations (LoRA stays fp32); no on CPU")
    optimizer: Literal["adamw8bit", "adamw"] = option("adamw8bit", "adamw8bit (bitsandbytes, CUDA) or adamw")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)")
    lr_scheduler: LRSchedule = option("constant", "constant, linear, cosine, cosine_with_restarts, "
                                                             "polynomial, constant_with_warmup")
    lr_warmup_steps: int = option(0, "steps of linear warmup at the start")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    cache_latents: bool = option(True, "encode each photo once with the VAE (off when center_crop is false)")
    cache_text_embeddings: bool = option(True, "encode each prompt once when the text encoder is frozen")
    expandable_segments: bool = option(False, "CUDA memory in growable segments (PYTORCH_CUDA_ALLOC_CONF="
                                              "expandable_segments, set before CUDA starts): less fragmentation, a "
                                              "lower peak on small cards")
    vae_tiling: bool = option(False, "encode photos larger than 512 px in overlapping 512 px tiles: a quarter of the "
                                     "VAE's working memory at 1024 px; latents differ slightly from untiled")
    checkpoint_every: int = option(500, "save a resumable checkpoint and an export every N steps (0: only at end)")
    keep_checkpoints: int = option(3, "keep the newest K checkpoints")
    resume: str | None = option(None, "resume from `latest` (the newest intact checkpoint) or a checkpoint folder")
    log_every: int = option(10, "steps between loss/LR updates of the progress bar and TensorBoard")
    max_bad_steps: int = option(10, "stop after this many steps in a row with a NaN/Inf loss or gradient "
                                    "(each is skipped)")
    overwrite: bool = option(False, "start afresh in an output_dir holding a finished run or checkpoints "
                                    "(deletes its checkpoints once every input is checked; the export is replaced "
                                    "at the end)")
    mode: Literal["custom", "fast", "low_memory"] = option(
        "custom", "preset of the speed/memory switches (see README, Speed and memory); keys you set win over it")
    autocast: bool = option(True, "run the U-Net under autocast; false runs it in the frozen weights' precision "
                                  "with fp32 LoRA (fewer casts, faster)")
    cuda_graphs: bool = option(False, "replay the U-Net's forward and backward as CUDA graphs (needs autocast "
                                      "false; one GPU, one batch shape)")
    channels_last: bool = option(False, "train the U-Net in channels-last memory format (cuDNN's native layout "
                                        "for its convolutions): faster on SD 1.5, whose fast mode sets it; "
                                        "slower on SDXL")
    ema_decay: float = option(0.0, "keep an EMA of the LoRA weights with this decay, e.g. 0.99 (0: off); the EMA "
                                   "is drawn and exported, the trained weights are saved beside it")
    ema_device: Literal["accelerator", "cpu"] = option(
        "accelerator", "where the EMA is kept between steps: accelerator (the training device) or cpu (saves its "
                       "memory there; the same numbers)")

    def __post_init__(self):
        for key in ("batch_size", "gradient_accumulation", "resolution", "log_every", "max_bad_steps"):
            check(getattr(self, key) >= 1, f"train.{key}", "must be at least 1")
        check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be at least 1")
        for key in ("lr_warmup_steps", "checkpoint_every", "seed"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be 0 or more")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
        check(self.learning_rate is None or self.learning_rate > 0, "train.learning_rate", "must be positive")
        check(self.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (no clipping) or positive")
        check(self.resolution % 8 == 0, "train.resolution", "must be a multiple of 8")
        check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 turns the EMA off)")
        check(not (self.cuda_graphs and self.autocast), "train.cuda_graphs",
              "needs train.autocast=false (autocast's weight cache cannot be replayed by a graph)")


@dataclasses.dataclass
class LossConfig:
    snr_gamma: float = option(0.0, "min-SNR-gamma loss weighting, e.g. 5.0 (0 turns it off)")
    noise_offset: float = option(0.0, "noise offset, e.g. 0.05: lets the model learn darker and brighter images "
                                      "(0 turns it off)")

    def __post_init__(self):
        check(self.snr_gamma >= 0, "loss.snr_gamma", "must be 0 (off) or positive")
        check(self.noise_offset >= 0, "loss.noise_offset", "must be 0 (off) or positive")


@dataclasses.dataclass
class ValidationConfig:
    prompts: list[str] = option([], "prompts to draw while training (none: no validation images)")
    every: int = option(0, "draw the validation prompts every N steps (0: only the before/after grid at the end)")
    num_images: int = option(2, "images per prompt; image k uses seed + k, the same at every validation")
    seed: int = option(0, "seed of the first image of each prompt")
    steps: int = option(25, "sampler steps per validation image")
    guidance: float = option(7.5, "classifier-free guidance scale for validation images")
    scheduler: Sampler = option("dpm++", "sampler for validation images: dpm++, ddim, euler, euler_a, "
                                                   "pndm or default")
    before_after: bool = option(True, "at the end, a grid of base-model vs LoRA images with the same seeds")
    metrics: bool = option(False, "also score each validation grid (DINO, CLIP-I, CLIP-T, prior drift; models from "
                                  "eval.*) and log the numbers to TensorBoard")

    def __post_init__(self):
        check(self.every >= 0, "validation.every", "must be 0 or more")
        check(self.num_images >= 1, "validation.num_images", "must be at least 1")
        check(self.steps >= 1, "validation.steps", "must be at least 1")
        check(self.seed >= 0, "validation.seed", "must be 0 or more")
        check(self.guidance >= 0, "validation.guidance", "must be 0 or more")
        check(not self.metrics or bool(self.prompts), "validation.metrics", "needs validation.prompts (the images it "
                                                                           "scores)")


@dataclasses.dataclass
class EvalConfig:
    """`finetune eval` and validation.metrics: the DreamBooth paper's subject and prompt fidelity metrics."""
    dino_model: str = option("facebook/dino-vits16", "DINO model for subject fidelity (the paper's ViT-S/16): Hub id "
                                                     "or local folder, loaded with transformers")
    clip_model: str = option("openai/clip-vit-base-patch32", "CLIP model for CLIP-I and CLIP-T (ViT-B/32, as "
                                                             "CustomConcept101, DreamBench++ use): Hub id or folder")
    subject_type: Literal["object", "live"] = option("object", "the paper's prompt set: object (25 prompts) or live "
                                                               "(25 for pets and people: outfits, hats)")
    prompts: list[str] = option([], "your own prompts instead of the paper's, with {subject} where the subject goes")
    prompts_file: str | None = option(None, "a text file of your own prompts, one per line with {subject} (# starts a "
                                            "comment)")
    subject: str | None = option(None, "the phrase naming the subject, identifier and class, e.g. 'sks dog' "
                                       "(default: the LoRA's trigger, a leading 'a photo of' dropped)")
    class_noun: str | None = option(None, "the subject's class without the identifier, e.g. 'dog' (default: the "
                                          "subject phrase without its first word)")
    class_prompt: str = option("a photo of a {class}", "prompt of the prior-drift images; {class} is the class noun")
    num_class_images: int = option(8, "prior-drift images per checkpoint, compared seed for seed with the base model's")
    num_images: int = option(4, "images per prompt (the paper's 4); image k uses seed + k at every checkpoint")
    seed: int = option(0, "seed of the first image of each prompt")
    steps: int = option(25, "sampler steps per image")
    guidance: float = option(7.5, "classifier-free guidance scale")
    scheduler: str = option("dpm++", "sampler: dpm++, ddim, euler, euler_a, pndm or default")
    resolution: int | None = option(None, "image size in pixels (default: the LoRA's training resolution)")
    batch_size: int = option(8, "images generated per batch")
    max_clip_t_drop: float = option(0.02, "best checkpoint: the highest DINO among those whose CLIP-T is at most this "
                                          "far below the base model's")

    def __post_init__(self):
        for key in ("num_images", "num_class_images", "steps", "batch_size"):
            check(getattr(self, key) >= 1, f"eval.{key}", "must be at least 1")
        check(self.max_clip_t_drop >= 0, "eval.max_clip_t_drop", "must be 0 or more")
        check(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0), "eval.resolution",
              "must be a multiple of 8")
        check(not (self.prompts and self.prompts_file), "eval.prompts",
              "set eval.prompts or eval.prompts_file, not both")


@dataclasses.dataclass
class DreamBoothConfig:
    """A DreamBooth-LoRA recipe's config: every section; a recipe's Config subclasses it with its own defaults."""
    modes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = MODES  # what train.mode sets for this recipe
    model: ModelConfig = option(ModelConfig(), "the base model")
    data: DataConfig = option(DataConfig(), "subject photos and prompts")
    prior: PriorConfig = option(PriorConfig(), "prior preservation with class images")
    lora: LoraConfig = option(LoraConfig(), "where LoRA goes and its size")
    train: TrainConfig = option(TrainConfig(), "the optimisation")
    loss: LossConfig = option(LossConfig(), "loss weighting and noise options")
    validation: ValidationConfig = option(ValidationConfig(), "images drawn while training")
    eval: EvalConfig = option(EvalConfig(), "finetune eval and validation.metrics: subject and prompt fidelity")
    export: ExportConfig = option(ExportConfig(), "extra export formats, model card and Hub upload")
    output_dir: str = option("runs/dreambooth-lora", "checkpoints, TensorBoard logs and the exported LoRA go here")

    def __post_init__(self):
        check(bool(self.output_dir.strip()), "output_dir", "must name a folder for the run, e.g. runs/my-dog")
        if self.lora.pivotal:
            check(bool(self.pivotal_word()), "lora.pivotal_word",
                  "lora.pivotal needs the word the new tokens stand for: set lora.pivotal_word (e.g. sks) or "
                  "data.trigger")
            check(bool(WORD.fullmatch(self.pivotal_word())), "lora.pivotal_word",
                  f"data.trigger's first word {self.pivotal_word()!r} is not one word (letters, digits, _ or -); "
                  "set lora.pivotal_word, e.g. sks")

    def caches_prompt_embeddings(self) -> bool:
        """Whether every prompt is encoded once, before training, so the text encoders leave the GPU: not when they
        train (lora.text_encoder), nor when their token rows do (lora.pivotal), nor with tag shuffling (too many
        variants to list)."""
        return (self.train.cache_text_embeddings and not self.lora.text_encoder and not self.lora.pivotal
                and not self.data.shuffle_tags)

    def pivotal_word(self) -> str:
        """lora.pivotal's word: lora.pivotal_word, else data.trigger's first word ('' without either)."""
        words = (self.data.trigger or "").split()
        return self.lora.pivotal_word or (words[0] if words else "")

