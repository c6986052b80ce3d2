"""Which LoRA files `finetune eval --checkpoints` picks from a run folder."""
import pytest

from finetune.errors import FinetuneError
from finetune.evaluation.runner import default_output
from finetune.evaluation.targets import find_targets


def test_all_latest_and_named_checkpoints(eval_run):
    everything = find_targets(eval_run, "all")
    assert [(t.name, t.step) for t in everything] == [("step-000001", 1), ("step-000002", 2), ("step-000003", 3)]
    assert all(t.path == eval_run / "checkpoints" / t.name / "pytorch_lora_weights.safetensors" for t in everything)
    assert everything[0].header["trigger"] == "sks cat" and everything[0].header["steps"] == "1"
    assert [t.name for t in find_targets(eval_run, "latest")] == ["step-000003"]
    assert [t.name for t in find_targets(eval_run, "step-3, 1,step-000001")] == ["step-000001", "step-000003"]
    final = find_targets(eval_run / "pytorch_lora_weights.safetensors")
    assert [(t.name, t.step) for t in final] == [("step-000003", 3)]
    assert default_output(eval_run) == eval_run / "eval"
    assert default_output(final[0].path) == eval_run / "pytorch_lora_weights-eval"


def test_unknown_checkpoints_and_paths_are_one_line_errors(eval_run, tmp_path):
    with pytest.raises(FinetuneError, match=r"^--checkpoints: 'step-9' is not among .*\(step-000001, step-000002, "
                                            r"step-000003\); use all, latest or step-N,\.\.\.$"):
        find_targets(eval_run, "step-9")
    with pytest.raises(FinetuneError, match=r"no LoRA here"):
        find_targets(tmp_path)
    with pytest.raises(FinetuneError, match=r"no such run folder or LoRA file"):
        find_targets(tmp_path / "nope")
    (tmp_path / "bad.safetensors").write_text("not a safetensors file")
    with pytest.raises(FinetuneError, match=r"bad.safetensors: not a readable LoRA file"):
        find_targets(tmp_path / "bad.safetensors")
