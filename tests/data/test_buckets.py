"""Aspect-ratio buckets: sizes, assignment, no upscaling, and batches that never mix shapes."""
import pytest
from PIL import Image

from finetune.data.buckets import assign_bucket, bucket_sizes, epoch_batches, nearest_bucket, shrink_to_fit
from finetune.data.dataset import Example, SampleOrder, cache_keys, load_pixels, plan_batch
from finetune.errors import FinetuneError


def test_bucket_sizes_are_multiples_of_64_near_the_area():
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes and (1152, 896) in sizes and (896, 1152) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 1024 * 1024 and max(w / h, h / w) <= 4
        assert (w + 64) * h > 1024 * 1024 or w * (h + 64) > 1024 * 1024  # no side can grow by a step
    assert bucket_sizes(128) == [(64, 256), (128, 128), (192, 64), (256, 64)]


def test_nearest_aspect_ratio_wins():
    sizes = bucket_sizes(512)
    assert nearest_bucket(4000, 3000, sizes) == (576, 448)       # 4:3 -> 1.29
    assert nearest_bucket(3000, 4000, sizes) == (448, 576)
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert nearest_bucket(1920, 1080, sizes) == (640, 384)       # 16:9 -> 1.67


def test_no_upscale_shrinks_the_bucket_to_the_photo_unless_allowed():
    assert assign_bucket(4000, 3000, 512) == (576, 448)         # big photo: the full bucket
    small = assign_bucket(400, 300, 512)
    assert small == (384, 256) and small[0] <= 400 and small[1] <= 300
    assert assign_bucket(400, 300, 512, allow_upscale=True) == (576, 448)
    assert shrink_to_fit((512, 512), 130, 700) == (128, 128)
    for w, h in [(333, 517), (900, 200), (64, 64), (1000, 999)]:
        bw, bh = assign_bucket(w, h, 512)
        assert bw <= w and bh <= h  # covering the bucket never enlarges the photo


def test_epoch_batches_are_homogeneous_and_cover_every_example():
    buckets = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)]
    batches = epoch_batches(seed=3, epoch=0, buckets=buckets, batch_size=2, repeats=1)
    assert all(len(b) == 2 and len({buckets[i] for i in b}) == 1 for b in batches)
    assert set(i for b in batches for i in b) == set(range(9))
    assert len(batches) == 3 + 2 + 1
    assert epoch_batches(3, 0, buckets, 2) == batches and epoch_batches(3, 1, buckets, 2) != batches


def test_plan_batch_with_buckets_is_pure_homogeneous_and_split_across_ranks():
    buckets = [(64, 64)] * 4 + [(128, 64)] * 4
    plans = [plan_batch(SampleOrder(5, 2, 8, 3, 1, True, False, buckets=buckets), s) for s in range(8)]
    for plan in plans:
        assert {buckets[i] for i in plan.instance} == {plan.size}
        assert len(plan.classes) == 2 and len(plan.flips) == 4
    assert plans == [plan_batch(SampleOrder(5, 2, 8, 3, 1, True, False, buckets=buckets), s) for s in range(8)]
    seen = sorted(i for p in plans[:4] for i in p.instance)
    assert seen == list(range(8))  # one epoch: every photo once
    two = [plan_batch(SampleOrder(5, 2, 8, 0, 1, False, False, buckets=buckets), s, rank=r, world_size=2).instance
           for s in range(2) for r in range(2)]
    assert sorted(i for b in two for i in b) == list(range(8))


def test_bucketed_order_is_keyed_by_position_across_process_counts_and_resumes():
    buckets = [(64, 64)] * 5 + [(128, 64)] * 3
    one = [plan_batch(SampleOrder(2, 2, 8, 4, 1, True, True, buckets=buckets), s) for s in range(6)]
    two = [plan_batch(SampleOrder(2, 2, 8, 4, 1, True, True, buckets=buckets), s, rank=r, world_size=2)
           for s in range(3) for r in range(2)]
    assert two == one  # 2 processes x batch 2 take the batches 1 process takes, in the same global order
    resumed = [plan_batch(SampleOrder(2, 2, 8, 4, 1, True, True, offset=8, buckets=buckets), s) for s in range(2)]
    assert resumed == one[4:]  # 4 batches of 2 done: a resumed run goes on with batch 5
    with pytest.raises(FinetuneError, match="train.batch_size: this run has seen 3 samples, not a multiple of"):
        plan_batch(SampleOrder(2, 2, 8, 4, 1, True, True, offset=3, buckets=buckets), 0)


def test_class_images_are_cached_only_at_the_buckets_of_the_batches_they_join():
    buckets = [(64, 64)] * 2 + [(128, 64)] * 2
    plans = [plan_batch(SampleOrder(1, 1, 4, 3, 1, False, False, buckets=buckets), s) for s in range(4)]
    keys = cache_keys(plans)
    assert {(i, size) for i, _, size in keys if i < 4} == {(i, buckets[i]) for i in range(4)}
    assert {(i, size) for i, _, size in keys if i >= 4} == {(p.classes[0], p.size) for p in plans}


@pytest.mark.parametrize("flip, left", [(False, 0), (True, 0)])
def test_crop_geometry_is_the_real_crop(tmp_path, flip, left):
    Image.new("RGB", (256, 96), "red").save(tmp_path / "wide.png")
    pixels, geometry = load_pixels(Example(tmp_path / "wide.png", "p"), (192, 64), flip, (0.5, 0.5))
    assert pixels.shape == (3, 64, 192)
    # resized to 192 x 72 (covering 192 x 64), cropped 4 px from the top: (orig h, w, top, left, target h, w)
    assert geometry == (96, 256, 4, left, 64, 192)
    Image.new("RGB", (300, 64), "red").save(tmp_path / "wider.png")
    _, geometry = load_pixels(Example(tmp_path / "wider.png", "p"), (192, 64), flip, (0.25, 0.0))
    assert geometry == (64, 300, 0, 81 if flip else 27, 64, 192)  # 108 spare columns: 27 from the left
