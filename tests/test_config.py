"""Typed configs: shipped YAMLs build, overrides apply, bad keys and values fail with the key named."""
from pathlib import Path

import pytest

from finetune import config as config_lib
from finetune.cli import load_recipe_config
from finetune.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"sd15_dreambooth_lora.yaml", "sd21_dreambooth_lora.yaml", "demo_tiny.yaml",
            "sdxl_dreambooth_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_builds_its_recipe_config(path):
    module, cfg = load_recipe_config(str(path), [])
    assert isinstance(cfg, module.Config)
    raw = config_lib.read_yaml(path)
    for section, values in raw.items():  # every value in the file reached the typed config
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_names_its_launch_command_first(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# accelerate launch ", "# finetune ")), first
    if first.startswith("# accelerate launch"):
        assert f"finetune train recipes/configs/{path.name}" in first


def test_sd15_defaults_match_the_issue():
    _, cfg = load_recipe_config(str(CONFIGS[0].parent / "sd15_dreambooth_lora.yaml"), [])
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    _, cfg = load_recipe_config(str(CONFIGS[0].parent / "sd21_dreambooth_lora.yaml"), [])
    assert cfg.train.resolution == 768
    _, cfg = load_recipe_config(str(CONFIGS[0].parent / "sdxl_dreambooth_lora.yaml"), [])
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.train.resolution == 1024
    assert cfg.data.buckets and not load_recipe_config(None, [])[1].data.buckets  # on for SDXL, off for SD1.x


def test_dotted_overrides_are_typed():
    _, cfg = load_recipe_config(None, ["train.max_steps=800", "train.learning_rate=5e-5", "lora.text_encoder=true",
                                       "prior.num_class_images=0", "train.resume=latest"])
    assert cfg.train.max_steps == 800 and cfg.train.learning_rate == 5e-5
    assert cfg.lora.text_encoder is True and cfg.prior.num_class_images == 0 and cfg.train.resume == "latest"


@pytest.mark.parametrize("override, message", [
    ("train.max_step=10", "unknown config key train.max_step; did you mean train.max_steps?"),
    ("trian.max_steps=10", "unknown config key trian"),
    ("train.max_steps=ten", "train.max_steps: expected a whole number, got 'ten'"),
    ("train.max_steps=-5", "train.max_steps: must be at least 1"),
    ("lora.text_encoder=maybe", "lora.text_encoder: expected true or false"),
    ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ("train.max_steps", "write it as section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_misspelled_key_in_a_file_fails_through_the_cli(tmp_path, run_cli):
    path = tmp_path / "bad.yaml"
    path.write_text("recipe: dreambooth_lora\ndata:\n  instance_dirr: photos\n")
    code, _, err = run_cli("train", path)
    assert code == 2
    assert err.strip() == "finetune: error: unknown config key data.instance_dirr; did you mean data.instance_dir?"


def test_missing_config_file_and_bad_yaml(tmp_path, run_cli):
    code, _, err = run_cli("train", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    code, _, err = run_cli("train", bad)
    assert code == 2 and "bad.yaml: not valid YAML" in err and err.count("\n") == 1


def test_show_config_docs_cover_every_field(run_cli):
    code, out, _ = run_cli("show-config", "--docs")
    assert code == 0
    for key, _, doc in config_lib.field_docs(load_recipe_config(None, [])[0].Config):
        assert doc, f"{key} has no doc"
        assert key in out
    code, out, _ = run_cli("show-config", "--docs", str(CONFIGS[0].parent / "sdxl_dreambooth_lora.yaml"))
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert rows["train.resolution"] == "1024" and rows["data.buckets"] == "True"  # the SDXL recipe's defaults


LAUNCH_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "examples").glob("accelerate_*.yaml"))


def test_launch_configs_single_gpu_default_and_multi_gpu_examples():
    from accelerate.commands.config.config_args import ClusterConfig
    root = Path(__file__).resolve().parent.parent
    default = ClusterConfig.from_yaml_file(str(root / "accelerate_config.yaml"))
    assert default.num_processes == 1 and default.distributed_type == "NO"
    assert {p.name for p in LAUNCH_CONFIGS} == {"accelerate_multi_gpu.yaml", "accelerate_multi_node.yaml"}
    for path in LAUNCH_CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# accelerate launch --config_file examples/{path.name} "), first
        assert first.endswith("-m finetune train recipes/configs/sd15_dreambooth_lora.yaml")
        config = ClusterConfig.from_yaml_file(str(path))  # Accelerate's own reader: unknown keys fail
        assert config.distributed_type == "MULTI_GPU" and config.num_processes >= 2
    node = ClusterConfig.from_yaml_file(str(root / "examples" / "accelerate_multi_node.yaml"))
    assert node.num_machines == 2 and node.main_process_ip and node.main_process_port


def test_choice_keys_name_exactly_what_the_libraries_accept():
    from diffusers.optimization import SchedulerType

    from finetune.config import LR_SCHEDULES, SAMPLERS
    from finetune.inference import SCHEDULERS
    assert set(SAMPLERS) == set(SCHEDULERS) | {"default"}
    assert set(LR_SCHEDULES) <= {kind.value for kind in SchedulerType}
