import json
import random
import shutil

import pytest
import torch
from PIL import Image

from conftest import DEMO_DATA
from sdtune.data import (
    BucketBatchSampler,
    DreamBoothDataset,
    StreamBatchSampler,
    assign_buckets,
    center_crop_top_left,
    collate,
    load_image,
    scan_instance_dir,
)
from sdtune.prep import bucket_sizes


def test_imagefolder_captions_are_read():
    scan = scan_instance_dir(DEMO_DATA, "sks", None)
    assert not scan.problems and not scan.warnings
    assert len(scan.examples) == 8
    assert all("sks toy" in e.caption for e in scan.examples)


def test_plain_folder_sidecars_and_fallback_prompt(tmp_path):
    for i in range(3):
        shutil.copy(DEMO_DATA / f"toy_0{i}.png", tmp_path / f"img{i}.png")
    (tmp_path / "img1.txt").write_text("sks toy on a shelf\n")
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks toy")
    assert [e.caption for e in scan.examples] == ["a photo of sks toy", "sks toy on a shelf", "a photo of sks toy"]
    # without a prompt, images with no caption are problems, named
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert len(scan.problems) == 2 and "img0.png has no caption" in scan.problems[0]


def test_broken_image_and_bad_metadata_are_reported(tmp_path):
    shutil.copy(DEMO_DATA / "toy_00.png", tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "good.png", "text": "a sks toy"}) + "\nnot json\n"
        + json.dumps({"file_name": "broken.jpg", "text": "a sks toy"}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "a sks toy"}) + "\n"
    )
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks toy")
    text = "\n".join(scan.problems)
    assert "cannot read broken.jpg" in text
    assert "line 2 is not a JSON object" in text
    assert "names gone.png, which is not in the folder" in text
    assert [e.path.name for e in scan.examples] == ["good.png"]
    # an image the metadata does not list is not an example (as in datasets' imagefolder)
    shutil.copy(DEMO_DATA / "toy_01.png", tmp_path / "extra.png")
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert "not in metadata.jsonl, so not used: extra.png" in scan.warnings[0]


def test_real_photos_load_upright_and_square(dreambench):
    dog = dreambench / "dog"
    scan = scan_instance_dir(dog, "sks", "a photo of sks dog")
    assert len(scan.examples) >= 4 and not scan.problems
    ds = DreamBoothDataset(scan.examples, 64, center_crop=False, random_flip=True, seed=3)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (len(ds), 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    # the same stream position gives the same pixels (crop and flip are seeded by position)
    assert torch.equal(ds[5]["instance"]["pixel_values"], ds[5]["instance"]["pixel_values"])


def test_prior_batches_put_class_examples_after_instance_examples():
    scan = scan_instance_dir(DEMO_DATA, "sks", None)
    class_images = [e.path for e in scan.examples[:3]]
    ds = DreamBoothDataset(scan.examples[:2], 64, class_images=class_images, class_prompt="a photo of a toy")
    assert len(ds) == 3  # max(instances, class images)
    batch = collate([ds[0], ds[1]])
    assert batch["captions"][2:] == ["a photo of a toy"] * 2
    assert batch["pixel_values"].shape[0] == 4


def test_stream_sampler_resumes_mid_epoch_and_shards_processes():
    full = StreamBatchSampler(n=5, batch_size=2, seed=7)
    it = iter(full)
    first = [next(it) for _ in range(9)]  # crosses several epochs of 5
    resumed = iter(StreamBatchSampler(n=5, batch_size=2, seed=7, start=4))
    assert [next(resumed) for _ in range(5)] == first[4:]
    # every epoch is a permutation
    flat = [p for b in first for p in b][:15]
    for e in range(3):
        assert sorted(p % 5 for p in flat[e * 5 : (e + 1) * 5]) == list(range(5))
    # two processes split each global batch, no overlap
    r0, r1 = (StreamBatchSampler(5, 2, 7, rank=r, world_size=2) for r in (0, 1))
    assert r0.batch(0) + r1.batch(0) == full.batch(0) + full.batch(1)


# --------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets

# 13 examples in 3 buckets of 6, 4 and 3: with batch 2 one bucket has a short last batch to fill.
LABELS = ["a", "b", "a", "c", "a", "b", "a", "c", "b", "a", "c", "b", "a"]


def _epoch_of(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    m = sampler.batches_per_epoch
    return [sampler.batch(k) for k in range(epoch * m, (epoch + 1) * m)]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 7])
