"""What sdtune's training step costs beyond the step itself: its step against a bare diffusers-style loop on the
same tiny model, same LoRA, same batch shape, step-paired in one process (sdtune, bare, sdtune, bare, ...: the
machine's noise falls on both), in CPU seconds; and how many aten ops each dispatches per step. One JSON line.

    python bench/step_overhead.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def count_ops(step) -> int:
    """aten ops dispatched by one call of ``step``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="paired steps timed (after 5 of each to warm up)")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()

    from sdtune.cli.console import quiet_imports, quiet_libraries

    quiet_imports()
    quiet_libraries()
    import torch
    import torch.nn.functional as F

    from sdtune.config import load_config
    from sdtune.guards import NonFiniteGuard
    from sdtune.lora import add_lora
    from sdtune.models import load_components, write_random_model
    from sdtune.plan import check_run
    from sdtune.train import LossLog, forward_backward, make_accelerator, optimizer_update, setup

    torch.set_num_threads(1)  # one core each, in turn: CPU time is then the step's own
    work = Path(tempfile.mkdtemp(prefix="sdtune-overhead-"))
    model = write_random_model(work / "model", "sd15", "tiny")
    cfg = load_config(None, [
        f"model.pretrained={model}", f"data.instance_dir={ROOT / 'data' / 'demo_toy'}", "data.identifier=sks",
        "data.resolution=64", f"train.output_dir={work / 'run'}", f"train.batch_size={args.batch_size}",
        "train.max_steps=100000", "train.report_to=none", "train.checkpoint_every=0",
    ])
    run = setup(cfg, check_run(cfg), make_accelerator(cfg))
    guard = NonFiniteGuard(run.optimizer, run.accelerator.scaler, 5, warn=print)
    losses = LossLog(run)
    data = iter(run.loader)

    def sdtune_step() -> None:  # the body of sdtune.train.loop, less its once-per-N-steps bookkeeping
        batch = next(data)
        with run.accelerator.accumulate(*run.modules.values()):
            out = forward_backward(run, batch)
            finite = optimizer_update(run, out.loss, guard)
        losses.add(out.loss, finite)
        guard.record(0, finite, batch["paths"])

    # The bare loop: what a careful hand-written DreamBooth step does with the same features (cached latent
    # distributions sampled each step, cached prompt embeddings, gradient clipping, fused AdamW), on the same
    # architecture and LoRA; without sdtune's structure, guards and bookkeeping.
    c = load_components(str(model), run.family)
    add_lora(c.denoiser, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    params = [p for p in c.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(args.batch_size, 4, 8, 8, generator=g), torch.rand(args.batch_size, 4, 8, 8, generator=g)
    hidden = torch.randn(args.batch_size, 77, c.text_encoders[0].config.hidden_size, generator=g)

    def bare_step() -> None:
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * 0.18215
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = c.denoiser(noisy, timesteps, hidden, return_dict=False)[0]
        F.mse_loss(model_pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        sdtune_step()
        bare_step()
    ours = bare = 0.0
    for _ in range(args.steps):
        t0 = time.process_time()
        sdtune_step()
        t1 = time.process_time()
        bare_step()
        ours, bare = ours + t1 - t0, bare + time.process_time() - t1
    ops_ours, ops_bare = count_ops(sdtune_step), count_ops(bare_step)
    print(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "sdtune_cpu_s_per_step": round(ours / args.steps, 5),
        "bare_cpu_s_per_step": round(bare / args.steps, 5), "ratio": round(ours / bare, 3),
        "sdtune_ops_per_step": ops_ours, "bare_ops_per_step": ops_bare, "extra_ops": ops_ours - ops_bare,
    }))


if __name__ == "__main__":
    main()
