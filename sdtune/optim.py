"""The optimizers of a LoRA run (``train.optimizer``), each built with the settings its authors give for LoRA.

- ``adamw``: torch's AdamW, fused where the device allows (one launch for all LoRA tensors, and it skips a
  non-finite step on the device).
- ``adamw8bit`` / ``lion8bit``: bitsandbytes' AdamW8bit / Lion8bit without its per-tensor host syncs.
  ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after every parameter (it needs to only for paged
  state), so an SD1.5 LoRA (256 tensors at the default targets) waited for the GPU 256 times per step;
  ``make_optimizer`` gives the same kernels in the same order without those waits. The 8-bit state only
  applies to tensors of 4,096 values or more (bitsandbytes' ``min_8bit_size``); ``eight_bit_share`` says how
  much of a LoRA that is, so a run can say when 8-bit state saves next to nothing.
- ``prodigy``: ``prodigyopt.Prodigy``, which estimates the step size itself: learning rate 1.0, Adam's bias
  correction and the warm-up safeguard on (its authors' advice for diffusion models); ``d_coef`` tunes it.
- ``adafactor``: torch's own ``torch.optim.Adafactor`` at a fixed learning rate (kohya's LoRA setting
  ``relative_step=False, scale_parameter=False``), factored second moments, no first moment.
- ``lion``: ``lion_pytorch.Lion``: sign updates, one moment; a learning rate 3-10x below AdamW's.
- ``adamw_schedulefree``: ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024, Meta's package): no decaying
  schedule; it steps at one point (y) and averages into another (x), the weights to sample, validate and
  save. A constant learning rate (warm-up allowed), its authors' advice; typically 1-10x a scheduled AdamW's.
- ``prodigy_schedulefree``: ``prodigyplus.ProdigyPlusScheduleFree`` (prodigy-plus-schedule-free, what
  OneTrainer and kohya users run as "Prodigy + Schedule-Free"): Prodigy's step size on top of Schedule-Free,
  learning rate 1.0, a constant schedule and no gradient clipping (it scales its updates itself: StableAdamW).

A schedule-free optimizer's weights between steps are y; ``averaged_weights`` switches to x (their ``eval()``)
for whatever shows or saves the LoRA, and puts y back bit for bit afterwards (their ``train()`` lerps back,
which rounds): so a run that samples or checkpoints on the way trains exactly as one that does not, and a
checkpoint, which keeps y and the optimizer's state, resumes exactly.

``train.optimizer_args`` are passed through as keyword arguments; ``optimizer_problems`` checks them against
the optimizer's real signature at plan time, before any weight loads. Every optimizer's state is a plain
``state_dict``, which checkpoints save and restore (exact resume).

torch and the optimizers' packages are imported inside the functions: ``sdtune.plan`` imports this module and
``sdtune --help`` must load no torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    import torch

MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors in 32-bit state (small tensors quantise badly)
# what the sync-free step below calls of bitsandbytes' Optimizer8bit; a version without them keeps its step
_STEP_PARTS = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")

PRODIGY_LR_RANGE = (0.1, 10.0)  # Prodigy's learning rate scales the step size it finds: 1.0 is meant
LION_MAX_LR = 1e-4  # from here up a learning rate looks like AdamW's (sdtune's default), too high for Lion
LION_BETA2 = 0.99  # Lion's paper and lion-pytorch's default
_SHORT = reprlib.Repr()  # a value shown in a problem line is cut to fit it (a recipe may hold a 1 MiB string)
_SHORT.maxstring = 80


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``train.optimizer`` choice: where its class lives and what sdtune sets in it."""

    label: str
    module: str  # imported on use; its pip package is named in the refusal when it is missing
    attr: str
    package: str
    recommended: dict[str, Any] = field(default_factory=dict)  # authors' LoRA settings (optimizer_args win)
    betas: bool = True  # takes (train.adam_beta1, train.adam_beta2) as betas
    eps: bool = True  # takes train.adam_epsilon as eps
    state_copies: int = 2  # fp32 copies of the LoRA its state holds at most (for disk estimates)
    schedule_free: bool = False  # steps at y, shows x: train() / eval() (``averaged_weights``)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("AdamW", "torch.optim", "AdamW", "torch"),
    "adamw8bit": OptimizerSpec("8-bit AdamW", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    # prodigyopt's README: lr 1.0; use_bias_correction and safeguard_warmup for diffusion models (with
    # warm-up, the small early learning rates would make it overestimate the step size); d_coef tunes it
    "prodigy": OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt",
                             {"use_bias_correction": True, "safeguard_warmup": True, "d_coef": 1.0},
                             state_copies=4),
    # torch's step is alpha = max(eps2, RMS(weight)) * min(lr, 1 / sqrt(t)): eps2 = 1.0 makes it lr itself for
    # every LoRA tensor (their RMS is below 1), a fixed learning rate as kohya's relative_step=False,
    # scale_parameter=False; with torch's eps2 = 1e-3, lora_B (zero at init) would move 1000x slower
    "adafactor": OptimizerSpec("Adafactor", "torch.optim", "Adafactor", "torch", {"eps": (None, 1.0)},
                               betas=False, eps=False, state_copies=1),
    "lion": OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch", eps=False, state_copies=1),
    "lion8bit": OptimizerSpec("8-bit Lion", "bitsandbytes.optim", "Lion8bit", "bitsandbytes", eps=False,
                              state_copies=1),
    # state: z (the point the average follows) and Adam's second moment
    "adamw_schedulefree": OptimizerSpec("Schedule-Free AdamW", "schedulefree", "AdamWScheduleFree", "schedulefree",
                                        schedule_free=True),
    # state: z, Prodigy's s and p0, factored second moments (the package's README: lr 1.0, betas (0.9, 0.99))
    "prodigy_schedulefree": OptimizerSpec("Prodigy + Schedule-Free", "prodigyplus.prodigy_plus_schedulefree",
                                          "ProdigyPlusScheduleFree", "prodigy-plus-schedule-free",
                                          state_copies=3, schedule_free=True),
}
SCHEDULE_FREE_SCHEDULERS = ("constant", "constant_with_warmup")  # what their authors pair them with