def test_bucket_sampler_never_mixes_and_covers_every_example(batch_size):
    n = len(LABELS)
    sampler = BucketBatchSampler(LABELS, batch_size, seed=3)
    sizes = {b: LABELS.count(b) for b in set(LABELS)}
    assert sampler.batches_per_epoch == sum(-(-k // batch_size) for k in sizes.values())
    orders = []
    for epoch in range(3):
        batches = _epoch_of(sampler, epoch)
        for batch in batches:
            assert len(batch) == batch_size
            assert len({LABELS[p % n] for p in batch}) == 1, batch  # one bucket per batch
            assert all(p // n == epoch for p in batch)  # positions of this epoch only
        assert {p % n for b in batches for p in b} == set(range(n))  # every example, every epoch
        orders.append(batches)
    assert orders[0] != orders[1]  # reshuffled each epoch (and each bucket's members)
    # a pure function of (seed, position): a fresh sampler agrees, another seed does not
    assert _epoch_of(BucketBatchSampler(LABELS, batch_size, seed=3), 1) == orders[1]
    if batch_size < 7:
        assert _epoch_of(BucketBatchSampler(LABELS, batch_size, seed=4), 0) != orders[0]


def test_bucket_sampler_fills_short_batches_from_the_same_bucket():
    sampler = BucketBatchSampler(["x"] * 3 + ["y"], batch_size=2, seed=0)
    batches = sorted(sorted(b) for b in _epoch_of(sampler, 0))
    # y's lone example repeats; x's three make a full batch and one filled up with another x
    assert len(batches) == 3 and [3, 3] in batches
    xs = [b for b in batches if b != [3, 3]]
    assert {p for b in xs for p in b} == {0, 1, 2} and all(3 not in b for b in xs)


def test_bucket_sampler_resumes_exactly_from_any_micro_batch():
    full = BucketBatchSampler(LABELS, batch_size=2, seed=7)
    it = iter(full)
    first = [next(it) for _ in range(4 * full.batches_per_epoch)]  # four epochs
    for k in range(len(first) - 3):
        resumed = iter(BucketBatchSampler(LABELS, batch_size=2, seed=7, start=k))
        assert [next(resumed) for _ in range(3)] == first[k : k + 3], k


@pytest.mark.parametrize("world_size", [2, 3])
def test_bucket_sampler_shards_processes_without_overlap(world_size):
    labels = ["a"] * 8 + ["b"] * 4 + ["c"] * 4  # batches of 2 divide every bucket: no filled batch repeats
    full = BucketBatchSampler(labels, batch_size=2, seed=1)
    ranks = [BucketBatchSampler(labels, 2, 1, rank=r, world_size=world_size) for r in range(world_size)]
    steps = 4 * full.batches_per_epoch
    # process r's micro-batch k is the full stream's batch k * W + r: together they are the whole stream
    for k in range(steps):
        for r, sampler in enumerate(ranks):
            assert sampler.batch(k) == full.batch(k * world_size + r)
    # within one epoch, no position is given to two processes
    m = full.batches_per_epoch
    owner: dict[int, int] = {}
    for j in range(m):
        for p in full.batch(j):
            assert owner.setdefault(p, j % world_size) == j % world_size
    assert len(owner) == len(labels)


def test_buckets_come_from_prep_and_suit_the_unet(bucketed_toy):
    scan = scan_instance_dir(bucketed_toy, "sks", None)
    prepped = [Image.open(e.path).size for e in scan.examples]
    assert set(prepped) <= set(bucket_sizes(64))  # prep wrote its 64 px buckets, some not multiples of 16
    assert any(w % 16 or h % 16 for w, h in prepped)
    buckets = assign_buckets([e.path for e in scan.examples], 64, multiple=16)
    # the tiny UNet downsamples once after the VAE's 8x: sides must be multiples of 16
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert set(buckets) == {(48, 80), (64, 64), (80, 48)}
    for (pw, ph), (bw, bh) in zip(prepped, buckets):
        assert (pw > ph) == (bw > bh) or bw == bh  # never turned the other way
        if pw % 16 == 0 and ph % 16 == 0:
            assert (bw, bh) == (pw, ph)  # a valid prep bucket is kept as it is
    # at a real model's size every prep bucket is already a multiple of 64 (SD1.x) or 32 (SDXL)
    assert bucket_sizes(512, 64) == bucket_sizes(512) and bucket_sizes(1024, 32) == bucket_sizes(1024)


def test_bucketed_items_are_centre_crops_of_one_size_with_their_class_images(bucketed_toy):
    scan = scan_instance_dir(bucketed_toy, "sks", None)
    buckets = assign_buckets([e.path for e in scan.examples], 64, multiple=16)
    class_images = sorted(DEMO_DATA.glob("toy_*.png"))[:3]  # square, like generated class images
    ds = DreamBoothDataset(scan.examples, 64, center_crop=False, random_flip=True, class_images=class_images,
                           class_prompt="a photo of a toy", seed=2, buckets=buckets)
    for pos in range(len(ds)):
        w, h = buckets[pos % len(scan.examples)]
        item = ds[pos]
        assert item["instance"]["pixel_values"].shape == item["class"]["pixel_values"].shape == (3, h, w)
        assert item["instance"]["target_size"] == item["class"]["target_size"] == (h, w)
    # a class image's crop is the centre crop of its instance example's bucket (SDXL conditions on it)
    landscape = next(i for i, b in enumerate(buckets) if b == (80, 48))
    item = ds[landscape]["class"]
    assert item["original_size"] == (128, 128) and item["crop_top_left"] == center_crop_top_left(128, 128, (80, 48))
    assert item["crop_top_left"] == (16, 0)  # 128 px -> 80x80, 48 rows kept from row 16
    # a sampler batch collates into one tensor
    sampler = BucketBatchSampler([ds.size(i) for i in range(len(ds))], 3, seed=0)
    for k in range(sampler.batches_per_epoch):
        batch = collate([ds[p] for p in sampler.batch(k)])
        w, h = ds.size(sampler.batch(k)[0])
        assert batch["pixel_values"].shape == (6, 3, h, w) and batch["geometry"][:, 4:].tolist() == [[h, w]] * 6
    assert {ds.size(i) for i in range(len(ds))} == set(buckets)
    assert set(ds.targets()) == {(e.path, b) for e, b in zip(scan.examples, buckets)} | {
        (class_images[i % 3], buckets[i]) for i in range(len(ds))}


def test_load_image_covers_the_bucket_and_keeps_the_square_path():
    path = DEMO_DATA / "toy_00.png"  # 128 x 128
    rng = random.Random(0)
    pixels, original, crop = load_image(path, (48, 80), True, False, rng)
    assert pixels.shape == (3, 80, 48) and original == (128, 128) and crop == (0, 16)  # 80x80, centre 48 columns
    square, _, square_crop = load_image(path, 64, True, False, rng)
    assert torch.equal(square, load_image(path, (64, 64), True, False, rng)[0]) and square_crop == (0, 0)
