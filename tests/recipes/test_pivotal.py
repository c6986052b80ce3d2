"""Pivotal tuning (lora.pivotal) through the CLI on tiny SD and SDXL models: new tokens, only their rows train (at
their own learning rate, until their stop step), the exported embeddings load in diffusers and change what it
draws, the UIs' files have the keys their loaders look for, generate uses them, and resume is bitwise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from recipes import dreambooth_lora, sdxl_dreambooth_lora
from tests.helpers import SD15, SDXL, sdxl_overrides, tiny_overrides

TOKENS = ["<s0>", "<s1>"]
PIVOTAL_LR = 3e-3


def class_mean(encoder, tokenizer, word: str) -> torch.Tensor:
    """The textual inversion initializer, computed here from the base model: the mean embedding of the word's tokens."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight.detach()[ids].mean(dim=0)


def a1111_bundled(tensors: dict) -> dict:
    """What AUTOMATIC1111's Lora extension (extensions-builtin/Lora/networks.py, load_network) collects from a LoRA
    file's `bundle_emb.` keys: {name: data}, data as its textual_inversion.create_embedding_from_data reads it."""
    found: dict = {}
    for key, weight in tensors.items():
        head, _, rest = key.partition(".")
        if head != "bundle_emb":
            continue
        name, vec_name = rest.split(".", 1)
        data = found.setdefault(name, {})
        if vec_name.split(".")[0] == "string_to_param":
            data["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
        else:
            data[vec_name] = weight
    return found


def comfy_bundled(tensors: dict, suffix: str) -> torch.Tensor | None:
    """ComfyUI's comfy/sd1_clip.py bundled_embed: the keys between 'bundle_emb.' and `suffix`, concatenated."""
    parts = [v for k, v in tensors.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
    return torch.cat(parts) if parts else None


@torch.no_grad()
def prompt_embeds(pipe, prompt: str) -> torch.Tensor:
    return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def trained(module, monkeypatch) -> list:
    results: list = []
    real = module.main
    monkeypatch.setattr(module, "main", lambda cfg: results.append(real(cfg)))
    return results


def test_sd_only_new_rows_train_at_their_rate_until_their_stop_and_every_client_reads_them(
        tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    results = trained(dreambooth_lora, monkeypatch)
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "lora.pivotal": "true", "lora.pivotal_word": "sks",
        "lora.pivotal_learning_rate": PIVOTAL_LR, "lora.pivotal_stop_step": 1, "train.weight_decay": 0,
        "train.max_steps": 3, "train.checkpoint_every": 1, "export.kohya_precision": "fp32",
        "validation.prompts": "[a photo of sks dog]", "validation.steps": 2, "validation.num_images": 1}))
    assert code == 0, err
    run = tmp_path / "run"
    base = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    vocab = len(base.tokenizer)
    matrix = results[0].text_encoder.get_input_embeddings().weight.detach()
    original = base.text_encoder.get_input_embeddings().weight.detach()
    # Two new rows; every other row is bit-identical to the base model's.
    assert matrix.shape[0] == vocab + 2
    assert torch.equal(matrix[:vocab], original)
    exported = load_file(run / "embeddings.safetensors")
    assert set(exported) == {"clip_l"} and exported["clip_l"].shape == (2, original.shape[1])
    assert torch.equal(matrix[vocab:], exported["clip_l"])

    # One Adam step (no weight decay) moves each element by the group's own learning rate: 3e-3, not the LoRA's.
    start = class_mean(base.text_encoder, base.tokenizer, "dog")
    step = (exported["clip_l"] - start).abs()
    assert (step - PIVOTAL_LR).abs().lt(1e-5).float().mean() > 0.95, step
    # Fixed from the stop step on (step 1), while the LoRA went on training.
    at_stop = load_file(run / "checkpoints" / "step-000001" / "embeddings.safetensors")["clip_l"]
    assert torch.equal(at_stop, exported["clip_l"])
    lora_1 = load_file(run / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors")
    lora_3 = load_file(run / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(lora_1[k], lora_3[k]) for k in lora_3)

    # diffusers: the LoRA and the embeddings load as its advanced script's README loads them; the prompt then
    # encodes as the trained text encoder encoded it, and differs from the untrained tokens'.
    base.load_lora_weights(run)
    base.load_textual_inversion(exported["clip_l"], token=TOKENS, text_encoder=base.text_encoder,
                                tokenizer=base.tokenizer)
    prompt = "a photo of <s0><s1> dog"
    ids = base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    at = ids[0].tolist().index(vocab)
    assert ids[0, at + 1] == vocab + 1  # the two new tokens, side by side
    with torch.no_grad():
        want = results[0].text_encoder(ids)[0]
    torch.testing.assert_close(prompt_embeds(base, prompt), want, rtol=0, atol=1e-6)
    untrained = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    untrained.load_textual_inversion(start.repeat(2, 1), token=TOKENS, text_encoder=untrained.text_encoder,
                                     tokenizer=untrained.tokenizer)
    assert (prompt_embeds(untrained, prompt) - want).abs().max() > 1e-4

    # A1111 / ComfyUI embeddings folder: embeddings/sks.safetensors, one tensor under sd-scripts' emb_params.
    ui = load_file(run / "embeddings" / "sks.safetensors")
    assert set(ui) == {"emb_params"} and torch.equal(ui["emb_params"], exported["clip_l"])
    # The kohya file bundles them as sd-scripts does; A1111's and ComfyUI's readers of those keys find them.
    kohya = load_file(run / "run.safetensors")
    assert [k for k in kohya if k.startswith("bundle_emb.")] == ["bundle_emb.sks.string_to_param.*"]
    a1111 = a1111_bundled(kohya)
    assert list(a1111) == ["sks"] and torch.equal(a1111["sks"]["string_to_param"]["*"], exported["clip_l"])
    assert torch.equal(comfy_bundled(kohya, ".string_to_param.*"), exported["clip_l"])
    # ... which diffusers' own loader refuses, as the export's notice says (export.bundle_embeddings=false).
    with pytest.raises(ValueError, match="lora"):
        StableDiffusionPipeline.from_pretrained(tiny_sd1).load_lora_weights(run / "run.safetensors")
    with safe_open(str(run / "embeddings.safetensors"), "pt") as handle:
        assert handle.metadata()["finetune.pivotal_tokens"] == '["<s0>", "<s1>"]'

    # Validation drew with the trained tokens: its LoRA row is what generate draws with the run's LoRA and
    # embeddings, and its base row the base model with the prompt as written.
    grid = Image.open(run / "samples" / "before_after.png")
    cells = json.loads(grid.text["finetune"])["grid"]  # where each cell is, under its legend
    assert [c["lora"] for c in cells] == [False, True]
    common = ["--steps", 2, "--scheduler", "dpm++", "--seed", 0, "--guidance", 7.5]
    rows = {"base": grid.crop(cells[0]["box"]), "lora": grid.crop(cells[1]["box"])}
    drawn = {"base": pixels(draw(run_cli, tiny_sd1, tmp_path / "g-base", "a photo of sks dog", *common)),
             "lora": pixels(draw(run_cli, tiny_sd1, tmp_path / "g-lora", "a photo of sks dog", *common, run))}
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "embeddings.safetensors").unlink()
    without = pixels(draw(run_cli, tiny_sd1, tmp_path / "g-bare", "a photo of sks dog", *common, bare))
    for name, row in rows.items():
        assert (pixels(row.tobytes()) - drawn[name]).abs().max() <= 2, name
    assert (pixels(rows["lora"].tobytes()) - without).abs().max() > 2


