"""Which family a model is: SD 1.x, SD 2.x (epsilon or v-prediction), SDXL base, or one finetune does not support.

One decision, `decide`, from the model's own configs and never from its name: how many text encoders it has and
how wide they are (SD 1.x: OpenAI CLIP ViT-L, 768; SD 2.x: OpenCLIP ViT-H, 1024; SDXL: both CLIP-L and OpenCLIP
bigG, 768 + 1280), the U-Net's cross-attention width and addition embedding (SDXL's size/crop conditioning is
`text_time`), its input channels (9: an inpainting U-Net) and the scheduler's prediction type. The readers only
gather those facts: from a diffusers folder, a Hub id (the same small JSON files, downloaded), a single
.safetensors checkpoint (tensor names and shapes, read from its header), a loaded pipeline, or a LoRA file.
Every command asks here: train (each recipe refuses the other's models), generate, export, fuse, plan, metadata.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .console import brief
from .errors import FinetuneError
from .models import describe_source

CLIP_L, OPENCLIP_H = 768, 1024  # the text-encoder widths of SD 1.x and SD 2.x
LABELS = {"sd1": "an SD 1.x model", "sd2": "an SD 2.x model", "sdxl": "an SDXL base model"}
RECIPES = {"sd1": "dreambooth_lora", "sd2": "dreambooth_lora", "sdxl": "sdxl_dreambooth_lora"}
CONFIG_FILES = {"sd1": "recipes/configs/sd15_dreambooth_lora.yaml", "sd2": "recipes/configs/sd21_dreambooth_lora.yaml",
                "sdxl": "recipes/configs/sdxl_dreambooth_lora.yaml"}
PIPELINES = {
    "sd": {"text2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
           "inpaint": StableDiffusionInpaintPipeline},
    "sdxl": {"text2img": StableDiffusionXLPipeline, "img2img": StableDiffusionXLImg2ImgPipeline,
             "inpaint": StableDiffusionXLInpaintPipeline},
}
SUPPORTED = "finetune supports SD 1.x, SD 2.x and SDXL base models"
FAMILY_NAMES = ("sd1", "sd2", "sd2-v", "sdxl")


@dataclasses.dataclass(frozen=True)
class Family:
    base: str                         # "sd1", "sd2" or "sdxl"
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" or "v_prediction"
    inpainting: bool = False          # a U-Net that also takes the mask and masked image (9 input channels)

    @property
    def name(self) -> str:
        """sd1, sd2, sd2-v or sdxl: the name LoRA headers and model cards carry."""
        return "sd2-v" if self.base == "sd2" and self.prediction_type == "v_prediction" else self.base

    @property
    def is_sdxl(self) -> bool:
        return self.base == "sdxl"

    @property
    def label(self) -> str:
        kind = LABELS[self.base] + (" (v-prediction)" if self.prediction_type == "v_prediction" else "")
        return kind.replace(" model", " inpainting model") if self.inpainting else kind

    @property
    def recipe(self) -> str:
        return RECIPES[self.base]

    @property
    def default_resolution(self) -> int:
        """The size the family's released models were trained at (SD 2.x: 768 for v, 512 for epsilon)."""
        return {"sd1": 512, "sd2": 768 if self.prediction_type == "v_prediction" else 512, "sdxl": 1024}[self.base]

    def pipeline_class(self, mode: str = "text2img"):
        """diffusers' pipeline for `mode`: text2img, img2img or inpaint."""
        return PIPELINES["sdxl" if self.is_sdxl else "sd"][mode]

    @classmethod
    def from_name(cls, name: str) -> Family:
        """The inverse of `name` (as written in a LoRA header by this module)."""
        if name == "sd2-v":
            return cls("sd2", "v_prediction")
        if name not in LABELS:
            raise ValueError(f"unknown model family {name!r}")
        return cls(name)


@dataclasses.dataclass
class ModelFacts:
    """What `decide` reads; every reader fills what its source shows (None: not known)."""
    source: str                                   # the model as the user named it, for messages
    pipeline: str | None = None                   # model_index.json's _class_name
    has_unet: bool = True
    in_channels: int | None = None
    cross_attention_dim: int | None = None
    addition_embed_type: str | None = None
    text_encoders: dict[str, tuple[int, bool]] = dataclasses.field(default_factory=dict)  # slot -> (width, OpenCLIP?)
    prediction_type: str = "epsilon"
    unet_config: dict | None = None               # the whole U-Net config where the source has one


