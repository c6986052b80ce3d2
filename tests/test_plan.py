"""`finetune plan`: its estimates against the peaks measured on the H200 (benchmarks/results/), and its CLI.

The measured runs are rebuilt as configs exactly as benchmarks/bench.py launched them (same shipped YAML, same
variant overrides), on config-only copies of the SD1.5 and SDXL architectures, so the estimate and the
measurement describe the same settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench import ARCH_OVERRIDES, CONFIGS, DRAWS, OURS, SAME_JOB
from benchmarks.models import write_configs
from finetune.cli import load_recipe_config
from finetune.plan import estimate_config, parse_size, read_architecture

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# (arch, results file, the variants whose phases are those of today's code). Earlier runs that left one phase's
# cached memory to the next, or drew class images without decoder slicing, measured a structure that is gone.
# The runs in *-phases-apart.json and later came after the constants were fitted (none was fitted on them), except
# where finetune/plan.py's comments name a run.
# The third item: overrides that give a variant the settings it ran with, where the shipped ones differ. Before
# 2026-12-01's fifth session train.expandable_segments did not take effect (finetune.allocator): those runs had
# fixed-size segments, which train.expandable_segments=false gives today.
LINEAR_NF4 = ["model.quantize_unet=nf4"]  # train.mode=low_memory set nf4 for these runs (nf4_all since)
ALL_NF4 = ["model.quantize_unet=nf4_all"]
FIXED = ["train.expandable_segments=false"]
NO_CHANNELS_LAST = ["train.channels_last=false"]  # SD's fast mode has trained channels-last since the sixth session
MEASURED = [("sd15", "2026-12-01-h200-sd15-phases.json", {"low_memory": [*LINEAR_NF4, *FIXED],
                                                          "fast": NO_CHANNELS_LAST}),
            ("sd15", "2026-12-01-h200-sd15-phases-apart.json", {"fast": NO_CHANNELS_LAST, "e2e": NO_CHANNELS_LAST}),
            ("sdxl", "2026-12-01-h200-sdxl-phases-apart.json", {"low_memory": FIXED, "low_memory_draws": FIXED}),
            ("sd15", "2026-12-01-h200-sd15-nf4-all-graphs.json", {"low_memory": [*ALL_NF4, *FIXED],
                                                                  "low_memory_linear_nf4": FIXED}),
            ("sd15", "2026-12-01-h200-sd15-nf4-all-eager.json", {"low_memory_all_nf4_eager": FIXED}),
            ("sd15", "2026-12-01-h200-sd15-e2e-direct.json", {"e2e_direct": NO_CHANNELS_LAST}),
            ("sd15", "2026-12-01-h200-sd15-before-allocator-fix.json", {"low_memory": [*LINEAR_NF4, *FIXED],
                                                                        "low_memory_all_nf4": FIXED,
                                                                        "fast_channels_last": []}),
            ("sd15", "2026-12-01-h200-sd15-allocator-fixed.json", {"low_memory": LINEAR_NF4,
                                                                   "low_memory_all_nf4": []}),
            ("sd15", "2026-12-01-h200-sd15-e2e-with-peer.json", {"e2e_direct": NO_CHANNELS_LAST}),
            ("sd15", "2026-12-01-h200-sd15-low-memory-draws.json", {"low_memory_draws": []}),
            ("sdxl", "2026-12-01-h200-sdxl-expandable-fixed.json", {"low_memory": LINEAR_NF4, "low_memory_all_nf4": [],
                                                                    "fast_checkpointing": []}),
            ("sd15", "2026-12-01-h200-sd15-channels-last.json", {"fast": NO_CHANNELS_LAST, "fast_channels_last": [],
                                                                 "e2e_direct": []}),
            ("sd15", "2026-12-01-h200-sd15-e2e-channels-last-with-peer.json", {"e2e_direct": []}),
            ("sdxl", "2026-12-01-h200-sdxl-channels-last.json", {"fast_checkpointing": [],
                                                                 "fast_checkpointing_channels_last": []})]


def measured_runs():
    for arch, name, variants in MEASURED:
        for run in json.loads((RESULTS / name).read_text())["results"]:
            if run["who"] == "finetune" and run.get("peak_gpu_mib") and run["variant"] in variants:
                yield pytest.param(arch, run, variants[run["variant"]], id=f"{arch}-{run['variant']}-{name[:26]}")


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {arch: write_configs(arch, root / arch) for arch in ("sd15", "sdxl")}


@pytest.mark.parametrize("arch, run, then", list(measured_runs()))
def test_estimate_is_within_a_tenth_of_the_measured_peak(architectures, tmp_path, arch, run, then):
    classes = tmp_path / "classes"
    classes.mkdir()
    # the end-to-end and drawing runs started from an empty class folder; the others found their 100 images in place
    if not run["variant"].startswith("e2e") and run["variant"] not in DRAWS:
        for i in range(100):
            (classes / f"class-{i:05d}-0.png").write_bytes(b"")
    overrides = [*OURS.get(run.get("e2e_settings", run["variant"]), [*SAME_JOB, "train.mode=fast"]),
                 *([f"prior.num_class_images={DRAWS[run['variant']]}"] if run["variant"] in DRAWS else []), *then]
    _, cfg = load_recipe_config(CONFIGS[arch], [*overrides, *ARCH_OVERRIDES.get(arch, []),
                                                f"model.pretrained={architectures[arch]}", f"data.class_dir={classes}"])
    estimated = estimate_config(cfg, read_architecture(str(architectures[arch]), cfg.lora.unet_targets))["peak_mib"]
    assert abs(estimated - run["peak_gpu_mib"]) <= 0.10 * run["peak_gpu_mib"], (estimated, run["peak_gpu_mib"])


def test_plan_names_what_fits_a_card_and_writes_json(architectures, tmp_path, run_cli):
    out = tmp_path / "plan.json"
    code, text, err = run_cli("plan", CONFIGS["sdxl"], f"model.pretrained={architectures['sdxl']}",
                              f"data.class_dir={tmp_path}", "--gpu-memory", "12GiB", "--json", out)
    assert code == 0, err
    # 100 class images still to draw at 1024 px, 8 at a time, need more than the card: low_memory draws them one
    # at a time with each model on the GPU only while it runs
    assert "use: train.mode=low_memory" in text and "too big" in text
    assert "on a 12GiB card:" in text
    data = json.loads(out.read_text())
    # Each row names the phase that sets its peak: the largest of the phases' estimates in the JSON.
    names = {"class_images_mib": "drawing class images", "text_encoding_mib": "encoding prompts",
             "latent_encoding_mib": "encoding photos", "training_mib": "training"}
    for label, est in data["estimates"].items():
        largest = max((key for key in names if key in est), key=est.get)
        assert f"{label}  (peak: {names[largest]})" in text
    assert "train.mode=fast  (peak: drawing class images)" in text  # 8 class images at 1024 px at once
    assert data["gpu_mib"] == 12 * 1024 and data["advice"] == "use: train.mode=low_memory"
    fast = data["estimates"]["train.mode=fast"]
    assert fast["class_images_mib"] > 0 and fast["peak_mib"] > data["estimates"]["train.mode=low_memory"]["peak_mib"]


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "lots"], "--gpu-memory 'lots': give the size with its unit, e.g. 8GiB"),
    (["model.pretrained=/nowhere/model", "--gpu-memory", "8GiB"],
     "model.pretrained: /nowhere/model is not a diffusers folder"),
])
def test_plan_bad_input_is_one_line(run_cli, args, message):
    code, _, err = run_cli("plan", CONFIGS["sd15"], *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_sizes_need_a_unit_and_gb_is_not_gib(run_cli):
    assert parse_size("8GiB") == parse_size("8 gib") == 8192 and parse_size("6144MiB") == 6144
    assert parse_size("24GB") == 24e9 / 2**20  # 22888.2 MiB: 22.4 GiB
    assert parse_size("500 MB") == 500e6 / 2**20
    for bare in ("8", "8G", "24 gigs"):
        code, _, err = run_cli("plan", CONFIGS["sd15"], "--gpu-memory", bare)
        assert code == 2 and err == (f"finetune: error: --gpu-memory {bare!r}: give the size with its unit, e.g. 8GiB, "
                                     "24GB or 6144MiB (GiB/MiB: 2^30/2^20 bytes, as nvidia-smi counts; GB/MB: "
                                     "10^9/10^6 bytes)\n")


def test_phases_that_never_share_the_gpu_are_estimated_apart(architectures, tmp_path):
    """SDXL low_memory drawing 4 class images: the largest of the models run alone (generation offload), by hand."""
    from finetune.plan import DECODE_MIB_512, GENERATE_UNET_MIB_512, MIB, VAE_ENCODE_MIB_512
    _, cfg = load_recipe_config(CONFIGS["sdxl"], ["train.mode=low_memory", "prior.num_class_images=4",
                                                  f"model.pretrained={architectures['sdxl']}",
                                                  f"data.class_dir={tmp_path / 'empty'}"])
    arch = read_architecture(str(architectures["sdxl"]), cfg.lora.unet_targets)
    est = estimate_config(cfg, arch)
    in_nf4 = arch.unet_linear_params + arch.unet_conv_params  # nf4_all: linear layers and convolutions
    nf4_unet = in_nf4 * (0.5 + 4 / 64) + (arch.unet_params - in_nf4) * 2
    drawing = max(arch.text_encoder_params * 2, nf4_unet + GENERATE_UNET_MIB_512 * 4 * 1 * MIB,  # 1024 px: 4x
                  arch.vae_params * 2 + DECODE_MIB_512 * 1 * MIB)  # one 512 px tile at a time
    assert est["class_images_mib"] == round(drawing / MIB)
    assert est["text_encoding_mib"] == round(arch.text_encoder_params * 2 / MIB)
    assert est["latent_encoding_mib"] == round((arch.vae_params * 4 + VAE_ENCODE_MIB_512 * MIB) / MIB)
    assert est["peak_phase"] == max(("class_images", "text_encoding", "latent_encoding", "unet_loading", "training"),
                                    key=lambda phase: est[f"{phase}_mib"])
