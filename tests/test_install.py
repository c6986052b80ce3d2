"""Issue 11: no version gate between finetune and peft, and `finetune env` for bug reports."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def refuse(*_, **__):
    raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 99.0.0")


@pytest.fixture
def integrations_unusable(monkeypatch):
    """transformers' version gate fails, and the gated integration methods of transformers and diffusers refuse.

    load_adapter carries no gate: it is how diffusers' own load_lora_weights puts LoRA into a text encoder, and
    stays usable so the reload below is what a user runs."""
    import diffusers.loaders.peft as diffusers_peft
    import transformers.integrations.peft as transformers_peft
    for name in ("add_adapter", "enable_adapters", "disable_adapters", "set_adapter"):
        monkeypatch.setattr(transformers_peft.PeftAdapterMixin, name, refuse)
    for name in ("add_adapter", "enable_adapters", "disable_adapters", "set_adapter"):
        monkeypatch.setattr(diffusers_peft.PeftAdapterMixin, name, refuse)
    monkeypatch.setattr(transformers_peft, "check_peft_version", refuse)


def test_text_encoder_lora_trains_exports_and_reloads_with_the_integrations_unusable(
        integrations_unusable, tiny_sd1, photos, tmp_path, run_cli):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "lora.text_encoder": "true", "train.max_steps": 3, "validation.prompts": "[a photo of sks dog]",
        "validation.every": 2, "validation.num_images": 1, "validation.steps": 2})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    keys = load_file(run / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") and "q_proj.lora" in k for k in keys)
    assert (run / "samples" / "step-000002.png").is_file() and (run / "samples" / "before_after.png").is_file()

    # diffusers' loader injects through peft directly: the file loads and changes both models' outputs.
    base = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.load_lora_weights(run)
    ids = torch.tensor([[512, 353, 112, 104, 111, 116, 367, 513]])
    with torch.no_grad():
        assert not torch.allclose(base.text_encoder(ids)[0], pipe.text_encoder(ids)[0])


def test_env_prints_every_line_a_bug_report_needs(run_cli):
    code, out, err = run_cli("env")
    assert code == 0, err
    lines = out.splitlines()
    for prefix in ("finetune:", "Python:", "torch:", "diffusers:", "transformers:", "peft:", "accelerate:",
                   "bitsandbytes:", "datasets:", "CUDA:", "bitsandbytes 8-bit AdamW:"):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert any(line.startswith(("known issue:", "known issues: none")) for line in lines)
    if not torch.cuda.is_available():
        assert "CUDA: no" in out and "8-bit AdamW: not usable: needs a CUDA GPU" in out


def test_known_issues_match_the_versions_they_name():
    from packaging.version import Version

    from finetune.env import KNOWN_ISSUES
    gated = {"transformers": Version("5.24.0"), "peft": Version("0.21.2"), "diffusers": Version("0.42.1")}
    fine = {"transformers": Version("5.23.0"), "peft": Version("0.21.2"), "diffusers": Version("0.42.1")}
    assert [i.text for i in KNOWN_ISSUES if i.applies(gated)][0].startswith("transformers >= 5.24 with peft < 0.22")
    assert not [i for i in KNOWN_ISSUES if i.applies(fine)]


def test_lora_disabled_gives_the_base_model_and_restores_the_lora(integrations_unusable, tiny_sd1):
    from finetune.config import LoraConfig
    from finetune.lora import add_text_encoder_lora, lora_disabled
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    encoder = pipe.text_encoder
    ids = torch.tensor([[512, 353, 112, 104, 111, 116, 367, 513]])
    with torch.no_grad():
        base = encoder(ids)[0]
        add_text_encoder_lora(encoder, LoraConfig(rank=2, alpha=2.0, text_encoder=True))
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
        with_lora = encoder(ids)[0]
        with lora_disabled([encoder]):
            disabled = encoder(ids)[0]
        again = encoder(ids)[0]
    assert not torch.allclose(with_lora, base)
    assert torch.equal(disabled, base) and torch.equal(again, with_lora)