def decide(facts: ModelFacts, key: str = "model.pretrained") -> Family:
    """The one family decision; a model of any other kind is a one-line error naming what it is."""
    where = f"{key}: {facts.source}"
    if not facts.has_unet:
        kind = facts.pipeline or "a model without a U-Net"
        raise FinetuneError(f"{where} is {kind} (SD3, Flux and other transformer models are not supported); "
                            f"{SUPPORTED}")
    if facts.in_channels not in (None, 4, 9):
        raise FinetuneError(f"{where} has a U-Net with {facts.in_channels} input channels (depth, upscaler and other "
                            f"image-conditioned models are not supported); {SUPPORTED}")
    first, second = facts.text_encoders.get("text_encoder"), facts.text_encoders.get("text_encoder_2")
    cross = facts.cross_attention_dim
    base = None
    if facts.addition_embed_type == "text_time":
        if first is None and second is not None:
            raise FinetuneError(f"{where} is an SDXL refiner (one OpenCLIP text encoder, aesthetic-score "
                                f"conditioning); {SUPPORTED}: train and generate with the base model")
        if first and second and cross in (None, first[0] + second[0]):
            base = "sdxl"
    elif facts.addition_embed_type is None and first and not second and cross in (None, first[0]):
        width, openclip = first
        base = "sd2" if width == OPENCLIP_H or (width != CLIP_L and openclip) else "sd1"
    if base is None:
        widths = "+".join(str(w) for w, _ in facts.text_encoders.values()) or "none"
        raise FinetuneError(f"{where} is no model finetune knows (text encoders {widths} wide, U-Net cross-attention "
                            f"{cross}, addition embedding {facts.addition_embed_type}); {SUPPORTED}")
    if facts.prediction_type not in ("epsilon", "v_prediction"):
        raise FinetuneError(f"{where}: scheduler prediction_type {facts.prediction_type!r} is not supported; use "
                            "epsilon or v_prediction")
    return Family(base, facts.prediction_type, facts.in_channels == 9)


def resolve_family(model: ModelConfig | str, key: str = "model.pretrained") -> Family:
    """The family of a base model given as a diffusers folder, a single file or a Hub id."""
    return decide(model_facts(model, key), key)


def model_facts(model: ModelConfig | str, key: str = "model.pretrained") -> ModelFacts:
    model = model if isinstance(model, ModelConfig) else ModelConfig(pretrained=str(model))
    source = describe_source(model.pretrained, model.allow_pickle, key)
    if source == "file":
        if model.single_file_config:  # diffusers builds the models from these configs: they are what loads
            facts = model_facts(ModelConfig(pretrained=model.single_file_config), key)
            return dataclasses.replace(facts, source=model.pretrained)
        return single_file_facts(Path(model.pretrained), key)
    if source == "folder":
        return folder_facts(Path(model.pretrained), key)
    return configs_facts(model.pretrained, _hub_reader(model.pretrained, model.revision, key))


def folder_facts(root: Path, key: str = "model.pretrained") -> ModelFacts:
    """Facts from a diffusers folder, or a folder of its configs alone (what `finetune plan` reads)."""
    return configs_facts(str(root), lambda name: _read_json(root / name, key))


def configs_facts(source: str, read: Callable[[str], dict | None]) -> ModelFacts:
    """Facts from a pipeline's JSON configs; `read(relative path)` gives one, or None where the folder has none.

    model_index.json names the components; without it (a folder of configs only) every component file present
    counts."""
    index = read("model_index.json") or {}
    has = (lambda name: bool(index.get(name)) and index[name][0] is not None) if index else (lambda name: True)
    unet = read("unet/config.json") if has("unet") else None
    if unet is None:
        return ModelFacts(source, index.get("_class_name"), has_unet=False)
    encoders = {}
    for slot in ("text_encoder", "text_encoder_2"):
        config = read(f"{slot}/config.json") if has(slot) else None
        if config:
            config = config.get("text_config", config)  # a CLIPModel config nests the text part
            encoders[slot] = (config["hidden_size"], config.get("hidden_act") == "gelu")  # OpenCLIP uses plain GELU
    scheduler = (read("scheduler/scheduler_config.json") if has("scheduler") else None) or {}
    return ModelFacts(source, index.get("_class_name"), True, unet.get("in_channels", 4),
                      unet.get("cross_attention_dim", 1280), unet.get("addition_embed_type"), encoders,
                      scheduler.get("prediction_type", "epsilon"), dict(unet))


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its components' configs."""
    configs = {"unet/config.json": dict(pipe.unet.config) if getattr(pipe, "unet", None) is not None else None,
               "scheduler/scheduler_config.json": dict(pipe.scheduler.config)}
    for slot in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, slot, None)
        configs[f"{slot}/config.json"] = encoder.config.to_dict() if encoder is not None else None
    return decide(configs_facts(type(pipe).__name__, configs.get))


# Single-file checkpoints in the original (LDM/SGM) layout: the key each text-encoder slot's embedding sits under,
# and whether that layout is OpenCLIP's.
SINGLE_FILE_ENCODERS = {
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ("text_encoder", False),
    "cond_stage_model.model.token_embedding.weight": ("text_encoder", True),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": ("text_encoder", False),
    "conditioner.embedders.1.model.token_embedding.weight": ("text_encoder_2", True),
    "conditioner.embedders.0.model.token_embedding.weight": ("text_encoder_2", True),  # the refiner's only encoder
}
TRANSFORMER_MARKERS = {"joint_blocks.": "an SD3 checkpoint", "double_blocks.": "a Flux checkpoint"}


