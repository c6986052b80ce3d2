"""Sampling order and batch composition: deterministic, every photo once per epoch, class samples paired."""

from finetune.config import DataConfig
from finetune.data.dataset import SampleOrder, instance_examples, plan_batch, stream_index


def test_every_instance_once_per_epoch_and_reproducible():
    plans = [plan_batch(SampleOrder(7, 2, 5, 3, 2, True, False), step)
             for step in range(5)]  # 5 steps x 2 = one epoch of 10 (5 photos x 2 repeats)
    seen = sorted(i for p in plans for i in p.instance)
    assert seen == sorted(list(range(5)) * 2)
    again = [plan_batch(SampleOrder(7, 2, 5, 3, 2, True, False), step) for step in range(5)]
    assert again == plans
    other = SampleOrder(8, 2, 5, 3, 2, True, False)
    assert plan_batch(other, 0) != plans[0] or plan_batch(other, 1) != plans[1]


def test_each_batch_pairs_instance_and_class_samples():
    plan = plan_batch(SampleOrder(0, 2, 4, 10, 1, False, False), 3)
    assert len(plan.instance) == 2 and len(plan.classes) == 2
    assert len(plan.flips) == len(plan.crops) == 4 and not any(plan.flips)
    no_prior = plan_batch(SampleOrder(0, 2, 4, 0, 1, False, False), 3)
    assert no_prior.classes == [] and len(no_prior.flips) == 2


def test_processes_take_disjoint_shares():
    one = [i for step in range(4) for i in plan_batch(SampleOrder(0, 1, 8, 0, 1, False, False), step).instance]
    two = [i for step in range(2) for rank in range(2)
           for i in plan_batch(SampleOrder(0, 1, 8, 0, 1, False, False), step, rank=rank, world_size=2).instance]
    assert sorted(one) == sorted(two) and len(set(two)) == 4


def test_stream_is_a_permutation_per_epoch():
    assert sorted(stream_index(3, 1, p, 6) for p in range(6)) == list(range(6))
    assert sorted(stream_index(3, 1, p, 6) for p in range(6, 12)) == list(range(6))


def test_captions_override_the_instance_prompt(photos):
    examples = instance_examples(DataConfig(instance_dir=str(photos), instance_prompt="a photo of sks cat"))
    prompts = {e.path.name: e.prompt for e in examples}
    assert prompts["cat_3.jpg"] == "a close-up photo of sks cat"
    assert prompts["cat_0.jpg"] == "a photo of sks cat"
