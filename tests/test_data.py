import json
import shutil

import torch

from conftest import DEMO_DATA
from sdtune.data import DreamBoothDataset, StreamBatchSampler, collate, scan_instance_dir


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
