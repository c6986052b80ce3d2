"""Min-SNR-gamma weights and noise offset by hand, and the v-prediction target through the recipe on tiny SD2."""
import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from finetune.config import DataConfig, LossConfig
from finetune.data.dataset import (
    LatentSource,
    PromptEmbeddings,
    SampleOrder,
    instance_examples,
    plan_batch,
    sample_generators,
)
from finetune.models import training_scheduler
from finetune.training.loss import add_noise, min_snr_weights, prior_preservation_loss
from tests.helpers import objective
from tests.training.test_loss import SpyUNet


def hand_snr(t):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)[t]
    return abar / (1 - abar)


def test_min_snr_weights_against_hand_computed_values():
    t = torch.tensor([10, 500, 999])
    snr = hand_snr(np.array([10, 500, 999]))
    assert snr[0] > 5 > snr[1]  # one clipped timestep, two not
    for kind, expected in [("epsilon", np.minimum(snr, 5) / snr), ("v_prediction", np.minimum(snr, 5) / (snr + 1))]:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=kind)
        got = min_snr_weights(scheduler, t, 5.0)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # t=10: SNR = 1/(1-abar) - 1 with abar = (1-0.00085)(1-beta_1)...: about 98.7, so epsilon weight 5/98.7
    assert abs(min_snr_weights(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                               t[:1], 5.0).item() - 5 / snr[0]) < 1e-6


def test_weighted_loss_and_noise_offset_by_hand():
    pred, target, w = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.5, 2.0, 1.0])
    loss, parts = prior_preservation_loss(pred, target, 2, 0.3, w)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per[:2] * w[:2]).mean() + 0.3 * per[2] * w[2])
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(2, 4, 8, 8)
    _, noise, t = add_noise(scheduler, latents, [torch.Generator().manual_seed(k) for k in range(2)],
                            noise_offset=0.1)
    for k in range(2):  # sample k: its noise, timestep, then its per-channel offset, all from its own generator
        g = torch.Generator().manual_seed(k)
        base = torch.randn(1, 4, 8, 8, generator=g)
        assert torch.equal(torch.randint(0, 1000, (1,), generator=g), t[k:k + 1])
        offset = torch.randn(1, 4, 1, 1, generator=g)
        torch.testing.assert_close(noise[k:k + 1], base + 0.1 * offset)


def test_recipe_trains_sd2_against_v_with_min_snr(tiny_sd2, photos):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2)
    scheduler = training_scheduler(pipe)
    assert scheduler.config.prediction_type == "v_prediction"
    examples = instance_examples(DataConfig(instance_dir=str(photos)))
    latents = LatentSource(pipe.vae, examples, 64, cache=True, flips=False, device="cpu")
    prompts = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, [e.prompt for e in examples], True, "cpu")
    plan = plan_batch(SampleOrder(0, 3, len(examples)), 1)
    spy = SpyUNet(pipe.unet)
    loss, _ = objective(spy, scheduler, latents, prompts, examples, loss=LossConfig(snr_gamma=5.0))(plan)
    _, timesteps, _, prediction = spy.calls[0]
    gens = sample_generators(0, plan)
    clean = latents.sample(plan.instance, plan.flips, plan.crops, gens)
    noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in gens])
    assert torch.equal(torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens]), timesteps)
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)[timesteps.numpy()])
    a = abar.float().view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * clean           # the velocity, by hand
    snr = abar / (1 - abar)
    weights = (snr.clamp(max=5) / (snr + 1)).float()
    hand = (((prediction - v) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-4, atol=1e-6)
    eps_loss = ((prediction - noise) ** 2).mean()
    assert not torch.isclose(loss, eps_loss)
