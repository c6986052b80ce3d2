"""Captions: files beside photos, the trigger phrase, tag shuffling and caption dropout."""
import pytest
import torch

from finetune.config import DataConfig
from finetune.data.captions import (
    batch_prompts,
    caption_variant,
    find_caption,
    possible_prompts,
    shuffle_tags,
    with_trigger,
)
from finetune.data.dataset import SampleOrder, instance_examples, plan_batch, plan_prompts
from finetune.errors import FinetuneError


def test_txt_or_caption_file_beside_the_photo(tmp_path):
    (tmp_path / "a.txt").write_text("from txt\n")
    (tmp_path / "b.caption").write_text("from caption")
    (tmp_path / "c.txt").write_text("txt wins")
    (tmp_path / "c.caption").write_text("caption loses")
    assert find_caption(tmp_path / "a.jpg") == "from txt"
    assert find_caption(tmp_path / "b.jpg") == "from caption"
    assert find_caption(tmp_path / "c.jpg") == "txt wins"
    assert find_caption(tmp_path / "c.jpg", ".caption") == "caption loses"
    assert find_caption(tmp_path / "d.jpg") is None


def test_trigger_goes_where_the_placeholder_is_or_in_front():
    assert with_trigger("a photo of {trigger} on a beach", "sks dog") == "a photo of sks dog on a beach"
    assert with_trigger("on a beach, sunny", "sks dog") == "sks dog, on a beach, sunny"
    assert with_trigger("sks dog running", "sks dog") == "sks dog running"
    assert with_trigger("a beach", None) == "a beach"
    with pytest.raises(FinetuneError, match="data.trigger is not set"):
        with_trigger("a {trigger}", None)


def test_instance_examples_template_captions_and_fall_back_to_the_instance_prompt(photos):
    (photos / "cat_1.caption").write_text("{trigger} asleep, sofa")
    (photos / "cat_2.txt").write_text("in the garden")
    data = DataConfig(instance_dir=str(photos), instance_prompt="a photo of sks cat", trigger="sks cat")
    prompts = {e.path.name: e.prompt for e in instance_examples(data)}
    assert prompts == {"cat_0.jpg": "a photo of sks cat", "cat_1.jpg": "sks cat asleep, sofa",
                       "cat_2.jpg": "sks cat, in the garden", "cat_3.jpg": "a close-up photo of sks cat",
                       "cat_4.jpg": "a photo of sks cat"}


def test_shuffle_keeps_the_first_tags_and_the_tag_set():
    caption = "sks dog, grass, sunny, red collar, running"
    seen = set()
    for seed in range(20):
        out = shuffle_tags(caption, 1, torch.Generator().manual_seed(seed))
        tags = out.split(", ")
        assert tags[0] == "sks dog" and sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    assert shuffle_tags(caption, 2, torch.Generator().manual_seed(0)).startswith("sks dog, grass, ")


def test_caption_dropout_rate_and_determinism():
    g = torch.Generator().manual_seed(0)
    outs = [caption_variant("sks dog, grass", 0.3, False, 1, g) for _ in range(2000)]
    assert set(outs) == {"", "sks dog, grass"}
    assert 0.26 < outs.count("") / 2000 < 0.34
    a = [caption_variant("x, y, z", 0.5, True, 1, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert a == [caption_variant("x, y, z", 0.5, True, 1, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert all(caption_variant("p", 0.0, False, 1, g) == "p" for _ in range(50))


def test_class_prompts_never_drop_and_cacheable_variants():
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = batch_prompts(["sks a", "sks b", "a dog", "a dog"], 2, 1.0, False, 1, generators)
    assert out == ["", "", "a dog", "a dog"]
    assert possible_prompts(["b", "a", "a"], 0.1, False) == ["", "a", "b"]
    assert possible_prompts(["b", "a"], 0.0, False) == ["a", "b"]
    assert possible_prompts(["b", "a"], 0.0, True) is None  # shuffled tags: encode per step


def test_caption_variants_are_keyed_by_position_not_by_process(photos):
    data = DataConfig(instance_dir=str(photos), trigger="sks cat", caption_dropout=0.5, shuffle_tags=True)
    examples = instance_examples(data)
    one = [p for s in range(5) for p in plan_prompts(0, plan_batch(SampleOrder(0, 2, 5), s), examples, data)]
    two = [p for s in range(5) for r in range(2)
           for p in plan_prompts(0, plan_batch(SampleOrder(0, 1, 5), s, rank=r, world_size=2), examples,
                                 data)]
    assert one == two and "" in one and any(one)
