"""Which prompts an evaluation draws, and the text CLIP-T compares each image with.

A prompt names the subject by its identifier and class noun ("a sks dog in the jungle"). The identifier is a
rare token that means nothing to CLIP, so CLIP-T reads the prompt with the class noun in the subject's place ("a
dog in the jungle"): what the image should show, in words CLIP knows. Prior drift draws the class prompt ("a photo
of a dog"), which has no identifier at all.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..config import EvalConfig
from ..errors import ConfigError

PROMPT_SETS = {"object": "objects.txt", "live": "live_subjects.txt"}  # the DreamBooth paper's two sets
SUBJECT, CLASS = "{subject}", "{class}"
# "a photo of sks dog" (data.instance_prompt, the trigger when data.trigger is unset) names the subject "sks dog".
LEAD_IN = re.compile(r"^(?:(?:a|an|the)\s+)?(?:(?:photo|picture|image)\s+of\s+)?(?:(?:a|an|the)\s+)?", re.I)


@dataclasses.dataclass(frozen=True)
class Subject:
    phrase: str      # identifier and class noun, as in the training prompts: "sks dog"
    class_noun: str  # the class alone: "dog"


@dataclasses.dataclass(frozen=True)
class PromptPair:
    prompt: str  # what the model draws: "a sks dog in the jungle"
    text: str    # what CLIP-T compares the image with: "a dog in the jungle"


def read_prompt_lines(path: str | Path, key: str) -> list[str]:
    """Non-empty lines of a prompt file that are not # comments."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({getattr(exc, 'strerror', None) or exc}); point it at a UTF-8 "
                          "text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts; write one per line")
    return prompts


def paper_prompts(subject_type: str) -> list[str]:
    """The DreamBooth paper's 25 prompts for `subject_type` ('object' or 'live'), with {subject} placeholders."""
    return read_prompt_lines(Path(__file__).parent / "prompts" / PROMPT_SETS[subject_type], "eval.subject_type")


def prompt_templates(cfg: EvalConfig) -> tuple[list[str], str]:
    """(templates, the key they came from): eval.prompts, else eval.prompts_file, else the paper's set."""
    if cfg.prompts:
        return list(cfg.prompts), "eval.prompts"
    if cfg.prompts_file:
        return read_prompt_lines(cfg.prompts_file, "eval.prompts_file"), "eval.prompts_file"
    return paper_prompts(cfg.subject_type), f"eval.subject_type={cfg.subject_type}"


def find_subject(explicit_phrase: str | None, trigger: str, explicit_class: str | None) -> Subject:
    """The subject phrase (eval.subject, else the trigger without a leading 'a photo of') and its class noun
    (eval.class_noun, else the phrase without its first word: DreamBooth's '[identifier] [class]' form)."""
    phrase = (explicit_phrase or LEAD_IN.sub("", trigger.strip())).strip()
    if not phrase:
        raise ConfigError("eval.subject: no subject phrase; set it to the identifier and class, e.g. "
                          "eval.subject='sks dog'")
    class_noun = (explicit_class or " ".join(phrase.split()[1:])).strip()
    if not class_noun:
        raise ConfigError(f"eval.class_noun: cannot tell the class from the subject {phrase!r}; set it, e.g. "
                          "eval.class_noun=dog (and eval.subject to identifier + class, e.g. 'sks dog')")
    return Subject(phrase, class_noun)


def prompt_pair(template: str, subject: Subject, key: str = "eval.prompts") -> PromptPair:
    """A prompt to draw and its CLIP-T text: {subject} filled with the phrase (drawn) and the class noun (CLIP-T); a
    prompt that spells the subject phrase out has the phrase replaced by the class noun."""
    if SUBJECT in template:
        return PromptPair(template.replace(SUBJECT, subject.phrase), template.replace(SUBJECT, subject.class_noun))
    if subject.phrase in template:
        return PromptPair(template, template.replace(subject.phrase, subject.class_noun))
    raise ConfigError(f"{key}: {template!r} names neither {SUBJECT} nor the subject {subject.phrase!r}, so it says "
                      f"nothing about the subject; add {SUBJECT} where the subject goes")


def class_prompt(template: str, subject: Subject) -> str:
    """The prior-drift prompt: eval.class_prompt with {class} filled in; it must not name the identifier."""
    prompt = template.replace(CLASS, subject.class_noun)
    if subject.phrase != subject.class_noun and subject.phrase in prompt:
        raise ConfigError(f"eval.class_prompt: {template!r} names the subject {subject.phrase!r}; prior drift needs "
                          f"the class alone, e.g. 'a photo of a {CLASS}'")
    return prompt
