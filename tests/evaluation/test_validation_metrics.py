"""validation.metrics: the evaluation's numbers for each validation grid, in TensorBoard, training unchanged."""
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.evaluation.scoring import METRICS
from tests.evaluation.conftest import RUN, SD15
from tests.helpers import tiny_overrides


def test_scores_are_logged_beside_the_grids_with_the_base_model_at_step_0(eval_run):
    events = EventAccumulator(str(eval_run / "logs" / "dreambooth_lora"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    # the subject prompt gives DINO, CLIP-I and CLIP-T; the class prompt gives prior drift
    assert {f"eval/{key}" for key in METRICS} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("validation")] == [2]
    assert [e.step for e in events.Scalars("eval/dino")] == [0, 2]
    for key in ("class_dino_base", "class_clip_i_base"):  # the base model against itself
        assert events.Scalars(f"eval/{key}")[0].value == pytest.approx(1.0)


def test_scoring_does_not_change_training(eval_run, tiny_sd1, photos_master, tmp_path, run_cli):
    """The scored run (base model drawn and scored at step 2, mid-run) ends where a plain run does."""
    plain_run = {**RUN, "train.checkpoint_every": 0}  # checkpoints change nothing either; skipping them is faster
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos_master, tmp_path, **plain_run))
    assert code == 0, err
    scored = load_file(eval_run / "pytorch_lora_weights.safetensors")
    plain = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert scored.keys() == plain.keys() and all((scored[k] == plain[k]).all() for k in scored)


def test_metrics_without_validation_prompts_is_a_config_error(tiny_sd1, photos_master, tmp_path, run_cli):
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos_master, tmp_path),
                           "validation.metrics=true")
    assert code == 2
    assert err.splitlines()[-1] == ("finetune: error: validation.metrics: needs validation.prompts (the images it "
                                    "scores)")
