"""README stays true: its test command is CI's, and its config table lists every key."""
from pathlib import Path

from finetune.config import field_docs
from recipes import dreambooth_lora, sdxl_dreambooth_lora

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    command = "python -m pip install torch==2.13.0 -c constraints.txt -e '.[test]' && python -m pytest -q"
    assert command in (ROOT / "README.md").read_text()
    assert command.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()
    demo = "python -m pip install torch==2.13.0 -c constraints.txt -e '.[demo]' && finetune demo"
    assert demo in (ROOT / "README.md").read_text()


def test_the_lock_pins_every_package_exactly_except_torch():
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    names = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert all(line.count("==") == 1 for line in lines), "every line is NAME==VERSION"
    assert "torch" not in names and not any(name.startswith("nvidia-") for name in names)
    for package in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pillow",
                    "pytest", "scikit-image", "ruff", "mypy"):
        assert package in names, package


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    keys = [key for recipe in (dreambooth_lora, sdxl_dreambooth_lora) for key, _, _ in field_docs(recipe.Config)]
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"
