"""README.md beside the weights: a Hub model card (YAML header + markdown) that says how to use the LoRA."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..family import Family
from .adapters import NAMES
from .embeddings import EMBEDDINGS_NAME, rewrite_prompt, token_names

SETTINGS = ("base_model", "family", "type", "rank", "alpha", "unet_targets", "text_encoder", "steps", "epochs",
            "learning_rate", "batch_size", "resolution", "prediction_type", "num_train_images", "num_class_images",
            "seed", "ema_decay")


def write_model_card(folder: str | Path, info: dict, license: str | None, kohya_file: str | None = None,
                     grid: str | None = None) -> Path:
    """Write folder/README.md; `kohya_file` and `grid` are file names inside folder, when present; `license` None
    (the base model's was not found) leaves the header without one and says so in the card."""
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
    if license is None:
        lines += ["License: not found in the base model's card or metadata. Add a `license:` line to the header "
                  "above (the base model's license) before sharing this LoRA.", ""]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {info[key]} |" for key in SETTINGS if key in info]
    kind = str(info.get("type", "lora"))
    word = info.get("pivotal_word")
    tokens = token_names(int(info.get("pivotal_tokens", 0))) if word else []
    prompt = rewrite_prompt(str(header.instance_prompt), str(word), "".join(tokens)) if word else \
        header.instance_prompt
    if kind in ("loha", "lokr"):  # diffusers' loaders know neither: say so rather than show code that fails
        lines += ["", "## Use it", "", f"diffusers' `load_lora_weights` does not read {NAMES[kind]}; "
                  "`pytorch_lora_weights.safetensors` is finetune's file (for `lora.init_from` and `finetune "
                  "export`). Use the kohya file in a UI that reads LyCORIS files.", ""]
    else:
        lines += ["", "## Use it in diffusers", "", "```python", "import torch",
                  f"from diffusers import {pipeline}", "",
                  f"pipe = {pipeline}.from_pretrained(\"{header.base_model}\", dtype=torch.float16).to(\"cuda\")",
                  "pipe.load_lora_weights(\"path/to/this/folder\")  # pytorch_lora_weights.safetensors",
                  *(embedding_lines(tokens, sdxl) if word else []),
                  f"image = pipe(\"{prompt}\").images[0]", "```", ""]
    if kohya_file:
        name = Path(kohya_file).stem
        lines += ["## Use it in AUTOMATIC1111, Forge or ComfyUI", "",
                  f"Copy `{kohya_file}` (kohya format) into `models/Lora/`. In A1111/Forge add "
                  f"`<lora:{name}:1>` to the prompt; in ComfyUI load it with a *LoraLoader* node. Strength 1 "
                  "matches diffusers' scale 1 (the file keeps the true alpha).", ""]
        if word:
            lines += [f"Pivotal tuning: the file bundles the embeddings for `{word}`, which A1111 and ComfyUI load "
                      f"with the LoRA (or copy `embeddings/{word}.safetensors` into their embeddings folder); "
                      f"write `{word}` in the prompt.", ""]
    path = folder / "README.md"
    ModelCard("\n".join(lines)).save(path)
    return path


def embedding_lines(tokens: list[str], sdxl: bool) -> list[str]:
    """Pivotal tuning's token embeddings into diffusers, once per text encoder."""
    lines = ["from safetensors.torch import load_file", "",
             f"embeddings = load_file(\"path/to/this/folder/{EMBEDDINGS_NAME}\")",
             f"pipe.load_textual_inversion(embeddings[\"clip_l\"], token={tokens}, text_encoder=pipe.text_encoder, "
             "tokenizer=pipe.tokenizer)"]
    if sdxl:
        lines.append(f"pipe.load_textual_inversion(embeddings[\"clip_g\"], token={tokens}, "
                     "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)")
    return lines
