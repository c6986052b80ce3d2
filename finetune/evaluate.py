"""Did training help? The denoising loss on the subject's photos at fixed (noise, timestep) draws."""
from __future__ import annotations

import torch

from .data.dataset import Example, LatentSource, PromptEmbeddings
from .training.loss import denoising_loss


@torch.no_grad()
def instance_denoising_loss(unet, text_encoder, tokenizer, vae, scheduler, examples: list[Example],
                            resolution: int, seed: int = 123, draws: int = 4) -> float:
    """Mean denoising MSE over `draws` fixed noisings of each photo, each with its own caption or prompt.

    The same seed gives the same noise and timesteps, so base and trained models compare one to one.
    """
    device = next(unet.parameters()).device
    latents = LatentSource(vae, examples, resolution, cache=True, flips=False, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    indices = list(range(len(examples)))
    clean = torch.cat([latents.sample(indices, [False] * len(indices), None, [generator] * len(indices))
                       for _ in range(draws)])
    noise = torch.randn(clean.shape, generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator,
                              device=device)
    prompts = PromptEmbeddings(tokenizer, text_encoder, [], cache=False, device=device)
    embeddings = prompts([e.prompt for e in examples] * draws).to(clean.dtype)
    return denoising_loss(unet, scheduler, clean, embeddings, noise, timesteps)