def single_file_facts(path: Path, key: str) -> ModelFacts:
    """Facts from a checkpoint's tensor names and shapes (its header only: no weights are read)."""
    if path.suffix.lower() != ".safetensors":
        raise FinetuneError(f"{key}: {path} is a pickle checkpoint; set model.single_file_config to a folder or Hub "
                            "id with its diffusers configs, from which its model family is read")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"{key}: {path} is not a readable .safetensors file ({exc})") from None
    for marker, kind in TRANSFORMER_MARKERS.items():
        if any(marker in name for name in shapes):
            return ModelFacts(str(path), kind, has_unet=False)
    unet = "model.diffusion_model."
    if unet + "input_blocks.0.0.weight" not in shapes:
        return ModelFacts(str(path), "a checkpoint without an SD U-Net", has_unet=False)
    cross = next((shape[1] for name, shape in sorted(shapes.items())
                  if name.startswith(unet) and name.endswith("attn2.to_k.weight")), None)
    encoders = {slot: (shapes[name][1], openclip) for name, (slot, openclip) in SINGLE_FILE_ENCODERS.items()
                if name in shapes}
    # Without configs diffusers loads an SD 2.x file as SD 2.1 (v-prediction); our own files say what they are.
    prediction = header.get("modelspec.prediction_type")
    if prediction is None:
        prediction = "v" if encoders.get("text_encoder", (0, False))[1] else "epsilon"
    return ModelFacts(str(path), None, True, shapes[unet + "input_blocks.0.0.weight"][1], cross,
                      "text_time" if unet + "label_emb.0.0.weight" in shapes else None, encoders,
                      "v_prediction" if prediction == "v" else "epsilon")


# What sd-scripts' and our LoRA headers record about the base model (modelspec.architecture, ss_base_model_version).
ARCHITECTURES = {"stable-diffusion-v1": "sd1", "stable-diffusion-v2-512": "sd2", "stable-diffusion-v2-768-v": "sd2-v",
                 "stable-diffusion-xl-v1-base": "sdxl"}
BASE_VERSIONS = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}


def family_of_lora(layers: dict[str, dict], header: dict[str, str]) -> Family | None:
    """The family of the model a LoRA file was trained on, where the file shows it; None where it does not.

    Our own files name it (finetune.family, resolved from the model at training time). Otherwise the layers' widths
    decide where they are a released model's: the U-Net's cross-attention inputs (attn2.to_k: 768 SD 1.x, 1024
    SD 2.x, 2048 SDXL), the text encoder's (768 / 1024), a second text encoder (SDXL). Only then the sd-scripts
    header keys, which name SD 2.x models wrongly when their U-Net config lacks use_linear_projection."""
    if header.get("finetune.family") in FAMILY_NAMES:
        return Family.from_name(header["finetune.family"])
    v = (header.get("ss_v_parameterization") == "True" or header.get("modelspec.prediction_type") == "v"
         or header.get("finetune.prediction_type") == "v_prediction")
    prediction = "v_prediction" if v else "epsilon"
    cross = _width(layers.get("unet", {}), "attn2.to_k.lora_A.weight")
    text = _width(layers.get("text_encoder", {}), "self_attn.q_proj.lora_A.weight")
    if "text_encoder_2" in layers or cross == 2048:
        return Family("sdxl", prediction)
    if OPENCLIP_H in (cross, text):
        return Family("sd2", prediction)
    if CLIP_L in (cross, text):
        return Family("sd1", prediction)
    architecture = header.get("modelspec.architecture", "").removesuffix("/lora")
    named = ARCHITECTURES.get(architecture) or BASE_VERSIONS.get(header.get("ss_base_model_version", ""))
    if named is None:
        return None
    family = Family.from_name(named)
    return family if family.name == "sd2-v" else Family(family.base, prediction)


def _width(layers: dict, suffix: str) -> int | None:
    return next((value.shape[1] for key, value in layers.items() if key.endswith(suffix)), None)


def require_family(model: ModelConfig, recipe: str) -> Family:
    """The base model's family, checked against the recipe about to train it: one line naming the recipe to use
    otherwise."""
    family = resolve_family(model)
    if family.inpainting:
        raise FinetuneError(f"model.pretrained: {model.pretrained} is {family.label}; train on its base model (the "
                            "LoRA then loads into the inpainting model: finetune generate --inpaint-model)")
    if family.recipe != recipe:
        raise FinetuneError(f"model.pretrained: {model.pretrained} is {family.label}, which the {recipe} recipe does "
                            f"not train; use {CONFIG_FILES[family.base]} (recipe: {family.recipe})")
    return family


def _read_json(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{key}: {path} is not valid JSON ({exc}); fix or re-download the model") from None


def _hub_reader(repo: str, revision: str | None, key: str) -> Callable[[str], dict | None]:
    """Reads a Hub model's JSON configs (a few KB; the weights are not downloaded)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    def read(name: str) -> dict | None:
        try:
            return _read_json(Path(hf_hub_download(repo, name, revision=revision)), key)
        except LocalEntryNotFoundError as exc:  # offline, or not cached: before EntryNotFoundError, its base
            reason = brief(exc, 200)
        except EntryNotFoundError:
            return None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            reason = brief(exc, 200)
        raise FinetuneError(f"{key}: could not read the configs of {repo} from the Hub (are you online and is the id "
                            f"right?): {reason}")
    return read
