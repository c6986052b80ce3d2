"""What SDXL adds to SD's conditioning: two text encoders with a pooled embedding, and size/crop conditioning."""
from __future__ import annotations

import torch

from .data.dataset import Geometry, PromptEmbeddings


class SDXLPromptEmbeddings(PromptEmbeddings):
    """(embeddings, pooled embeddings) per prompt, as StableDiffusionXLPipeline.encode_prompt computes them:
    both encoders' penultimate hidden states side by side, and the second encoder's projected pooled output."""

    def __init__(self, tokenizers: list, text_encoders: list, prompts: list[str], cache: bool, device):
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        super().__init__(tokenizers[0], text_encoders[0], prompts, cache, device)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self.token_ids(prompts, tokenizer).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out[0]  # out[0]: text_embeds of the last (projection) encoder


def time_ids(geometry: list[Geometry], device, dtype=torch.float32) -> torch.Tensor:
    """SDXL's add_time_ids per sample: original size (h, w), crop top-left (top, left), target size (h, w)."""
    return torch.tensor([list(g) for g in geometry], device=device, dtype=dtype)
