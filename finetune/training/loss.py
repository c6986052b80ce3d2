"""The denoising loss, its target (noise or v), prior preservation, and DreamBooth's objective per micro-batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.dataset import plan_prompts, sample_generators


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon models) or the velocity v (v-prediction models)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int,
                            prior_weight: float, weights: torch.Tensor | None = None,
                            pixel_weights: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE on the instance samples + prior_weight x MSE on the class samples that follow them in the batch.

    `weights` (one per sample, e.g. min-SNR) scale each sample's MSE before the means; `pixel_weights`
    (batch, 1, h, w), from loss masks, scale each latent pixel's squared error before its sample's mean.
    """
    prediction, target = prediction.float(), target.float()

    def mse(part: slice) -> torch.Tensor:
        if weights is None and pixel_weights is None:
            return F.mse_loss(prediction[part], target[part])
        error = (prediction[part] - target[part]) ** 2
        if pixel_weights is not None:
            error = error * pixel_weights[part]
        per_sample = error.mean(dim=tuple(range(1, prediction.ndim)))
        return per_sample.mean() if weights is None else (per_sample * weights[part].float()).mean()

    instance = mse(slice(0, num_instance))
    if prediction.shape[0] == num_instance:
        return instance, {"instance_loss": instance.detach()}
    prior = mse(slice(num_instance, None))
    return instance + prior_weight * prior, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}


def mask_loss_weights(masks: list[torch.Tensor | None], background: float, latents: torch.Tensor
                      ) -> torch.Tensor | None:
    """Per latent pixel loss weights (batch, 1, h, w) from the samples' masks on the latent grid: 1 on the subject
    (mask 1), `background` (data.mask_weight) where the mask is 0, linear in between; 1 everywhere for a sample
    without a mask (class images). None when no sample has one: the loss is then the plain MSE."""
    if all(mask is None for mask in masks):
        return None
    ones = torch.ones((1, *latents.shape[-2:]), device=latents.device)
    return torch.stack([ones if m is None else background + (1 - background) * m.to(latents.device)
                        for m in masks])


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample, for the scheduler's prediction type.

    SNR(t) = abar_t / (1 - abar_t). The MSE on x0 weighted by min(SNR, gamma) becomes, on the network's
    target: min(SNR, gamma) / SNR for epsilon, and min(SNR, gamma) / (SNR + 1) for v.
    """
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (clipped / snr).float()
    if kind == "v_prediction":
        return (clipped / (snr + 1)).float()
    raise ValueError(f"unsupported prediction_type {kind!r}")


def add_noise(scheduler, latents: torch.Tensor, generators: list[torch.Generator], noise_offset: float = 0.0):
    """Noise the latents, sample k's noise and timestep drawn from generators[k]: (noisy, noise, timesteps).

    One generator per sample, so a sample gets the same draws whatever batch (or process) it lands in. A noise
    offset adds noise_offset x one normal draw per channel (constant over the image, drawn after the timestep
    from the sample's generator), so the model can learn to change an image's mean brightness.
    """
    shape, device, count = (1, *latents.shape[1:]), latents.device, scheduler.config.num_train_timesteps
    noise = torch.cat([torch.randn(shape, generator=g, device=device, dtype=latents.dtype) for g in generators])
    timesteps = torch.cat([torch.randint(0, count, (1,), generator=g, device=device) for g in generators])
    if noise_offset:
        offset = torch.cat([torch.randn((1, latents.shape[1], 1, 1), generator=g, device=device, dtype=latents.dtype)
                            for g in generators])
        noise = noise + noise_offset * offset
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


@torch.no_grad()
def denoising_loss(unet, scheduler, latents, embeddings, noise, timesteps) -> float:
    """Mean denoising MSE on given (latents, noise, timesteps): the yardstick of whether training helped."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, embeddings).sample
    return F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps).float()).item()


class DreamBoothObjective:
    """DreamBooth's loss on one planned micro-batch: call it with a BatchPlan, get (loss, {part: value}).

    Sample k of the plan draws its latent noise, diffusion noise and timestep from a generator keyed by its
    position, and its caption variant likewise, so a sample is the same on any process count and after a resume.
    `conditioning(prompts, geometry)` gives the model family's U-Net conditioning (SD: text embeddings; SDXL: also
    pooled embeddings and size/crop ids); `unet_call(noisy, timesteps, *conditioning)` is the U-Net's prediction.
    """

    def __init__(self, unet_call, noise_scheduler, latents, conditioning, examples, cfg, device):
        self.unet_call, self.noise_scheduler, self.latents = unet_call, noise_scheduler, latents
        self.conditioning, self.examples, self.device = conditioning, examples, device
        self.seed, self.data, self.options, self.prior_weight = cfg.train.seed, cfg.data, cfg.loss, \
            cfg.prior.loss_weight

    def __call__(self, plan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generators = sample_generators(self.seed, plan, self.device)
        clean, geometry, masks = self.latents.sample_batch(plan.examples, plan.flips, plan.crops, generators,
                                                           plan.size)
        noisy, noise, timesteps = add_noise(self.noise_scheduler, clean, generators, self.options.noise_offset)
        condition = self.conditioning(plan_prompts(self.seed, plan, self.examples, self.data), geometry)
        prediction = self.unet_call(noisy, timesteps, *condition)
        target = diffusion_target(self.noise_scheduler, clean, noise, timesteps)
        weights = min_snr_weights(self.noise_scheduler, timesteps, self.options.snr_gamma) \
            if self.options.snr_gamma else None
        return prior_preservation_loss(prediction, target, len(plan.instance), self.prior_weight, weights,
                                       mask_loss_weights(masks, self.data.mask_weight, clean))
