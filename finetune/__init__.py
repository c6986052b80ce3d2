"""finetune: DreamBooth and LoRA for latent diffusion models, on one GPU or a CPU."""
from .errors import ConfigError, FinetuneError

__version__ = "0.1.0"
__all__ = ["ConfigError", "FinetuneError", "__version__"]
