"""README.md beside the weights: a Hub model card (YAML header + markdown) that says how to use the LoRA."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..family import Family
from .adapters import NAMES

SETTINGS = ("base_model", "family", "type", "rank", "alpha", "unet_targets", "text_encoder", "steps", "epochs",
            "learning_rate", "batch_size", "resolution", "prediction_type", "num_train_images", "num_class_images",
            "seed")


def write_model_card(folder: str | Path, info: dict, license: str, kohya_file: str | None = None,
                     grid: str | None = None) -> Path:
    """Write folder/README.md; `kohya_file` and `grid` are file names inside folder, when present."""
    folder = Path(folder)
    family = Family.from_name(str(info["family"]))  # the name finetune.family resolved at training time
    sdxl = family.is_sdxl
    # huggingface_hub writes (and validates) the Hub's card header; the body is ours.
    header = ModelCardData(base_model=str(info.get("base_model", "")), license=license, library_name="diffusers",
                           tags=["text-to-image", "diffusers", "lora", "dreambooth", "stable-diffusion-xl" if sdxl
                                 else "stable-diffusion", "template:sd-lora"],
                           instance_prompt=str(info.get("trigger", "")), inference=True)
    pipeline = family.pipeline_class().__name__
    lines = ["---", header.to_yaml(), "---", "",
             f"# {info.get('title') or folder.name}", "",
             f"A DreamBooth LoRA for `{header.base_model}`, trained with finetune. Trigger phrase: "
             f"`{header.instance_prompt}`.", ""]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {info[key]} |" for key in SETTINGS if key in info]
    kind = str(info.get("type", "lora"))
    if kind in ("loha", "lokr"):  # diffusers' loaders know neither: say so rather than show code that fails
        lines += ["", "## Use it", "", f"diffusers' `load_lora_weights` does not read {NAMES[kind]}; "
                  "`pytorch_lora_weights.safetensors` is finetune's file (for `lora.init_from` and `finetune "
                  "export`). Use the kohya file in a UI that reads LyCORIS files.", ""]
    else:
        lines += ["", "## Use it in diffusers", "", "```python", "import torch",
                  f"from diffusers import {pipeline}", "",
                  f"pipe = {pipeline}.from_pretrained(\"{header.base_model}\", dtype=torch.float16).to(\"cuda\")",
                  "pipe.load_lora_weights(\"path/to/this/folder\")  # pytorch_lora_weights.safetensors",
                  f"image = pipe(\"{header.instance_prompt}\").images[0]", "```", ""]
    if kohya_file:
        name = Path(kohya_file).stem
        lines += ["## Use it in AUTOMATIC1111, Forge or ComfyUI", "",
                  f"Copy `{kohya_file}` (kohya format) into `models/Lora/`. In A1111/Forge add "
                  f"`<lora:{name}:1>` to the prompt; in ComfyUI load it with a *LoraLoader* node. Strength 1 "
                  "matches diffusers' scale 1 (the file keeps the true alpha).", ""]
    path = folder / "README.md"
    ModelCard("\n".join(lines)).save(path)
    return path