@pytest.fixture(scope="module")
def pivotal_run(tiny_sd1, photos_master, tmp_path_factory):
    """A pivotal-tuned SD run (2 steps, fp32 kohya file with bundled embeddings)."""
    from finetune.cli import main
    root = tmp_path_factory.mktemp("pivotal")
    assert main(["train", SD15, *tiny_overrides(tiny_sd1, photos_master, root, **{
        "prior.num_class_images": 0, "lora.pivotal": "true", "lora.pivotal_word": "sks", "train.max_steps": 2,
        "lora.pivotal_learning_rate": 5e-2, "lora.pivotal_stop_step": 2, "export.kohya_precision": "fp32",
        "lora.pivotal_init": "random"})]) == 0
    return root / "run"


def draw(run_cli, model, out, prompt, *options):
    """The first image `finetune generate` draws (2 DDIM steps at 64 px unless `options` say otherwise); a bare
    path among the options is a --lora."""
    args = ["generate", "--model", model, "--prompt", prompt, "--steps", 2, "--resolution", 64, "--scheduler",
            "ddim", "--out", out]
    for option in options:
        args += ["--lora", option] if isinstance(option, Path) else [option]
    code, _, err = run_cli(*args)
    assert code == 0, err
    return Image.open(out / "0000.png").tobytes()


def pixels(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.float32)


