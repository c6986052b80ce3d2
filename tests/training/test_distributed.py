"""The pieces that make N processes equal one: sample positions, per-sample noise, class-image shares, the LR."""
import pytest
import torch
from PIL import Image

from finetune.config import TrainConfig
from finetune.data.class_images import missing_class_indices
from finetune.data.dataset import SampleOrder, cache_keys, plan_batch, sample_generators
from finetune.training.distributed import retarget_learning_rate, scaled_learning_rate
from finetune.training.optim import build_lr_scheduler


def plans(world: int, batch: int, micro_steps: int, offset: int = 0, **kw):
    args = dict(num_instance=5, repeats=2, num_class=7, random_flip=True, random_crop=True) | kw
    order = SampleOrder(seed=3, batch_size=batch, offset=offset, **args)
    return [[plan_batch(order, m, rank=r, world_size=world) for r in range(world)]
            for m in range(micro_steps)]


def merged(ranks):
    """What one process with the summed batch would hold: instance samples of all ranks, then class samples."""
    inst = [i for p in ranks for i in p.instance]
    cls = [c for p in ranks for c in p.classes]
    flips = ([x for p in ranks for x in p.flips[:len(p.instance)]]
             + [x for p in ranks for x in p.flips[len(p.instance):]])
    crops = ([x for p in ranks for x in p.crops[:len(p.instance)]]
             + [x for p in ranks for x in p.crops[len(p.instance):]])
    return inst, cls, flips, crops, [q for p in ranks for q in p.positions]


def test_two_processes_batch_one_take_what_one_process_batch_two_takes():
    for two, one in zip(plans(2, 1, 6), plans(1, 2, 6)):
        assert merged(two) == merged(one)


def test_no_sample_repeats_within_an_epoch_across_processes_and_accumulation():
    # 2 processes x batch 1 x accumulation 5 = one epoch of 10 (5 photos x 2 repeats) per optimizer step.
    epoch = [i for ranks in plans(2, 1, 5, random_flip=False) for p in ranks for i in p.instance]
    assert sorted(epoch) == sorted(list(range(5)) * 2)
    positions = [q for ranks in plans(2, 1, 5) for p in ranks for q in p.positions]
    assert sorted(positions) == list(range(10))


def test_an_offset_continues_the_global_order_on_another_process_count():
    straight = [merged(ranks) for ranks in plans(2, 1, 6)]
    resumed = [merged(ranks) for ranks in plans(1, 2, 3, offset=6)]  # 3 steps x 2 samples done with 2 processes
    assert resumed == straight[3:]


def test_each_sample_draws_the_same_noise_however_the_batch_is_split():
    def draws(plan):
        gens = sample_generators(0, plan)
        return [torch.randn(4, generator=g) for g in gens], len(plan.instance)

    for two, one in zip(plans(2, 1, 3), plans(1, 2, 3)):
        (a0, n0), (a1, n1), (b, _) = draws(two[0]), draws(two[1]), draws(one[0])
        # one process: [i0, i1, c0, c1]; two processes: [i0, c0] and [i1, c1]
        for got, want in zip(a0[:n0] + a1[:n1] + a0[n0:] + a1[n1:], b):
            assert torch.equal(got, want)
    a, _ = draws(plans(1, 2, 1)[0][0])
    assert not torch.equal(a[0], a[1])  # and different samples draw differently


def test_a_process_caches_only_the_photos_its_share_reads():
    share = [ranks[0] for ranks in plans(2, 1, 2, num_instance=20, repeats=1, num_class=0, random_flip=False)]
    keys = cache_keys(share)
    assert keys == {(p.instance[0], False, None) for p in share} and len(keys) == 2  # None: the square size


def test_missing_class_indices_fill_gaps_and_count_other_images(tmp_path):
    folder = tmp_path / "class"
    assert missing_class_indices(folder, 3) == [0, 1, 2]  # no folder yet
    folder.mkdir()
    for name in ("class-00001-0123456789ab.png", "class-00003-0123456789ab.png", "mine.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / ".class-00000-0123456789ab.png.tmp").write_bytes(b"half")  # a crashed write does not count
    assert missing_class_indices(folder, 6) == [0, 2, 4]
    assert missing_class_indices(folder, 3) == []


@pytest.mark.parametrize("rule, want", [("none", 1e-4), ("linear", 1.6e-3), ("sqrt", 4e-4)])
def test_scale_lr_rules(rule, want):
    train = TrainConfig(learning_rate=1e-4, batch_size=2, gradient_accumulation=2, scale_lr=rule)
    assert scaled_learning_rate(train, 4) == pytest.approx(want)


def test_a_resumed_schedule_moves_to_the_new_peak_at_the_restored_step():
    train = TrainConfig(lr_scheduler="linear", lr_warmup_steps=2, max_steps=10)
    param = torch.nn.Parameter(torch.zeros(1))
    saved_opt = torch.optim.AdamW([param], lr=2.0)
    saved = build_lr_scheduler(saved_opt, train)
    for _ in range(4):
        saved_opt.step()
        saved.step()
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_lr_scheduler(opt, train)
    opt.load_state_dict(saved_opt.state_dict())
    sched.load_state_dict(saved.state_dict())
    retarget_learning_rate(opt, sched, 1.0)
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.75)  # 1.0 x (10-4)/(10-2)
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.625)