# Arguments set from other recipe keys; optimizer_args naming one is refused with the key to use instead.
_FROM_RECIPE = {"params": "the LoRA's parameters", "lr": "train.learning_rate",
                "betas": "train.adam_beta1 and train.adam_beta2", "eps": "train.adam_epsilon",
                "weight_decay": "train.weight_decay"}


def optimizer_class(name: str) -> type:
    """The class ``train.optimizer=name`` trains with (8-bit ones without their host syncs); an SdtuneError
    naming the package to install when it is missing."""
    spec = OPTIMIZERS[name]
    try:
        cls = getattr(importlib.import_module(spec.module), spec.attr)
    except (ImportError, AttributeError) as e:  # chosen explicitly: never fall back silently to another one
        raise SdtuneError(f"train.optimizer: {name} needs {spec.package} ({e}); pip install {spec.package}, "
                          "or set train.optimizer=adamw") from None
    return _sync_free(cls) if spec.package == "bitsandbytes" else cls


def optimizer_kwargs(name: str, betas: tuple[float, float], eps: float, weight_decay: float,
                     args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments ``name`` is built with (besides the parameter groups, which carry each lr): the
    recipe's betas / eps / weight decay where it takes them, its authors' LoRA settings, then ``args``."""
    spec = OPTIMIZERS[name]
    kwargs: dict[str, Any] = {"weight_decay": weight_decay, **spec.recommended}
    if spec.betas:
        kwargs["betas"] = betas
    if spec.eps:
        kwargs["eps"] = eps
    return {**kwargs, **(args or {})}


def is_schedule_free(name: str) -> bool:
    """Whether ``train.optimizer=name`` trains at one point and shows another (``averaged_weights``)."""
    return OPTIMIZERS[name].schedule_free


def start_training(optimizer: Any) -> None:
    """Put a schedule-free optimizer in its training mode (y) before its first step (it refuses to step
    otherwise); nothing for the others (Accelerate's wrapper passes ``train()`` on only where it exists)."""
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()


@contextlib.contextmanager
def averaged_weights(optimizer: Any) -> Iterator[bool]:
    """Inside, a schedule-free optimizer's parameters are its average x (its ``eval()``: the weights to
    sample, validate and save); after, y again, bit for bit (a copy, where its ``train()`` would lerp back and
    round). Nothing for other optimizers, or when already at x (nested, or before the first step). Yields
    whether it switched."""
    import torch

    groups = getattr(optimizer, "param_groups", [])
    if not any(g.get("train_mode") and g.get("use_schedulefree", True) for g in groups):
        yield False
        return
    params = [p for g in groups for p in g["params"]]
    with torch.no_grad():
        y = [p.detach().clone() for p in params]  # one copy of the LoRA, for the time of the block
    optimizer.eval()
    try:
        yield True
    finally:
        optimizer.train()  # its mode flags back to training
        with torch.no_grad():
            for p, saved in zip(params, y):
                p.copy_(saved)


def make_optimizer(name: str, groups: list[dict], betas: tuple[float, float], eps: float, weight_decay: float,
                   args: dict[str, Any] | None = None) -> Any:
    """``train.optimizer=name`` over parameter groups (each with its ``lr``), ``args`` from
    ``train.optimizer_args``."""
    kwargs = optimizer_kwargs(name, betas, eps, weight_decay, args)
    if name == "adamw":
        # Fused kernels (CUDA and CPU): one launch for all LoRA tensors, and they can skip a non-finite step
        # on the device (``found_inf``), which lets the loop run without a host sync per step.
        fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
        kwargs.setdefault("fused", fused or None)
    cls = optimizer_class(name)
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy print()s "Using decoupled weight decay"
        return cls(groups, **kwargs)


def optimizer_problems(name: str, args: dict[str, Any], learning_rate: float,
                       text_encoder_lr: float | None = None, adam_beta2: float = 0.999,
                       lr_scheduler: str = "constant", max_grad_norm: float = 0.0,
                       ) -> tuple[list[str], list[str]]:
    """(problems, warnings) of ``train.optimizer`` and ``train.optimizer_args``, found without a model: the
    package is installed, every argument is one of the optimizer's (by its signature) and of the right type,
    the optimizer accepts them, and the learning rate, schedule and clipping suit it. Imports torch and the
    optimizer's package (only here, at plan time), except for torch's own optimizers without arguments."""
    advice = _advice(name, learning_rate, text_encoder_lr, adam_beta2)
    advice += _schedule_free_advice(name, lr_scheduler, max_grad_norm)
    if OPTIMIZERS[name].package == "torch" and not args:
        return [], advice  # in every torch sdtune supports (>= 2.6): a dry run need not import torch for them
    try:
        cls = optimizer_class(name)
    except SdtuneError as e:
        return [str(e)], advice
    problems = _argument_problems(name, cls, args)
    if not problems:
        problems += _construction_problems(name, cls, args)
    return problems, advice


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls(params, ...)`` takes, by name (the 8-bit classes' are their base's)."""
    init = next(c.__init__ for c in cls.__mro__ if "__init__" in vars(c))
    return {n: p for n, p in inspect.signature(init).parameters.items()
            if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _argument_problems(name: str, cls: type, args: dict[str, Any]) -> list[str]:
    spec, params = OPTIMIZERS[name], _parameters(cls)
    own = sorted(n for n in params if n not in _FROM_RECIPE and not _fixed(spec, n))
    problems = []
    for key, value in args.items():
        where = f"train.optimizer_args.{key}"
        if _fixed(spec, key):
            problems.append(f"{where}: sdtune sets {spec.label}'s {key} to {spec.recommended[key]!r} (a "
                            "fixed learning rate); optimizer_args cannot hold a pair. fix: remove it")
        elif key in _FROM_RECIPE and key in params:
            problems.append(f"{where}: {spec.label}'s {key} is set from {_FROM_RECIPE[key]}; set it there")
        elif key not in params:
            problems.append(f"{where}: {spec.label} has no argument '{key}'; it takes {', '.join(own)}")
        else:
            wrong = _type_problem(params[key].default, value)
            if wrong:
                problems.append(f"{where}: {spec.label}'s {key} {wrong}, got {_SHORT.repr(value)}")
    return problems


def _fixed(spec: OptimizerSpec, key: str) -> bool:
    """Whether sdtune sets ``key`` to a value optimizer_args cannot express (Adafactor's eps pair)."""
    return key in spec.recommended and not isinstance(spec.recommended[key], (bool, int, float, str))


def _type_problem(default: Any, value: Any) -> str | None:
    """Why ``value`` cannot stand where the signature's ``default`` stands (same kind: number, flag, text)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"is true or false (default {default})"
    if isinstance(default, int):
        return None if number and isinstance(value, int) else f"is a whole number (default {default})"
    if isinstance(default, float):
        return None if number else f"is a number (default {default})"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"is text (default {default!r})"
    return None  # no default to compare with (None, a tuple): the optimizer itself checks, below


def _construction_problems(name: str, cls: type, args: dict[str, Any]) -> list[str]:
    """What the optimizer says when built with these arguments over a dummy tensor and stepped once (its own
    range checks, and values of the wrong type that only its step reads, e.g. Prodigy's beta3)."""
    import torch

    spec = OPTIMIZERS[name]
    kwargs = optimizer_kwargs(name, (0.9, 0.999), 1e-8, 0.0, args)
    try:
        dummy = torch.nn.Parameter(torch.zeros(2, 2))
        dummy.grad = torch.ones(2, 2)
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = cls([dummy], lr=1e-4, **kwargs)
            start_training(optimizer)  # a schedule-free one steps only in its training mode
            optimizer.step()
    except Exception as e:  # whatever it raises about its arguments (ValueError, AssertionError, ...)
        shown = ", ".join(f"{k}={_SHORT.repr(v)}" for k, v in args.items())
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [f"train.optimizer_args: {spec.label} refuses {shown}: {said}"]
    return []


def _advice(name: str, learning_rate: float, text_encoder_lr: float | None, adam_beta2: float) -> list[str]:
    """Warnings about settings the optimizer's authors advise against: a learning rate of another optimizer's
    scale, Adam's beta2 for Lion."""
    rates = [("train.learning_rate", learning_rate)]
    if text_encoder_lr:
        rates.append(("lora.text_encoder_lr", text_encoder_lr))
    lines: list[str] = []
    for key, lr in rates:
        if name.startswith("prodigy") and not PRODIGY_LR_RANGE[0] <= lr <= PRODIGY_LR_RANGE[1]:
            lines.append(f"{key}: {lr:g} with train.optimizer={name}, which finds the step size itself and "
                         f"multiplies it by the learning rate: its authors use 1.0. fix: {key}=1.0 (to train "
                         "faster or slower, set train.optimizer_args.d_coef, e.g. 2 or 0.5)")
        if name in ("lion", "lion8bit") and lr >= LION_MAX_LR:
            lines.append(f"{key}: {lr:g} looks like an AdamW learning rate; Lion moves every weight by "
                         "the full learning rate each step (sign updates), so its authors use one 3-10x "
                         f"lower and a 3-10x higher train.weight_decay. fix: e.g. {key}={lr / 5:.2g}")
    if name in ("lion", "lion8bit") and adam_beta2 > LION_BETA2:
        # Lion steps along sign(beta1 * m + (1 - beta1) * g) and updates m with beta2: Adam's 0.999 makes m
        # ten times slower to follow the gradient than the 0.99 Lion was tuned with
        slower = (1 - LION_BETA2) / (1 - adam_beta2)
        lines.append(f"train.adam_beta2: {adam_beta2:g} with Lion, whose authors use 0.99 (its momentum "
                     f"follows the gradient {slower:.0f}x slower at {adam_beta2:g}). "
                     "fix: train.adam_beta2=0.99")
    return lines


def _schedule_free_advice(name: str, lr_scheduler: str, max_grad_norm: float) -> list[str]:
    """A schedule-free optimizer under a decaying schedule (its average already does what the decay is for),
    and Prodigy + Schedule-Free with clipping (which hides from Prodigy the gradient sizes it estimates from)."""
    if not is_schedule_free(name):
        return []
    lines = []
    if lr_scheduler not in SCHEDULE_FREE_SCHEDULERS:
        lines.append(f"train.lr_scheduler: {lr_scheduler} with train.optimizer={name}, which averages its "
                     "weights instead of decaying the learning rate: its authors use a constant one. "
                     "fix: train.lr_scheduler=constant (or constant_with_warmup)")
    if name == "prodigy_schedulefree" and max_grad_norm > 0:
        lines.append(f"train.max_grad_norm: {max_grad_norm:g} with train.optimizer={name}, which scales its "
                     "updates itself (StableAdamW); its author advises against clipping, which hampers its "
                     "step size estimate. fix: train.max_grad_norm=0")
    return lines


def state_copies(name: str) -> int:
    """How many fp32 copies of the LoRA ``name``'s state holds at most (AdamW 2, Prodigy 4, Lion 1)."""
    return OPTIMIZERS[name].state_copies


def eight_bit_share(params: list[torch.Tensor]) -> tuple[int, int, int, int]:
    """(tensors in 8-bit state, all tensors, values in 8-bit state, all values) for 8-bit AdamW."""
    big = [p for p in params if p.numel() >= MIN_8BIT_SIZE]
    return len(big), len(params), sum(p.numel() for p in big), sum(p.numel() for p in params)


@functools.cache
def _sync_free(base: type) -> type:
    """A bitsandbytes 8-bit optimizer class with a step that waits for the device only where paged state
    needs it."""
    import torch

    if not all(hasattr(base, part) for part in _STEP_PARTS):
        return base

    @torch.no_grad()
    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        # Optimizer8bit.step of bitsandbytes 0.45-0.50, less its sync_gpu(p) after each parameter: the
        # updates are queued on one stream in order, so nothing needs to wait unless state is paged.
        if self.is_paged:
            return base.step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        return loss

    return type(base.__name__, (base,), {"step": step, "__module__": __name__})


def step_size_logs(optimizer: Any) -> dict[str, float]:
    """What to log beside the learning rate: Prodigy's step size estimate ``d`` (its lr is a multiplier, 1.0),
    for the first parameter group (the denoiser's); nothing for the other optimizers."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    d = groups[0].get("d")
    return {"d": float(d)} if isinstance(d, (int, float)) and "d_coef" in groups[0] else {}
