"""The diffusers LoRA file: `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(dir)`.

diffusers writes the keys and its adapter config (so rank and alpha reload exactly); we add what the file was
made from to the safetensors header and write it atomically, so an interrupted save leaves the old file intact.
DoRA goes the same way (use_dora in the adapter config, lora_magnitude_vector per module). diffusers' loaders read
no LoHa or LoKr, so for those the file holds peft's own keys under the same component prefixes, for finetune to
read back (lora.init_from, finetune export) and diffusers to refuse (it cannot tell the layout) rather than
misread; the UIs get them through the kohya file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..lora import adapter_metadata, adapter_type, lora_config, lora_state, rank_and_alpha
from ..storage import follow_umask, save_safetensors_atomically

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_PREFIX = "finetune."


def diffusers_layers(model) -> dict:
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_diffusers_lora(folder: str | Path, pipeline_class, unet, text_encoders: dict, info: dict,
                        weight_name: str = WEIGHT_NAME) -> Path:
    """Write folder/pytorch_lora_weights.safetensors (or `weight_name`) for `unet` and the LoRA-carrying text
    encoders.

    `text_encoders` maps the pipeline's attribute name ('text_encoder', 'text_encoder_2') to a model with LoRA;
    `info` (base model, trigger, steps, ...) goes into the header under finetune.* keys.
    """
    models = {"unet": unet, **text_encoders}
    path = Path(folder) / weight_name
    kind = adapter_type(lora_config(unet))
    if kind in ("loha", "lokr"):
        return save_peft_layers(path, {name: lora_state(model) for name, model in models.items()},
                                {name: rank_and_alpha(lora_config(model)) for name, model in models.items()},
                                {**info, "type": kind})
    layers = {name: magnitude_named_for_text_encoders(name, diffusers_layers(model)) for name, model in models.items()}
    return save_diffusers_layers(path, pipeline_class, layers,
                                 {name: adapter_metadata(model) for name, model in models.items()},
                                 {**info, "type": kind})


def magnitude_named_for_text_encoders(component: str, layers: dict) -> dict:
    """DoRA's magnitudes of a text encoder keyed `...lora_magnitude_vector.weight`. diffusers hands a text encoder's
    keys to transformers' loader, which looks for the parameter's own name (lora_magnitude_vector.<adapter>.weight)
    and leaves the magnitudes at their initial values, without an error, when the file says only
    `...lora_magnitude_vector` (what diffusers' writer emits). The U-Net's loader accepts the bare name."""
    if component == "unet":
        return layers
    return {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in layers.items()}


def save_peft_layers(path: Path, layers: dict, ranks: dict, info: dict) -> Path:
    """A LoHa/LoKr file: `component.<peft key>` tensors, the adapter config in diffusers' header key (so the file
    says its rank and alpha like a diffusers one), and the finetune.* header; written atomically."""
    tensors = {f"{name}.{key}": value for name, part in layers.items() for key, value in part.items()}
    adapter = {f"{name}.{key}": value for name, (r, alpha) in ranks.items()
               for key, value in (("r", r), ("lora_alpha", alpha), ("peft_type", str(info["type"]).upper()))}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter),
              **{METADATA_PREFIX + key: _as_text(value) for key, value in info.items()},
              METADATA_PREFIX + "version": __version__}
    return save_safetensors_atomically(tensors, path, header)


def save_diffusers_layers(path: str | Path, pipeline_class, layers: dict, adapters: dict, info: dict) -> Path:
    """Write a diffusers LoRA file from per-component layers (diffusers key format) and adapter configs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for name in layers:
        kwargs[f"{name}_lora_layers"] = layers[name]
        kwargs[f"{name}_lora_adapter_metadata"] = adapters[name]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        pipeline_class.save_lora_weights(scratch, weight_name=WEIGHT_NAME, **kwargs)
        written = Path(scratch) / WEIGHT_NAME
        tensors, header = load_file(written), read_header(written)
        header.update({METADATA_PREFIX + key: _as_text(value) for key, value in info.items()})
        header[METADATA_PREFIX + "version"] = __version__
        save_file(tensors, written, metadata=header)
        # The file diffusers wrote, rewritten in its scratch folder with our header entries and renamed into place:
        # storage.save_safetensors_atomically's write-then-rename, on a file diffusers made first. safetensors
        # writes 0600 (finetune.storage).
        os.replace(follow_umask(written), path)
    return path


def read_header(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def finetune_metadata(path: str | Path) -> dict[str, str]:
    """The finetune.* header entries of an exported file, without the prefix."""
    return {k[len(METADATA_PREFIX):]: v for k, v in read_header(path).items() if k.startswith(METADATA_PREFIX)}


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
