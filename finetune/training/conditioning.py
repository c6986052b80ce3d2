"""What differs between the model families while training: the pipeline, its text encoders, and how the U-Net is
conditioned. Everything else (data, loss, loop, exports) is the same for SD 1.x/2.x and SDXL.
"""
from __future__ import annotations

import dataclasses

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..data.dataset import Geometry, PromptEmbeddings
from ..sdxl import SDXLPromptEmbeddings, time_ids


class SDConditioning:
    """SD 1.x/2.x: the text encoder's last hidden states, per prompt."""

    def __init__(self, tokenizers: list, text_encoders: list, cached: list[str] | None, device):
        self.prompts = PromptEmbeddings(tokenizers[0], text_encoders[0], cached or [], cached is not None, device)

    def __call__(self, prompts: list[str], geometry: list[Geometry]) -> tuple[torch.Tensor, ...]:
        return (self.prompts(prompts),)


class SDXLConditioning:
    """SDXL: both encoders' penultimate hidden states side by side, the second one's pooled embedding, and each
    sample's (original size, crop corner, target size)."""

    def __init__(self, tokenizers: list, text_encoders: list, cached: list[str] | None, device):
        self.prompts = SDXLPromptEmbeddings(tokenizers, text_encoders, cached or [], cached is not None, device)

    def __call__(self, prompts: list[str], geometry: list[Geometry]) -> tuple[torch.Tensor, ...]:
        embeddings, pooled = self.prompts(prompts)
        return embeddings, pooled, time_ids(geometry, embeddings.device, embeddings.dtype)


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """The per-family piece a DreamBooth recipe is given."""
    pipeline_class: type
    text_encoder_names: tuple[str, ...]  # the pipeline's attribute names, which are also the export's prefixes
    tokenizer_names: tuple[str, ...]
    conditioning_class: type

    def text_encoders(self, pipe) -> dict[str, torch.nn.Module]:
        return {name: getattr(pipe, name) for name in self.text_encoder_names}

    def conditioning(self, pipe, text_encoders: list, cached: list[str] | None, device):
        """The conditioning, encoding every prompt in `cached` once now (None: encode each step)."""
        tokenizers = [getattr(pipe, name) for name in self.tokenizer_names]
        return self.conditioning_class(tokenizers, text_encoders, cached, device)


SD = ModelKind(StableDiffusionPipeline, ("text_encoder",), ("tokenizer",), SDConditioning)
SDXL = ModelKind(StableDiffusionXLPipeline, ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
                 SDXLConditioning)