def test_generate_loads_the_embeddings_with_the_lora_so_the_word_works(tiny_sd1, pivotal_run, tmp_path, run_cli):
    with_word = draw(run_cli, tiny_sd1, tmp_path / "word", "a photo of sks dog", pivotal_run)
    # The word stands for the trained tokens: written as the training tokens, the same image.
    assert draw(run_cli, tiny_sd1, tmp_path / "tokens", "a photo of <s0><s1> dog", pivotal_run) == with_word
    # The kohya file's bundled embeddings (fp32 here) do the same.
    assert draw(run_cli, tiny_sd1, tmp_path / "kohya", "a photo of sks dog", pivotal_run / "run.safetensors") \
        == with_word
    # Without the embeddings file the word is three letters again: another image.
    bare = tmp_path / "bare"
    shutil.copytree(pivotal_run, bare)
    (bare / "embeddings.safetensors").unlink()
    assert draw(run_cli, tiny_sd1, tmp_path / "plain", "a photo of sks dog", bare) != with_word


def test_resume_restores_the_embeddings_bitwise(tiny_sd1, photos, tmp_path, run_cli):
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "lora.pivotal": "true", "lora.pivotal_word": "sks",
        "lora.pivotal_stop_step": 4, "lora.pivotal_learning_rate": 1e-2, "train.checkpoint_every": 2,
        "export.bundle_embeddings": "false"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("train", SD15, *common, "train.max_steps=4", f"output_dir={straight}")[0] == 0
    assert run_cli("train", SD15, *common, "train.max_steps=2", f"output_dir={resumed}")[0] == 0
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=4", f"output_dir={resumed}",
                           "train.resume=latest")
    assert code == 0, err
    a, b = load_file(straight / "embeddings.safetensors"), load_file(resumed / "embeddings.safetensors")
    halfway = load_file(resumed / "checkpoints" / "step-000002" / "embeddings.safetensors")
    assert torch.equal(a["clip_l"], b["clip_l"]) and not torch.equal(a["clip_l"], halfway["clip_l"])
    # Unbundled, the kohya file is one diffusers loads.
    assert not any(k.startswith("bundle_emb.") for k in load_file(resumed / "resumed.safetensors"))
    StableDiffusionPipeline.from_pretrained(tiny_sd1).load_lora_weights(resumed / "resumed.safetensors")
    # Resuming with the tokens off is refused before anything loads.
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=6", f"output_dir={resumed}",
                           "train.resume=latest", "lora.pivotal=false")
    assert code == 2 and "lora.pivotal" in err and err.count("\n") == 1, err


def test_sdxl_trains_new_rows_in_both_encoders_and_exports_both(tiny_sdxl, photos, tmp_path, run_cli, monkeypatch):
    results = trained(sdxl_dreambooth_lora, monkeypatch)
    code, _, err = run_cli("train", SDXL, *sdxl_overrides(tiny_sdxl, photos, tmp_path, **{
        "lora.pivotal": "true", "train.max_steps": 2, "lora.pivotal_learning_rate": 1e-2}))
    assert code == 0, err  # the word comes from data.trigger ('sks cat'): sks
    run = tmp_path / "run"
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    exported = load_file(run / "embeddings.safetensors")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    for trained_encoder, encoder, tokenizer, key in zip(results[0].text_encoders,
                                                        (base.text_encoder, base.text_encoder_2),
                                                        (base.tokenizer, base.tokenizer_2), ("clip_l", "clip_g")):
        vocab = len(tokenizer)
        matrix = trained_encoder.get_input_embeddings().weight.detach()
        assert torch.equal(matrix[:vocab], encoder.get_input_embeddings().weight.detach())
        assert torch.equal(matrix[vocab:], exported[key])
        assert (exported[key] - class_mean(encoder, tokenizer, "dog")).abs().max() > 1e-3  # data.class_prompt's
    # diffusers: loaded twice, one encoder and tokenizer each; the prompt then encodes as training encoded it.
    prompt = "a photo of <s0><s1> cat"
    before = prompt_embeds(base, prompt)
    base.load_lora_weights(run)
    base.load_textual_inversion(exported["clip_l"], token=TOKENS, text_encoder=base.text_encoder,
                                tokenizer=base.tokenizer)
    base.load_textual_inversion(exported["clip_g"], token=TOKENS, text_encoder=base.text_encoder_2,
                                tokenizer=base.tokenizer_2)
    ids = base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = torch.cat([encoder(ids, output_hidden_states=True).hidden_states[-2]
                          for encoder in results[0].text_encoders], dim=-1)
    got = prompt_embeds(base, prompt)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-3
    # The UIs: clip_l / clip_g in the embeddings file and in the kohya file's bundle.
    ui = load_file(run / "embeddings" / "sks.safetensors")
    assert set(ui) == {"clip_l", "clip_g"}
    kohya = load_file(run / "run.safetensors")
    assert sorted(k for k in kohya if k.startswith("bundle_emb.")) == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]
    data = a1111_bundled(kohya)["sks"]
    assert "clip_g" in data and "clip_l" in data  # A1111's SDXL embedding branch
    assert torch.equal(comfy_bundled(kohya, ".clip_g"), exported["clip_g"])  # fp32, whatever the LoRA's precision
    # finetune generate reads the bundled pair back into both encoders.
    code, _, err = run_cli("generate", "--model", tiny_sdxl, "--lora", run / "run.safetensors", "--prompt",
                           "a photo of sks cat", "--steps", 1, "--resolution", 64, "--out", tmp_path / "gen")
    assert code == 0, err


