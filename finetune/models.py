"""Load the parts of a pretrained latent diffusion pipeline: from the Hub, a local folder or one file."""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch
from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch.nn.utils import parametrize

from .config import ModelConfig
from .console import brief
from .errors import FinetuneError

SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def describe_source(pretrained: str, allow_pickle: bool = False, key: str = "model.pretrained") -> str:
    """'file', 'folder' or 'hub': how `pretrained` will be read, or a FinetuneError naming `key` if it cannot be.

    Pickle weights (.ckpt, .bin, .pt) can run code when loaded: refused unless `allow_pickle` opts in.
    """
    path = Path(pretrained).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise FinetuneError(f"{key}: {pretrained} is a pickle file, which can run code when loaded; "
                            "convert it to .safetensors first (or, for a file you trust, model.allow_pickle=true)")
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ()):
        return "file"
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FinetuneError(f"{key}: {pretrained} is a folder without model_index.json; point it at "
                                "a diffusers pipeline folder (save_pretrained output) or a .safetensors file")
        pickled = [d for d in sorted(path.iterdir()) if d.is_dir() and not any(d.glob("*.safetensors"))
                   and any(f.suffix.lower() in PICKLE_SUFFIXES for f in d.iterdir())]
        if pickled and not allow_pickle:
            raise FinetuneError(f"{key}: {pickled[0]} has only pickle weights, which can run code when "
                                "loaded; convert the folder to .safetensors (or, if you trust it, "
                                "model.allow_pickle=true)")
        return "folder"
    looks_local = pretrained.startswith((".", "/", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if looks_local or not HUB_ID.match(pretrained):
        raise FinetuneError(f"{key}: {pretrained} does not exist; give a Hub id, a diffusers folder or a "
                            ".safetensors file")
    return "hub"


def load_pipeline(model: ModelConfig, pipeline_class: Any = StableDiffusionPipeline,
                  dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.bfloat16,
                  **extra) -> Any:  # diffusers sets a pipeline's parts as attributes at run time
    """Load `pipeline_class` from wherever `model.pretrained` points, with a one-line error if it can't.

    With model.quantize_unet=nf4 the pipeline comes without its U-Net: ensure_unet loads it later, in 4 bits
    straight onto the GPU, when the first phase that needs it starts (so encoding never shares the GPU with it).
    """
    source = describe_source(model.pretrained, model.allow_pickle)
    # Every SD 1.x/2.x pipeline (text-to-image, image-to-image, inpainting) takes a safety checker: not loaded.
    if "safety_checker" in inspect.signature(pipeline_class).parameters:
        extra = {"safety_checker": None, "requires_safety_checker": False, **extra}
    if model.quantize_unet != "none":
        check_nf4_possible(model, source)
        extra = {"unet": None, **extra}
    try:
        if source == "file":
            return pipeline_class.from_single_file(model.pretrained, config=model.single_file_config,
                                                   dtype=dtype, **extra)
        return pipeline_class.from_pretrained(model.pretrained, revision=model.revision, variant=model.variant,
                                              dtype=dtype, use_safetensors=None if model.allow_pickle else True,
                                              **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = brief(exc)
        where = "the Hub (are you online and is the id right?)" if source == "hub" else "disk"
        raise FinetuneError(f"model.pretrained: could not load {model.pretrained} from {where}: {reason}") from None


def ensure_unet(pipe: Any, model: ModelConfig, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The pipeline's U-Net, loading the deferred 4-bit one (model.quantize_unet=nf4 or nf4_all) onto the GPU first
    if needed."""
    if pipe.unet is None:
        unet = load_nf4_unet(model, compute_dtype)
        if model.quantize_unet == "nf4_all":
            store_convolutions_in_nf4(unet)
        pipe.register_modules(unet=unet)
    return pipe.unet


def check_nf4_possible(model: ModelConfig, source: str) -> None:
    if not torch.cuda.is_available():
        raise FinetuneError(f"model.quantize_unet={model.quantize_unet} needs a CUDA GPU (bitsandbytes 4-bit); set "
                            "model.quantize_unet=none here")
    if source == "file":
        raise FinetuneError(f"model.quantize_unet={model.quantize_unet}: {model.pretrained} is a single file; "
                            "quantizing loads the U-Net from a diffusers folder or Hub id (save it as one with "
                            "diffusers' save_pretrained), or set model.quantize_unet=none")


def load_nf4_unet(model: ModelConfig, compute_dtype: torch.dtype):
    """The U-Net with its linear layers in NF4 through diffusers' bitsandbytes quantizer (QLoRA's storage); with
    nf4_all, ensure_unet stores its convolutions in NF4 next."""
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    try:
        return UNet2DConditionModel.from_pretrained(model.pretrained, subfolder="unet", revision=model.revision,
                                                    variant=model.variant, quantization_config=config,
                                                    torch_dtype=compute_dtype)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        reason = brief(exc)
        raise FinetuneError(f"model.quantize_unet={model.quantize_unet}: could not load the U-Net of "
                            f"{model.pretrained} in 4 bits: "
                            f"{reason}") from None


NF4_BLOCK = 64  # weights per fp32 scale: bitsandbytes' default, the one QLoRA measured
EDGE_CONVOLUTIONS = ("conv_in", "conv_out")  # a few thousand weights each, next to the latents: kept as they are


class NF4Storage(torch.nn.Module):
    """A frozen weight kept in NF4 and given back in its own dtype each time its layer reads it (a parametrization).

    Written here because bitsandbytes has a 4-bit Linear but no 4-bit convolution, and two thirds of SD 1.x's
    U-Net weights are convolutions; bitsandbytes' own quantize/dequantize functions do the arithmetic. The packed
    weight and its scales are the layer's tensors, so they move with it, and dequantizing is one kernel with no
    host sync, so a CUDA graph replays it (train.cuda_graphs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("code", None)
        self.shape, self.dtype = torch.Size(), torch.bfloat16

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed, state = quantize_4bit(weight.detach(), blocksize=NF4_BLOCK, quant_type="nf4")
        self.code, self.shape, self.dtype = state.code, weight.shape, weight.dtype
        return packed, state.absmax

    def forward(self, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        state = QuantState(absmax=absmax.float(), shape=self.shape, code=self.code.float(), blocksize=NF4_BLOCK,
                           quant_type="nf4", dtype=self.dtype)
        return dequantize_4bit(packed, state)


def nf4_convolutions(unet: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The convolutions model.quantize_unet=nf4_all stores in NF4: all but the edge ones."""
    return [module for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Conv2d) and name not in EDGE_CONVOLUTIONS]


def store_convolutions_in_nf4(unet: torch.nn.Module) -> int:
    """Keep the frozen U-Net's nf4_convolutions in NF4; returns how many were stored.

    One layer at a time, so the full-precision copies never coexist with the packed ones (quantizing all first
    measured a 290 MiB higher training peak on the H200: BENCHMARKS.md)."""
    convolutions = nf4_convolutions(unet)
    for conv in convolutions:
        conv.weight.requires_grad_(False)  # frozen; and 4-bit storage is an integer tensor, which has no gradient
        parametrize.register_parametrization(conv, "weight", NF4Storage(), unsafe=True)
    return len(convolutions)


TILE_PX = 512


def tile_vae(vae, tile_px: int = TILE_PX) -> None:
    """Encode and decode images larger than `tile_px` in overlapping tiles of that size (diffusers' tiled VAE,
    whose default tile is the VAE's own sample size: 1024 px for SDXL's, which would never tile at 1024)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // 2 ** (len(vae.config.block_out_channels) - 1)


def free_gpu_cache() -> None:
    """Hand the blocks PyTorch keeps cached back to the driver, so that the next phase's peak is its own (a block
    a phase freed stays reserved, and counts on the card, until this)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_quantized(module: torch.nn.Module) -> bool:
    """Quantized weights keep their storage type: such a module may be moved but not cast."""
    return bool(getattr(module, "is_quantized", False))


def training_scheduler(pipe: Any) -> DDPMScheduler:
    """The DDPM noise schedule the model was trained with, keeping its prediction type (epsilon or v)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()


def prediction_type(scheduler) -> str:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise FinetuneError(f"scheduler prediction_type {kind!r} is not supported; use epsilon or v_prediction")
    return kind
