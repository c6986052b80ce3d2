"""Write LoRA weights in either format, and convert a file or run folder from one format to the other."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers

from ..config import ModelConfig
from ..errors import FinetuneError
from ..family import decide, model_facts
from .adapters import NAMES
from .diffusers_format import METADATA_PREFIX, WEIGHT_NAME, magnitude_named_for_text_encoders, save_diffusers_layers
from .embeddings import TokenEmbeddings, bundle_tensors, embeddings_for, save_embeddings
from .kohya import save_kohya_lora
from .lora_weights import LoraWeights, read_lora
from .metadata import kohya_metadata

FORMATS = ("kohya", "diffusers")
DIFFUSERS_KINDS = ("lora", "dora")  # what diffusers' load_lora_weights reads (its loaders know no LoHa or LoKr)


def not_for_diffusers(kind: str, where) -> str:
    """The one line for a LoHa/LoKr LoRA asked of diffusers."""
    return (f"{where}: diffusers' load_lora_weights does not read {NAMES[kind]} (it raises on the keys); write "
            f"--format kohya for ComfyUI/A1111/Forge, which read it, or keep finetune's file for lora.init_from")


def export_kohya(weights: LoraWeights, path: str | Path, info: dict, precision: str = "fp16",
                 embeddings: TokenEmbeddings | None = None) -> Path:
    """The kohya file with the ss_*/modelspec.* keys the UIs show, plus our finetune.* info; `embeddings`
    (pivotal tuning's) go in as sd-scripts' bundled embeddings, in fp32 like the alphas."""
    part = "unet" if "unet" in weights.layers else next(iter(weights.layers))
    has_text_encoder = any(name != "unet" for name in weights.layers)
    metadata = kohya_metadata(info, weights.rank(part), weights.alpha[part], has_text_encoder, weights.kind)
    metadata.update({METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return save_kohya_lora(path, weights, metadata, precision, bundle_tensors(embeddings) if embeddings else None)


def export_diffusers(weights: LoraWeights, path: str | Path, info: dict) -> Path:
    """A diffusers file from any LoraWeights (for a LoRA trained here, save_diffusers_lora writes it directly)."""
    if weights.kind not in DIFFUSERS_KINDS:
        raise FinetuneError(not_for_diffusers(weights.kind, path))
    if weights.family is None:
        raise FinetuneError(f"{path}: the LoRA's model family is not known; give --base MODEL")
    layers = {name: magnitude_named_for_text_encoders(name, convert_state_dict_to_diffusers(part))
              for name, part in weights.layers.items()}
    adapters = {name: {"r": weights.rank(name), "lora_alpha": weights.alpha[name],
                       "target_modules": weights.modules(name), "use_dora": weights.kind == "dora",
                       "lora_bias": False}
                for name in weights.layers}
    info = {**info, "type": weights.kind}
    return save_diffusers_layers(path, weights.family.pipeline_class(), layers, adapters, info)


def header_info(weights: LoraWeights) -> dict:
    """The finetune.* entries a file carries (kept when converting), without the prefix."""
    return {k[len(METADATA_PREFIX):]: v for k, v in weights.header.items()
            if k.startswith(METADATA_PREFIX) and k != METADATA_PREFIX + "version"}


def read_for_conversion(src: str | Path, base: ModelConfig | None) -> LoraWeights:
    """The LoRA with its family known: from `base` (its configs; its U-Net config also maps original-layout
    blocks), else from the file itself; a file that shows neither, or contradicts `base`, is an error."""
    facts = model_facts(base, "--base") if base else None
    family = decide(facts, "--base") if facts else None
    weights = read_lora(src, facts.unet_config if facts else None)
    if base and family and weights.family and weights.family.base != family.base:
        raise FinetuneError(f"{src} is a LoRA for {weights.family.label}, but --base {base.pretrained} is "
                            f"{family.label}; give the model it was trained on")
    weights.family = family or weights.family
    if weights.family is None:
        raise FinetuneError(f"{src}: the file does not say which model it was trained on (no finetune.family or "
                            "ss_base_model_version header, layer widths of no released model); give --base MODEL")
    return weights


def convert_lora(src: str | Path, fmt: str, out: str | Path, precision: str = "fp16",
                 base: ModelConfig | None = None) -> Path:
    """Convert a LoRA file (or a run folder's diffusers file) to `fmt`; `out` is a .safetensors path or a
    folder (diffusers format: folder/pytorch_lora_weights.safetensors, which load_lora_weights(folder) finds)."""
    if fmt not in FORMATS:
        raise FinetuneError(f"--format {fmt}: choose kohya or diffusers")
    out = Path(out)
    if fmt == "kohya" and out.suffix != ".safetensors":
        raise FinetuneError(f"--out {out}: a kohya LoRA is one file; give a path ending in .safetensors")
    weights = read_for_conversion(src, base)
    family = weights.family
    assert family is not None  # read_for_conversion refuses a LoRA whose family it cannot tell
    info = header_info(weights)
    info.update(family=family.name, prediction_type=family.prediction_type)
    if weights.source_format == "kohya" and "trigger" not in info:
        info["trigger"] = weights.header.get("modelspec.trigger_phrase", "")
    # Pivotal tuning's embeddings travel with the LoRA: bundled into a kohya file, beside a diffusers one.
    embeddings = embeddings_for(src)
    if len(embeddings) > 1:
        raise FinetuneError(f"{src} bundles embeddings for {len(embeddings)} words; finetune converts one")
    if fmt == "kohya":
        return export_kohya(weights, out, info, precision, embeddings[0] if embeddings else None)
    written = export_diffusers(weights, out if out.suffix == ".safetensors" else out / WEIGHT_NAME, info)
    if embeddings:
        save_embeddings(written.parent, embeddings[0], {"family": family.name})
    return written
