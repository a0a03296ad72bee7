"""What keeps a step fast, checked without a GPU (no timings here: bench/ prints those): how often the host
waits for the device between log points, one compiled graph per aspect bucket and none for sampling, and the
shortcuts that must not change a single number."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors import safe_open

from conftest import overrides
from sdtune.config import load_config
from sdtune.train import train

STEPS = 14  # logged once, at the end: steps 7-13 see no log, checkpoint or sample point


def _host_reads(monkeypatch: pytest.MonkeyPatch, window: tuple[int, int]) -> collections.Counter:
    """Count the ways the host can wait for the device (.item(), bool(tensor), .tolist(), synchronize, and
    bitsandbytes' per-parameter sync) while training_step calls number ``window[0]``..``window[1]`` run."""
    import bitsandbytes.optim.optimizer as bnb_optimizer

    import sdtune.train as tr

    seen: collections.Counter = collections.Counter()
    calls = {"n": 0}
    real_step = tr.training_step

    def counting_step(*args, **kw):
        calls["n"] += 1
        return real_step(*args, **kw)

    def counted(name, fn):
        def wrapper(*args, **kw):
            if window[0] <= calls["n"] <= window[1]:
                seen[name] += 1
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(tr, "training_step", counting_step)
    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", counted("bitsandbytes sync_gpu", bnb_optimizer.sync_gpu))
    return seen


@pytest.mark.parametrize("optimizer,per_step", [("adamw", 0), ("adamw8bit", 1)])
def test_host_waits_for_the_device_between_log_points(optimizer, per_step, tiny_model, tmp_path, monkeypatch):
    """Fused AdamW skips a non-finite step on the device: no wait at all between log points. 8-bit AdamW reads
    its step's finite flag (one wait per step) and no longer waits after each of its parameters."""
    seen = _host_reads(monkeypatch, (8, STEPS - 1))  # steps 8-13: past the stalled-LoRA check at step 5
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", f"train.max_steps={STEPS}",
                                      f"train.log_every={STEPS}", f"train.optimizer={optimizer}", "lora.rank=64")))
    assert dict(seen) == ({"__bool__": per_step * 6} if per_step else {}), dict(seen)


def test_our_adamw8bit_updates_exactly_as_bitsandbytes():
    import bitsandbytes as bnb

    from sdtune.optim import make_optimizer

    def run(make):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 128, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]
        opt = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, opt

    ours, opt = run(lambda ps: make_optimizer("adamw8bit", [{"params": ps, "lr": 1e-3}], (0.9, 0.999), 1e-8, 0.01))
    theirs, _ = run(lambda ps: bnb.optim.AdamW8bit([{"params": ps, "lr": 1e-3}], betas=(0.9, 0.999), eps=1e-8,
                                                   weight_decay=0.01))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8  # the big tensor really has 8-bit state


def test_compiled_training_makes_one_graph_per_bucket_and_none_for_samples(tiny_model, tmp_path, bucketed_toy):
    """train.compile with static shapes: a graph for each of the 3 aspect buckets, none more after the samples
    drawn at step 4 (they use the uncompiled module), and a LoRA file with the model's own key names."""
    import torch._dynamo
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "run"
    train(load_config(None, overrides(
        tiny_model("sd15"), out, f"data.instance_dir={bucketed_toy}", "data.aspect_buckets=true", "train.compile=true",
        "train.compile_backend=eager", "train.max_steps=8", "sample.every=4", "train.checkpoint_every=4",
    )))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "_orig_mod" in k]  # a compiled module's state dict prefixes them
    torch._dynamo.reset()


def test_peft_input_casts_are_off_under_autocast_and_change_nothing(tiny_model):
    """Under mixed precision the LoRA layers do not cast their input to fp32 (autocast casts it straight back):
    outputs and gradients are bitwise those of PEFT's default."""
    from sdtune import families
    from sdtune.lora import add_lora
    from sdtune.models import load_components

    def run(cast: bool):
        c = load_components(str(tiny_model("sd15")), families.get("sd15"))
        torch.manual_seed(0)
        add_lora(c.denoiser, 8, 8, ["to_q", "to_k", "to_v", "to_out.0"])
        c.denoiser.to(torch.bfloat16)
        with torch.no_grad():
            for n, p in c.denoiser.named_parameters():
                if "lora" in n:
                    p.data = p.data.float()
                    if "lora_B" in n:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        for layer in c.denoiser.modules():
            if hasattr(layer, "cast_input_dtype_enabled"):
                layer.cast_input_dtype_enabled = cast
        g = torch.Generator().manual_seed(3)
        x, h = torch.randn(2, 4, 8, 8, generator=g).bfloat16(), torch.randn(2, 77, 32, generator=g).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = c.denoiser(x, torch.tensor([10, 500]), h).sample
        out.float().pow(2).mean().backward()
        return out, [p.grad for p in c.denoiser.parameters() if p.grad is not None]

    (a, grads_a), (b, grads_b) = run(True), run(False)
    assert torch.equal(a, b) and len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


def test_mixed_precision_training_turns_the_casts_off(tiny_model, tmp_path, monkeypatch):
    import sdtune.train as tr

    seen = []
    real = tr.training_step

    def spy(denoiser, *args, **kw):
        if torch.is_grad_enabled():  # the training step, not finish's health check
            seen.append({layer.cast_input_dtype_enabled for layer in denoiser.modules()
                         if hasattr(layer, "cast_input_dtype_enabled")})
        return real(denoiser, *args, **kw)

    monkeypatch.setattr(tr, "training_step", spy)
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "bf16", "train.max_steps=1",
                                      "train.mixed_precision=bf16")))
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "fp32", "train.max_steps=1")))
    assert seen == [{False}, {True}]
