"""The embedding models of the metrics, loaded through transformers: DINO (ViT CLS token) and CLIP (projected
image and text embeddings), each with the image processor saved beside its weights.

A Hub id loads from the local Hugging Face cache or the Hub; offline, a model not cached is a one-line error that
says how to fetch it once and point the key at the folder.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import MODEL_MAPPING, AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

from ..console import brief
from ..errors import ConfigError, FinetuneError

BATCH = 32  # images per forward pass of an embedding model


def load_from(name: str, key: str, loader: Callable[[str], object]):
    """`loader(name)`, where `name` is a local folder or a Hub id; failures are one line naming `key`."""
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():
        raise ConfigError(f"{key}: folder {name} does not exist; point it at a saved transformers model or a Hub id")
    try:
        return loader(str(local) if local.is_dir() else name)
    except (OSError, ValueError, KeyError) as exc:
        reason = brief(exc, 200)
        if local.is_dir():
            raise FinetuneError(f"{key}: {name} is not a loadable transformers model folder ({reason})") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "the Hub is offline here (HF_HUB_OFFLINE is set)" if offline else "the Hub could not be reached"
        raise FinetuneError(f"{key}: {name} is neither a folder here nor in the local Hugging Face cache, and {why}; "
                            f"fetch it once where you are online (hf download {name} --local-dir models/{local.name}) "
                            f"and set {key}=models/{local.name}") from None


def _pooled(output) -> torch.Tensor:
    """CLIP's projected embedding: transformers 5 returns the model output with it as pooler_output, 4.x the
    tensor itself."""
    return output if torch.is_tensor(output) else output.pooler_output


class ImageEmbedder:
    """A vision model and its processor: images in, one embedding row per image out."""

    def __init__(self, model, processor, device, dtype):
        self.model, self.processor, self.device, self.dtype = model.eval().to(device, dtype), processor, device, dtype

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = self.processor(images=images[start:start + BATCH], return_tensors="pt")["pixel_values"]
            rows.append(self.embed(pixels.to(self.device, self.dtype)).float().cpu())
        return torch.cat(rows)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DinoEmbedder(ImageEmbedder):
    """DINO's image embedding: the final (layer-normed) CLS token, what the DINO authors' models return."""

    def embed(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class ClipEmbedder(ImageEmbedder):
    """CLIP's projected image embedding, and its projected text embedding for CLIP-T."""

    def __init__(self, model, processor, tokenizer, device, dtype):
        super().__init__(model, processor, device, dtype)
        self.tokenizer = tokenizer

    def embed(self, pixels):
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device)))\
            .float().cpu()


def dino_model(name: str):
    """The DINO model without a pooling layer where its class has one (ViT): the DINO authors' checkpoints carry
    none, and the embedding is the CLS token, so a pooler would only be random weights that transformers reports
    as missing on every load."""
    config = AutoConfig.from_pretrained(name)
    model_class = MODEL_MAPPING[type(config)]
    takes_pooler = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return AutoModel.from_pretrained(name, config=config, **({"add_pooling_layer": False} if takes_pooler else {}))


def load_dino(name: str, device, dtype=torch.float32) -> DinoEmbedder:
    key = "eval.dino_model"
    return DinoEmbedder(load_from(name, key, dino_model),
                        load_from(name, key, AutoImageProcessor.from_pretrained), device, dtype)


def load_clip(name: str, device, dtype=torch.float32) -> ClipEmbedder:
    key = "eval.clip_model"
    return ClipEmbedder(load_from(name, key, CLIPModel.from_pretrained),
                        load_from(name, key, AutoImageProcessor.from_pretrained),
                        load_from(name, key, AutoTokenizer.from_pretrained), device, dtype)
