"""Issue 19: what a run keeps in memory does not grow with the data. The text cache lives in files (one per
caption, under the encoders' identity) with a bounded set of recent entries on the device, and a rerun encodes
nothing; the latent cache is tested beside the training tests (test_train.py)."""

from __future__ import annotations

import pytest
import torch

from sdtune.cache import TextCache


def _encoder(calls: list[str]):
    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        calls.extend(chunk)
        # (B, 4, 3) hidden states and (B, 3) pooled, distinct per caption and in fp16 like a mixed-precision run
        codes = torch.tensor([[float(sum(map(ord, c)) % 97)] for c in chunk])
        return {"prompt_embeds": (codes[:, :, None] * torch.arange(12.0).view(1, 4, 3) / 7).half(),
                "pooled": (codes * torch.ones(1, 3) / 3).half()}
    return encode


def test_text_cache_writes_files_keeps_a_few_and_a_rerun_encodes_nothing(tmp_path):
    captions = [f"a photo of sks toy {i}" for i in range(10)] + [""]
    calls: list[str] = []
    cache = TextCache(captions, _encoder(calls), tmp_path, "enc-a", keep=3)
    assert sorted(calls) == sorted(captions) and len(list((tmp_path / "enc-a").glob("*.safetensors"))) == 11
    expected = _encoder([])(captions)
    for start in range(0, 11, 2):
        batch = captions[start:start + 2]
        got = cache[batch]
        for name, value in got.items():  # bitwise what the encoder gave, dtype kept
            assert value.dtype == torch.float16 and torch.equal(value, expected[name][start:start + 2])
        assert len(cache._recent) <= 3  # the memory held is bounded, whatever the number of captions
    calls.clear()
    again = TextCache(captions, _encoder(calls), tmp_path, "enc-a", keep=3)
    assert calls == [] and torch.equal(again[["", captions[4]]]["pooled"], cache[["", captions[4]]]["pooled"])
    # another encoder identity is another cache; a damaged file is encoded again
    TextCache(captions[:2], _encoder(calls), tmp_path, "enc-b")
    assert calls == captions[:2]
    victim = again.files[captions[0]]
    victim.write_bytes(victim.read_bytes()[:-8])
    calls.clear()
    TextCache(captions, _encoder(calls), tmp_path, "enc-a")
    assert calls == [captions[0]]


def test_runs_share_the_text_cache(tiny_model, tmp_path, monkeypatch):
    """A second run of the same model and captions reads the first one's text embeddings from the cache (its
    encode never runs) and trains bitwise the same LoRA."""
    from safetensors.torch import load_file

    from conftest import overrides
    from sdtune import cache as cache_module
    from sdtune.config import load_config
    from sdtune.lora import WEIGHT_NAME
    from sdtune.train import train

    common = ("data.instance_prompt=a photo of sks toy", "train.max_steps=2")
    first = train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "a", *common)))
    original = cache_module.TextCache._encode

    def refuse(self, todo, *args, **kwargs):
        if todo:
            raise AssertionError(f"encoded again: {todo}")
        return original(self, todo, *args, **kwargs)

    monkeypatch.setattr(cache_module.TextCache, "_encode", refuse)
    second = train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "b", *common)))
    a, b = load_file(first / WEIGHT_NAME), load_file(second / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep", [1, 2])
def test_recent_entries_are_the_last_used(tmp_path, keep):
    captions = ["x", "y", "z"]
    cache = TextCache(captions, _encoder([]), tmp_path, "enc", keep=keep)
    cache[["x"]]
    cache[["z"]]
    assert list(cache._recent)[-1] == "z" and len(cache._recent) == keep
