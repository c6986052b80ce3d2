"""lora.type=lora|dora|loha|lokr: each trains through the recipe, exports, and reloads with the trained model's outputs.

Oracles, independent of finetune's own reader:
- diffusers' `pipe.load_lora_weights(run folder)` for LoRA and DoRA;
- the UIs' own formulas for the kohya/LyCORIS file, applied by hand to the base weights and compared with the
  trained layer's effective weight (the layer run on the identity matrix). From the clients' source, read with
  the search tool: ComfyUI comfy/weight_adapter/loha.py (`(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / w1_b.shape[0]`),
  lokr.py (`kron(w1, w2)`, scaled by alpha / lokr_w2_b.shape[0] when w2 is factored, by 1 when lokr_w2 is full, as
  A1111's network_lokr.py: "dim" unset), lora.py (`up @ down * alpha / down.shape[0]`); DoRA as LyCORIS
  lycoris/modules/locon.py apply_weight_decompose with wd_on_out (dora_scale of shape (out, 1), each row of
  W + dW scaled to it), the layout ComfyUI's weight_adapter/base.py weight_decompose detects by
  dora_scale.shape[0] == weight.shape[0]. Key names: `lora_unet_` / `lora_te_` + the module path with `_`, the
  diffusers-style names both UIs map (comfy/lora.py model_lora_keys_unet, A1111 networks.py).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import load_recipe_config
from finetune.config import LoraConfig
from finetune.export.diffusers_format import WEIGHT_NAME, read_header
from finetune.export.lora_weights import load_into_models, read_lora
from finetune.lora import add_text_encoder_lora, add_unet_lora, tuner_layers
from tests.helpers import SD15, tiny_overrides

RANKS = {"lora": 2, "dora": 2, "loha": 2, "lokr": 2}
KOHYA_PARTS = {  # the part names each client's loader looks for, besides .alpha
    "lora": {"lora_down.weight", "lora_up.weight"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
}


def train_type(kind: str, base, root, **extra):
    """Train lora.type=kind through the recipe (2 steps, text-encoder adapter, fp32 kohya file)."""
    from finetune.demo import prepare_photos
    prepare_photos(root / "photos")
    overrides = tiny_overrides(base, root / "photos", root, **{
        "prior.num_class_images": 0, "lora.type": kind, "lora.rank": RANKS[kind], "lora.alpha": 6,
        "lora.text_encoder": "true", "train.max_steps": 2, "train.learning_rate": 5e-2, "export.kohya": "true",
        "export.kohya_precision": "fp32", "train.checkpoint_every": 1, "validation.prompts": "[]", **extra})
    module, cfg = load_recipe_config(SD15, overrides)
    return module.main(cfg), overrides


@pytest.fixture(scope="module", params=["lora", "dora", "loha", "lokr"])
def trained(request, tiny_sd1, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"typed-{kind}")
    result, overrides = train_type(kind, tiny_sd1, root)
    result.unet.eval(), result.text_encoder.eval()
    return kind, root / "run", result, overrides


def probe_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            torch.randint(0, 40, (1, 77), generator=g))


@torch.no_grad()
def outputs(unet, text_encoder, inputs):
    latents, embeddings, ids = inputs
    return unet(latents, 10, embeddings).sample, text_encoder(ids)[0]


def fresh_pipeline(base):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(base)


def test_each_type_trains_and_its_file_says_so(trained):
    kind, run, result, _ = trained
    header = read_header(run / WEIGHT_NAME)
    assert header["finetune.type"] == kind
    layers = tuner_layers(result.unet)
    assert layers and all(type(layer).__module__.split(".")[-2] == ("lora" if kind == "dora" else kind)
                          for layer in layers)
    trained_params = {n for n, p in result.unet.named_parameters() if p.requires_grad}
    piece = {"lora": "lora_B", "dora": "lora_magnitude_vector", "loha": "hada_w2_b", "lokr": "lokr_w1"}[kind]
    assert any(piece in n for n in trained_params)


def test_our_reader_reloads_both_files_with_the_trained_outputs(trained, tiny_sd1):
    kind, run, result, _ = trained
    inputs = probe_inputs(result.unet)
    want = outputs(result.unet, result.text_encoder, inputs)
    for path in (run / WEIGHT_NAME, run / "run.safetensors"):
        pipe = fresh_pipeline(tiny_sd1)
        lora = LoraConfig(type=kind, rank=RANKS[kind], alpha=6.0, text_encoder=True)
        add_unet_lora(pipe.unet, lora)
        add_text_encoder_lora(pipe.text_encoder, lora)
        weights = read_lora(path, pipe.unet.config)
        assert weights.kind == kind
        load_into_models(weights, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, path)
        got = outputs(pipe.unet.eval(), pipe.text_encoder.eval(), inputs)
        base = outputs(*_base(tiny_sd1), inputs)
        for g, w, b in zip(got, want, base):
            assert not torch.allclose(w, b, atol=1e-4), "training changed nothing: the check would be empty"
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def _base(model):
    pipe = fresh_pipeline(model)
    return pipe.unet.eval(), pipe.text_encoder.eval()


def test_diffusers_reloads_lora_and_dora_exactly_and_refuses_loha_lokr(trained, tiny_sd1):
    kind, run, result, _ = trained
    pipe = fresh_pipeline(tiny_sd1)
    if kind in ("loha", "lokr"):
        with pytest.raises(ValueError):  # diffusers cannot tell the layout: it refuses, it does not misread
            pipe.load_lora_weights(run)
        return
    pipe.load_lora_weights(run)
    inputs = probe_inputs(result.unet)
    for got, want in zip(outputs(pipe.unet, pipe.text_encoder, inputs), outputs(result.unet, result.text_encoder,
                                                                                 inputs)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def client_weight(kind: str, base: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merged weight a UI computes from one kohya module (the formulas in this module's docstring)."""
    alpha = float(parts["alpha"])
    if kind in ("lora", "dora"):
        merged = base + parts["lora_up.weight"] @ parts["lora_down.weight"] * alpha / parts["lora_down.weight"].shape[0]
        if kind == "lora":
            return merged
        scale = parts["dora_scale"]
        assert scale.shape == (base.shape[0], 1)  # ComfyUI's output-axis test: dora_scale.shape[0] == rows
        return merged * scale / (merged.norm(dim=1, keepdim=True) + torch.finfo(merged.dtype).eps)
    if kind == "loha":
        return base + (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * \
            alpha / parts["hada_w1_b"].shape[0]
    if "lokr_w2" in parts:
        return base + torch.kron(parts["lokr_w1"], parts["lokr_w2"])  # full w2: alpha ignored
    w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    return base + torch.kron(parts["lokr_w1"], w2) * alpha / parts["lokr_w2_b"].shape[0]


def kohya_modules(prefix: str, model) -> dict:
    """kohya name -> adapted layer, named the way the UIs map diffusers-style names (by hand, not finetune's)."""
    found = {}
    for name, module in model.named_modules():
        if module in tuner_layers(model):
            path = name if prefix == "lora_unet" or name.startswith("text_model.") else "text_model." + name
            found[f"{prefix}_{path.replace('.', '_')}"] = module
    return found


@torch.no_grad()
def test_kohya_file_has_the_clients_keys_and_their_formulas_give_the_trained_weights(trained):
    kind, run, result, _ = trained
    tensors = load_file(run / "run.safetensors")
    layers = {**kohya_modules("lora_unet", result.unet), **kohya_modules("lora_te", result.text_encoder)}
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = value
    assert set(groups) == set(layers)
    for name, parts in groups.items():
        assert set(parts) - {"alpha"} <= KOHYA_PARTS[kind] | {"lokr_w2"}, (name, sorted(parts))
        assert float(parts["alpha"]) == 6.0
        layer = layers[name]
        base = layer.get_base_layer()
        bias = base.bias if base.bias is not None else 0
        effective = (layer(torch.eye(base.in_features)) - bias).T
        torch.testing.assert_close(client_weight(kind, base.weight, parts), effective, atol=2e-5, rtol=1e-4)
    header = read_header(run / "run.safetensors")
    assert header["ss_network_dim"] == str(RANKS[kind]) and header["ss_network_alpha"] == "6"
    assert json.loads(header["ss_network_args"]).get("algo", "lora") == ("lora" if kind == "dora" else kind)


def test_resume_continues_every_type_bit_for_bit(trained, run_cli):
    kind, run, _, overrides = trained
    import shutil
    copy = run.parent / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    (copy / WEIGHT_NAME).unlink()
    moved = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={copy}", "train.resume=latest"]
    code, _, err = run_cli("train", SD15, *moved)
    assert code == 0, err
    ours, theirs = load_file(copy / WEIGHT_NAME), load_file(run / WEIGHT_NAME)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_init_from_reads_each_types_kohya_file(trained, run_cli, tmp_path):
    kind, run, _, overrides = trained
    keep = [o for o in overrides if not o.startswith(("output_dir=", "train.max_steps=", "train.learning_rate=",
                                                       "train.checkpoint_every="))]
    other = "lokr" if kind == "loha" else "loha"
    code, _, err = run_cli("train", SD15, *keep, f"output_dir={tmp_path / 'wrong'}", f"lora.type={other}",
                           f"lora.init_from={run / 'run.safetensors'}")
    assert code == 2 and err.strip().endswith(f"trains lora.type={other}; set lora.type={kind}"), err
    code, _, err = run_cli("train", SD15, *keep, f"output_dir={tmp_path / 'cont'}", "train.max_steps=1",
                           "train.learning_rate=1e-30", f"lora.init_from={run / 'run.safetensors'}")
    assert code == 0, err
    started, trained_weights = read_lora(tmp_path / "cont"), read_lora(run)
    assert started.kind == kind
    for component, part in trained_weights.layers.items():
        assert set(started.layers[component]) == set(part)
        for key, value in part.items():
            torch.testing.assert_close(started.layers[component][key], value, atol=1e-6, rtol=1e-5)


def test_generate_loads_lora_and_dora_as_trained_and_refuses_loha_lokr_in_one_line(trained, tiny_sd1):
    from finetune.errors import FinetuneError
    from finetune.export.pipeline_lora import load_lora
    kind, run, result, _ = trained
    pipe = fresh_pipeline(tiny_sd1)
    if kind in ("loha", "lokr"):
        with pytest.raises(FinetuneError, match=f"does not read {dict(loha='LoHa', lokr='LoKr')[kind]}"):
            load_lora(pipe, run, "subject")
        return
    load_lora(pipe, run, "subject")
    inputs = probe_inputs(result.unet)
    for got, want in zip(outputs(pipe.unet, pipe.text_encoder, inputs), outputs(result.unet, result.text_encoder,
                                                                                 inputs)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_an_unknown_type_stops_before_any_model_loads(run_cli, tmp_path):
    code, _, err = run_cli("train", SD15, "lora.type=lorx", f"model.pretrained={tmp_path / 'nowhere'}")
    assert code == 2 and err.strip() == "finetune: error: lora.type: 'lorx' is not one of lora, dora, loha, lokr"


@torch.no_grad()
def effective_weights(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as the model computes with it (the layer run on the identity matrix)."""
    found = {}
    for name, module in model.named_modules():
        if module in tuner_layers(model):
            base = module.get_base_layer()
            bias = base.bias if base.bias is not None else 0
            found[name] = (module(torch.eye(base.in_features)) - bias).T
    return found


@pytest.mark.parametrize("kind, rank", [("dora", 2), ("lokr", 4)])  # LoKr rank 4: some lokr_w2 full, some factored
def test_sdxl_unet_and_both_text_encoders_for_dora_and_lokr(kind, rank, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from finetune.demo import prepare_photos
    from tests.helpers import SDXL, sdxl_overrides
    prepare_photos(tmp_path / "photos")
    overrides = sdxl_overrides(tiny_sdxl, tmp_path / "photos", tmp_path, **{
        "lora.type": kind, "lora.rank": rank, "lora.alpha": 3, "lora.text_encoder": "true", "train.max_steps": 1,
        "train.learning_rate": 5e-2, "export.kohya": "true", "export.kohya_precision": "fp32"})
    module, cfg = load_recipe_config(SDXL, overrides)
    result = module.main(cfg)
    models = {"unet": result.unet, "text_encoder": result.text_encoders[0], "text_encoder_2": result.text_encoders[1]}
    want = {name: effective_weights(model) for name, model in models.items()}
    kohya = load_file(tmp_path / "run" / "run.safetensors")
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}
    parts = {key.partition(".")[2] for key in kohya}
    assert parts == ({"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"} if kind == "dora" else
                     {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})
    run = tmp_path / "run"
    loaders = [("ours", run / WEIGHT_NAME), ("ours", run / "run.safetensors")]
    for how, path in loaders + ([("diffusers", run)] if kind == "dora" else []):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        fresh = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        if how == "diffusers":
            pipe.load_lora_weights(path)
        else:
            lora = cfg.lora  # the recipe's targets (SDXL: all attention layers)
            add_unet_lora(pipe.unet, lora)
            add_text_encoder_lora(pipe.text_encoder, lora)
            add_text_encoder_lora(pipe.text_encoder_2, lora)
            load_into_models(read_lora(path, pipe.unet.config), fresh, path)
        for name, model in fresh.items():
            got = effective_weights(model)
            assert set(got) == set(want[name]), (how, name)
            for layer, weight in got.items():
                torch.testing.assert_close(weight, want[name][layer], atol=2e-5, rtol=1e-4)


def test_finetune_export_converts_each_type_or_says_in_one_line_why_not(trained, run_cli, tmp_path):
    kind, run, _, _ = trained
    code, _, err = run_cli("export", run, "--format", "kohya", "--precision", "fp32",
                           "--out", tmp_path / "k.safetensors")
    assert code == 0, err
    converted, written = load_file(tmp_path / "k.safetensors"), load_file(run / "run.safetensors")
    assert set(converted) == set(written) and all(torch.equal(converted[k], written[k]) for k in written)
    code, _, err = run_cli("export", run / "run.safetensors", "--format", "diffusers", "--out", tmp_path / "d")
    if kind in ("loha", "lokr"):
        assert code == 2 and err.count("\n") == 1 and "diffusers' load_lora_weights does not read" in err
        assert not (tmp_path / "d").exists()
        return
    assert code == 0, err
    back, ours = read_lora(tmp_path / "d"), read_lora(run)
    assert back.kind == kind
    for component, part in ours.layers.items():
        for key, value in part.items():
            torch.testing.assert_close(back.layers[component][key], value, atol=1e-6, rtol=1e-5)
