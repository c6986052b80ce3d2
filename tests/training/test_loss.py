"""Targets and the prior-preservation loss, checked by hand on one real batch of the recipe."""
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from finetune.config import DataConfig
from finetune.data.dataset import (
    LatentSource,
    PromptEmbeddings,
    SampleOrder,
    class_examples,
    instance_examples,
    plan_batch,
    sample_generators,
)
from finetune.training.loss import diffusion_target, prior_preservation_loss
from tests.helpers import objective


def test_epsilon_target_is_the_noise_and_v_target_is_velocity():
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    eps = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), expected)


def test_prior_loss_formula():
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    loss, parts = prior_preservation_loss(pred, target, num_instance=2, prior_weight=0.3)
    inst = ((pred[:2] - target[:2]) ** 2).sum() / pred[:2].numel()
    cls = ((pred[2:] - target[2:]) ** 2).sum() / pred[2:].numel()
    torch.testing.assert_close(loss, inst + 0.3 * cls)
    torch.testing.assert_close(parts["prior_loss"], cls)
    alone, parts = prior_preservation_loss(pred[:2], target[:2], num_instance=2, prior_weight=0.3)
    torch.testing.assert_close(alone, inst)
    assert "prior_loss" not in parts


class SpyUNet(torch.nn.Module):
    """Records what the recipe feeds the U-Net and what it answered."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, noisy, timesteps, embeddings):
        out = self.unet(noisy, timesteps, embeddings)
        self.calls.append((noisy, timesteps, embeddings, out.sample))
        return out.sample


def test_recipe_batch_pairs_instances_with_class_prompt_and_loss_matches_hand(tiny_sd1, photos, tmp_path):
    from PIL import Image
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(class_dir / f"c{i}.png")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    instance = instance_examples(DataConfig(instance_dir=str(photos), instance_prompt="a photo of sks cat"))
    classes = class_examples(str(class_dir), "a photo of cat", 3)
    examples = instance + classes
    latents = LatentSource(pipe.vae, examples, 64, cache=True, flips=False, device="cpu")
    prompts = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, [e.prompt for e in examples], True, "cpu")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    plan = plan_batch(SampleOrder(0, 2, len(instance), len(classes)), 2)
    spy = SpyUNet(pipe.unet)
    loss, parts = objective(spy, scheduler, latents, prompts, examples, prior_weight=0.25)(plan)
    noisy, timesteps, embeddings, prediction = spy.calls[0]
    assert noisy.shape[0] == 4
    # Instance samples first with their own prompts, then class samples with the class prompt.
    want_prompts = [instance[i].prompt for i in plan.instance] + ["a photo of cat"] * 2
    for row, prompt in zip(embeddings, want_prompts):
        torch.testing.assert_close(row, prompts.encode([prompt])[0])
    # Rebuild the target from the same draws and compute the loss by hand.
    gens = sample_generators(0, plan)
    clean = latents.sample(plan.examples, plan.flips, plan.crops, gens)
    noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in gens])
    assert torch.equal(torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens]), timesteps)
    torch.testing.assert_close(noisy, scheduler.add_noise(clean, noise, timesteps))
    sq = (prediction - noise) ** 2
    hand = sq[:2].mean() + 0.25 * sq[2:].mean()
    torch.testing.assert_close(loss, hand)
    torch.testing.assert_close(parts["instance_loss"], sq[:2].mean())
