"""The paper's prompt sets as data, the subject phrase, and the trigger removal CLIP-T reads."""
from pathlib import Path

import pytest

from finetune.config import DataConfig, EvalConfig
from finetune.errors import ConfigError
from finetune.evaluation.prompts import (
    PromptPair,
    Subject,
    class_prompt,
    find_subject,
    paper_prompts,
    prompt_pair,
    prompt_templates,
)
from finetune.evaluation.runner import plan_evaluation

DOG = Subject("sks dog", "dog")


def test_the_paper_sets_hold_25_object_and_25_live_subject_prompts():
    objects, live = paper_prompts("object"), paper_prompts("live")
    assert len(objects) == 25 and len(live) == 25
    assert all(p.count("{subject}") == 1 for p in objects + live)
    assert objects[:10] == live[:10] and objects[-5:] == live[-5:]  # shared: scenes, then colour and shape
    assert objects[0] == live[0] == "a {subject} in the jungle"
    assert objects[-1] == "a cube shaped {subject}"
    assert objects[12] == "a {subject} with the Eiffel Tower in the background"
    assert live[13] == "a {subject} wearing a black top hat and a monocle"
    assert not set(objects[10:20]) & set(live[10:20])
    folder = Path(paper_prompts.__code__.co_filename).parent / "prompts"
    for name in ("objects.txt", "live_subjects.txt"):  # the source is named in the file
        assert "google/dreambooth, dataset/prompts_and_classes.txt" in (folder / name).read_text()


def test_the_subject_phrase_and_class_noun():
    assert find_subject(None, "sks dog", None) == DOG
    assert find_subject(None, "a photo of sks dog", None) == DOG  # data.instance_prompt as the trigger
    assert find_subject(None, "A picture of an ohwx teddy bear", None) == Subject("ohwx teddy bear", "teddy bear")
    assert find_subject("zwx man", "a photo of sks dog", None) == Subject("zwx man", "man")
    assert find_subject(None, "sks", "dog") == Subject("sks", "dog")
    with pytest.raises(ConfigError, match=r"^eval.class_noun: cannot tell the class from the subject 'sks'"):
        find_subject(None, "sks", None)


def test_trigger_removal_puts_the_class_noun_where_the_subject_was():
    assert prompt_pair("a {subject} in the jungle", DOG) == PromptPair("a sks dog in the jungle",
                                                                       "a dog in the jungle")
    assert prompt_pair("a red {subject}", DOG) == PromptPair("a red sks dog", "a red dog")
    assert prompt_pair("a sks dog on the beach", DOG) == PromptPair("a sks dog on the beach", "a dog on the beach")
    with pytest.raises(ConfigError, match=r"^eval.prompts\[2\]: 'a cat' names neither \{subject\} nor the subject"):
        prompt_pair("a cat", DOG, "eval.prompts[2]")
    assert class_prompt("a photo of a {class}", DOG) == "a photo of a dog"
    with pytest.raises(ConfigError, match="^eval.class_prompt: 'a sks dog' names the subject"):
        class_prompt("a sks dog", DOG)


def test_prompt_sources_your_list_your_file_or_the_paper(tmp_path):
    assert prompt_templates(EvalConfig(prompts=["a {subject}"])) == (["a {subject}"], "eval.prompts")
    listing = tmp_path / "mine.txt"
    listing.write_text("# my prompts\na {subject} at night\n\n  a {subject} in a box  \n", encoding="utf-8")
    assert prompt_templates(EvalConfig(prompts_file=str(listing))) == (
        ["a {subject} at night", "a {subject} in a box"], "eval.prompts_file")
    assert prompt_templates(EvalConfig(subject_type="live"))[1] == "eval.subject_type=live"
    with pytest.raises(ConfigError, match="^eval.prompts_file: cannot read"):
        prompt_templates(EvalConfig(prompts_file=str(tmp_path / "missing.txt")))


class Cfg:  # the sections plan_evaluation reads
    def __init__(self, **eval_keys):
        self.eval, self.data = EvalConfig(**eval_keys), DataConfig()


def test_plan_draws_the_chosen_set_for_the_trigger_in_the_loras_header():
    plan = plan_evaluation(Cfg(subject_type="live", num_images=4, seed=10), {"trigger": "sks cat", "resolution": "64"})
    assert len(plan.pairs) == 25 and plan.pairs[11] == PromptPair("a sks cat wearing a santa hat",
                                                                  "a cat wearing a santa hat")
    assert (plan.seeds, plan.resolution, plan.class_prompt) == ([10, 11, 12, 13], 64, "a photo of a cat")
    with pytest.raises(Exception, match="^eval.scheduler: 'eulr' is unknown"):
        plan_evaluation(Cfg(scheduler="eulr"), {"trigger": "sks cat"})