@pytest.mark.parametrize("overrides, message", [
    ({"lora.pivotal": "true", "data.trigger": ""}, "lora.pivotal_word: lora.pivotal needs the word"),
    ({"lora.pivotal": "true", "lora.pivotal_word": "two words"}, "lora.pivotal_word: must be one word (letters"),
    ({"lora.pivotal": "true", "lora.pivotal_word": "zebra"}, "lora.pivotal_word: 'zebra' is in none of the"),
    ({"lora.pivotal": "true", "lora.pivotal_word": "dog", "prior.num_class_images": 2},
     "data.class_prompt: 'a photo of dog' holds lora.pivotal's word 'dog'"),
    ({"lora.pivotal_init": "zeros"}, "lora.pivotal_init: 'zeros' is not one of class, random"),
    ({"lora.pivotal": "true", "data.trigger": "'sks, dog'"}, "lora.pivotal_word: data.trigger's first word 'sks,'"),
])
def test_bad_pivotal_settings_are_one_line_before_anything_loads(tiny_sd1, photos, tmp_path, run_cli, overrides,
                                                                 message):
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **overrides))
    assert code == 2 and err.startswith("finetune: error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_export_carries_the_embeddings_both_ways_and_into_a_fused_folder(tiny_sd1, pivotal_run, tmp_path, run_cli):
    embeddings = load_file(pivotal_run / "embeddings.safetensors")["clip_l"]
    code, _, err = run_cli("export", pivotal_run, "--format", "kohya", "--precision", "fp32", "--out",
                           tmp_path / "k.safetensors")
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "k.safetensors")["bundle_emb.sks.string_to_param.*"], embeddings)
    code, _, err = run_cli("export", tmp_path / "k.safetensors", "--format", "diffusers", "--out", tmp_path / "d")
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "d" / "embeddings.safetensors")["clip_l"], embeddings)
    assert torch.equal(load_file(tmp_path / "d" / "embeddings" / "sks.safetensors")["emb_params"], embeddings)
    want = draw(run_cli, tiny_sd1, tmp_path / "run-img", "a photo of sks dog", pivotal_run)
    assert draw(run_cli, tiny_sd1, tmp_path / "d-img", "a photo of sks dog", tmp_path / "d") == want
    # Fused into a diffusers folder, the tokenizer holds the training tokens with their trained rows.
    code, _, err = run_cli("export", pivotal_run, "--fuse", "--base", tiny_sd1, "--out", tmp_path / "fused")
    assert code == 0, err
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    ids = fused.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(fused.text_encoder.get_input_embeddings().weight.detach()[ids], embeddings)


def test_the_model_cards_diffusers_snippet_runs_with_the_tokens(pivotal_run):
    card = (pivotal_run / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'pipe("a photo of <s0><s1> dog")' in code and "embeddings/sks.safetensors" in card
    # Run as a user would, on the CPU in fp32, with the card's placeholders filled in.
    code = code.replace("path/to/this/folder", str(pivotal_run)).replace('.to("cuda")', "")
    code = code.replace("torch.float16", "torch.float32").replace(".images[0]", "")
    scope: dict = {}
    exec(code.replace('dog")', 'dog", num_inference_steps=1)'), scope)  # noqa: S102 - the card's own code
    tokenizer = scope["pipe"].tokenizer
    assert tokenizer.convert_tokens_to_ids(TOKENS) == [len(tokenizer) - 2, len(tokenizer) - 1]


def test_show_config_docs_lists_every_pivotal_key(run_cli):
    code, out, _ = run_cli("show-config", SDXL, "--docs")
    assert code == 0
    keys = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"lora.pivotal", "lora.pivotal_word", "lora.pivotal_tokens", "lora.pivotal_init", "lora.pivotal_class_word",
            "lora.pivotal_learning_rate", "lora.pivotal_stop_step", "export.bundle_embeddings"} <= keys
