"""Where a model comes from: Hub id, folder, single file; and the errors when it cannot be read."""
import pytest

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models import describe_source, load_pipeline, prediction_type, training_scheduler


def test_sources(tiny_sd1, tmp_path):
    assert describe_source(str(tiny_sd1)) == "folder"
    assert describe_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert describe_source(str(tmp_path / "m.safetensors")) == "file"
    with pytest.raises(FinetuneError, match="is a pickle file"):
        describe_source(str(tmp_path / "m.ckpt"))
    with pytest.raises(FinetuneError, match="does not exist"):
        describe_source(str(tmp_path / "missing.safetensors"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(FinetuneError) as err:
        load_pipeline(ModelConfig(pretrained="nobody-here/no-such-model-xyz"))
    assert str(err.value).startswith("model.pretrained: could not load nobody-here/no-such-model-xyz from the Hub")
    assert "\n" not in str(err.value)


def test_broken_single_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FinetuneError, match="could not load .*broken.safetensors from disk"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path / "broken.safetensors")))


def test_folder_loads_with_its_schedule(tiny_sd1, tiny_sd2):
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sd1)))
    assert pipe.safety_checker is None
    assert prediction_type(training_scheduler(pipe)) == "epsilon"
    assert prediction_type(training_scheduler(load_pipeline(ModelConfig(pretrained=str(tiny_sd2))))) == "v_prediction"


def test_variant_weights_load_and_a_missing_variant_is_clear(tiny_sd1, tmp_path):
    import torch
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sd1)))
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert list((tmp_path / "fp16" / "unet").glob("*.fp16.safetensors"))
    loaded = load_pipeline(ModelConfig(pretrained=str(tmp_path / "fp16"), variant="fp16"), dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    with pytest.raises(FinetuneError, match="model.pretrained: could not load"):
        load_pipeline(ModelConfig(pretrained=str(tiny_sd1), variant="bf16"))
