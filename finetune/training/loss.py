"""The denoising loss, its target (noise or v) and prior preservation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon models) or the velocity v (v-prediction models)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int,
                            prior_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE on the instance samples + prior_weight x MSE on the class samples that follow them in the batch."""
    prediction, target = prediction.float(), target.float()
    instance = F.mse_loss(prediction[:num_instance], target[:num_instance])
    if prediction.shape[0] == num_instance:
        return instance, {"instance_loss": instance.detach()}
    prior = F.mse_loss(prediction[num_instance:], target[num_instance:])
    return instance + prior_weight * prior, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}


def add_noise(scheduler, latents: torch.Tensor, generators: list[torch.Generator]):
    """Noise the latents, sample k's noise and timestep drawn from generators[k]: (noisy, noise, timesteps).

    One generator per sample, so a sample gets the same draws whatever batch (or process) it lands in.
    """
    shape, device, count = (1, *latents.shape[1:]), latents.device, scheduler.config.num_train_timesteps
    noise = torch.cat([torch.randn(shape, generator=g, device=device, dtype=latents.dtype) for g in generators])
    timesteps = torch.cat([torch.randint(0, count, (1,), generator=g, device=device) for g in generators])
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


@torch.no_grad()
def denoising_loss(unet, scheduler, latents, embeddings, noise, timesteps) -> float:
    """Mean denoising MSE on given (latents, noise, timesteps): the yardstick of whether training helped."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, embeddings).sample
    return F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps).float()).item()
