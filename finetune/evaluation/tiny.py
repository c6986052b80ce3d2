"""Tiny CLIP and DINO (ViT) models with the real classes and random weights, saved as the folders the metrics load.

They stand in for openai/clip-vit-base-patch32 and facebook/dino-vits16 in the tests and the offline demo: the
same model classes, processors and tokenizer files, loaded back through the path a user's model takes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from ..tiny import save_tokenizer, tiny_tokenizer

IMAGE_SIZE, PATCH = 32, 8
# The processors' settings as the real models' preprocessor_config.json files write them (ImageNet statistics for
# DINO, CLIP's own for CLIP); written as JSON so no image-processor backend (torchvision or PIL) is implied.
DINO_PROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": IMAGE_SIZE,
                  "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                  "size": {"shortest_edge": IMAGE_SIZE}, "resample": 3, "do_center_crop": True,
                  "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _write_processor(folder: Path, settings: dict) -> None:
    import json
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def build_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A ViT (DINO's architecture at toy size): CLS token + patch tokens, layer-normed output."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    _write_processor(folder, DINO_PROCESSOR)
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A CLIP model (vision and text towers with projections) with the tiny character-level tokenizer."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vision = {"image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder, safe_serialization=True)
    _write_processor(folder, CLIP_PROCESSOR)
    save_tokenizer(tokenizer, folder)
    return folder
