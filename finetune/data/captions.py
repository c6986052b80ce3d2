"""Captions: the file beside a photo, the trigger phrase, and the per-step variants (tag shuffle, dropout).

The template (caption with the trigger in place) is fixed per example; `caption_variant` draws the per-step
variant from a generator keyed by the sample's position (dataset.plan_prompts), so a resumed run, on any process
count, sees the same captions.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import FinetuneError
from .images import read_caption

log = logging.getLogger("finetune")
CAPTION_EXTENSIONS = (".txt", ".caption")
TRIGGER = "{trigger}"


def find_caption(image_path: Path, extension: str = ".txt") -> str | None:
    """The caption file beside a photo: `extension` first, then .txt and .caption; None when there is none."""
    found = caption_source(image_path, extension)
    return found[1] if found else None


def caption_source(image_path: Path, extension: str = ".txt") -> tuple[Path, str] | None:
    """(the caption file find_caption reads, its caption), or None."""
    for ext in dict.fromkeys((extension, *CAPTION_EXTENSIONS)):
        caption = read_caption(image_path, ext)
        if caption is not None:
            return image_path.with_suffix(ext), caption
    return None


def warn_long_prompts(prompts: dict[str, str], tokenizer) -> list[str]:
    """Warn, naming where each came from, about prompts longer than the text encoder reads (CLIP: 77 tokens with
    its start and end tokens): the rest is cut off in training. `prompts` maps a source (a caption file,
    data.instance_prompt) to its prompt; returns the sources warned about."""
    limit, warned = tokenizer.model_max_length, []
    for source, prompt in prompts.items():
        count = len(tokenizer(prompt, truncation=False).input_ids)
        if count > limit:
            log.warning("warning: %s: the prompt is %d tokens, but the text encoder reads %d (with its start and "
                        "end tokens); the rest is cut off: shorten it", source, count, limit)
            warned.append(source)
    return warned


def with_trigger(caption: str, trigger: str | None, where: str = "caption") -> str:
    """Put the trigger phrase where `{trigger}` stands, or in front (as the first tag) if the caption lacks it."""
    if not trigger:
        if TRIGGER in caption:
            raise FinetuneError(f"{where}: contains {TRIGGER} but data.trigger is not set; set it, e.g. "
                                "data.trigger='sks dog'")
        return caption
    if TRIGGER in caption:
        return caption.replace(TRIGGER, trigger)
    if trigger in caption:
        return caption
    return f"{trigger}, {caption}"


def example_prompt(caption: str | None, instance_prompt: str, trigger: str | None, where: str) -> str:
    """The fixed prompt of one instance example: its caption with the trigger, or the instance prompt."""
    if caption is None:
        return with_trigger(instance_prompt, trigger, "data.instance_prompt") if TRIGGER in instance_prompt \
            else instance_prompt
    return with_trigger(caption, trigger, where)


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """Shuffle the comma-separated tags after the first `keep`, which stay in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    if len(tail) < 2:
        return caption
    tail = [tail[j] for j in torch.randperm(len(tail), generator=generator)]
    return ", ".join(head + tail)


def caption_variant(prompt: str, dropout: float, shuffle: bool, keep: int, generator: torch.Generator) -> str:
    """This step's version of an instance prompt: tags shuffled (if asked), or dropped to "" with prob `dropout`.

    Both draws are taken every time, so the generator advances the same way whatever the outcome.
    """
    dropped = torch.rand((), generator=generator).item() < dropout
    shuffled = shuffle_tags(prompt, keep, generator) if shuffle else prompt
    return "" if dropped else shuffled


def possible_prompts(prompts: list[str], dropout: float, shuffle: bool) -> list[str] | None:
    """Every prompt training can see, for caching text embeddings; None when tag shuffling makes them too many.

    With dropout only, the variants are the prompts themselves plus the empty prompt.
    """
    if shuffle:
        return None
    return sorted(set(prompts) | ({""} if dropout > 0 else set()))


def batch_prompts(prompts: list[str], num_instance: int, dropout: float, shuffle: bool, keep: int,
                  generators: list[torch.Generator]) -> list[str]:
    """This step's prompts: the first `num_instance` (instance samples) get caption dropout and tag shuffling,
    sample k drawing from generators[k]; the rest (class samples) stay as they are, so prior preservation always
    sees the class prompt."""
    if not (dropout or shuffle):
        return list(prompts)
    varied = [caption_variant(p, dropout, shuffle, keep, g) for p, g in zip(prompts[:num_instance], generators,
                                                                                strict=True)]
    return varied + list(prompts[num_instance:])
