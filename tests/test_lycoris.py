"""lora.type loha / lokr: PEFT's LoHa and LoKr trained, resumed bitwise, exported in LyCORIS' kohya layout and
sampled back.

The proof that the UIs load the exported file right: each module's update is rebuilt from the file's tensors
with ComfyUI's and AUTOMATIC1111's own formulas (re-implemented below from comfy/weight_adapter/loha.py and
lokr.py, and from extensions-builtin/Lora/network_hada.py, network_lokr.py, lyco_helpers.py and network.py's
NetworkModule.calc_scale / finalize_updown) and compared with PEFT's ``get_delta_weight`` of the trained
layer. The file's module names are the LoRA export's, which tests/test_export.py checks against both loaders'
key rules.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import overrides
from sdtune import export, families, ldm
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.export import Adapter, kohya_module_name, lycoris_from_kohya, read_run, to_kohya, write_kohya
from sdtune.lora import (
    WEIGHT_NAME,
    add_lora,
    has_adapter,
    inject_adapter,
    is_adapter_key,
    load_adapter_state_dict,
)
from sdtune.models import load_components
from sdtune.plan import check_run
from sdtune.sample import ADAPTER, _apply_lora
from sdtune.train import train

F = families.get
KINDS = ["loha", "lokr"]
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that ignored alpha, or read it as LoRA's, renders differently
# Linear (attention, the 256 x 32 feed-forward), 1x1 conv (proj_in) and 3x3 convs of several shapes (conv1).
# On the tiny model this gives LoKr both cases: to_q (32 x 32 = 4x8 (x) 4x8) has two full Kronecker factors at
# rank 4 (PEFT's alpha / r is then folded into lokr_w1), ff.net.0.proj and conv1 a rank-decomposed lokr_w2
# (the loaders' alpha / rank).
TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
# float32 pixels in [0, 1]; the file's factors are the trained ones, bar alpha / rank multiplied into a factor
TOLERANCE = 1e-4


def _overrides(model: Path, kind: str, out: Path, *extra: str) -> list[str]:
    return overrides(model, out, f"lora.type={kind}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                     f"lora.target_modules=[{','.join(TARGETS)}]", "lora.train_text_encoder=true",
                     f"lora.text_encoder_target_modules=[{','.join(TE_TARGETS)}]", "train.learning_rate=0.01",
                     "train.max_steps=4", "train.checkpoint_every=2", *extra)


@pytest.fixture(scope="module")
def lycoris_run(tiny_model, tmp_path_factory):
    """lycoris_run(kind) -> a tiny sd15 run of that lora.type (4 steps, checkpoints at 2 and 4)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"lycoris-{kind}") / "run"
            train(load_config(None, _overrides(tiny_model("sd15"), kind, out)))
            made[kind] = out
        return made[kind]

    return get


# --------------------------------------------------------------------------------------------------------
# The loaders' formulas, as facts (ComfyUI and AUTOMATIC1111, non-Tucker factors)


def comfy_delta(kind: str, w: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """comfy/weight_adapter/{loha,lokr}.py calculate_weight: the update it adds at strength 1."""
    alpha = w["alpha"].item() if "alpha" in w else None
    if kind == "loha":
        scale = alpha / w["hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = torch.mm(w["hada_w1_a"], w["hada_w1_b"])
        m2 = torch.mm(w["hada_w2_a"], w["hada_w2_b"])
        return scale * (m1 * m2).reshape(shape)
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        dim = w["lokr_w1_b"].shape[0]
        w1 = torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        dim = w["lokr_w2_b"].shape[0]
        w2 = torch.mm(w["lokr_w2_a"], w["lokr_w2_b"])
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def a1111_delta(kind: str, w: dict[str, torch.Tensor], orig_shape: torch.Size) -> torch.Tensor:
    """network_hada.py / network_lokr.py calc_updown, then NetworkModule.finalize_updown x calc_scale."""
    def rebuild_conventional(up, down, shape):  # lyco_helpers.py
        return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)

    alpha = w["alpha"].item() if "alpha" in w else None
    if kind == "loha":
        dim = w["hada_w1_b"].shape[0]
        output_shape = [w["hada_w1_a"].size(0), w["hada_w1_b"].size(1)]
        updown = (rebuild_conventional(w["hada_w1_a"], w["hada_w1_b"], output_shape)
                  * rebuild_conventional(w["hada_w2_a"], w["hada_w2_b"], output_shape))
    else:
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_shape) == 4:
            output_shape = orig_shape
        if len(w2.shape) == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig_shape.numel() == updown.size().numel():
        updown = updown.reshape(orig_shape)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return updown * scale


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = tensor
    return grouped


def _kohya(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _check_against_peft(family: str, kind: str, modules: dict[str, torch.nn.Module],
                        tensors: dict[str, torch.Tensor]) -> int:
    """Every adapted layer of ``modules`` ({component: PEFT-injected module}) has its group in the kohya
    ``tensors``, whose ComfyUI and A1111 updates equal PEFT's; returns how many layers were compared."""
    grouped = _by_module(tensors)
    compared = 0
    for component, model in modules.items():
        for name, layer in model.named_modules():
            if not has_adapter(layer):
                continue
            w = grouped.pop(kohya_module_name(F(family), component, name))
            shape = layer.get_base_layer().weight.shape
            with torch.no_grad():
                peft = layer.get_delta_weight("default").float()
            assert peft.abs().max() > 0, f"{component}.{name}: the adapter did not move"
            atol = 1e-6 * float(peft.abs().max())  # float rounding of the same products, in another order
            assert torch.allclose(comfy_delta(kind, w, shape), peft, rtol=1e-5, atol=atol), (component, name)
            assert torch.allclose(a1111_delta(kind, w, shape), peft, rtol=1e-5, atol=atol), (component, name)
            compared += 1
    assert grouped == {}, f"file groups on no adapted layer: {sorted(grouped)[:3]}"
    return compared


def _injected(model: Path, family: str, kind: str,
              adapters: dict[str, Adapter]) -> dict[str, torch.nn.Module]:
    """Fresh components with the run's adapters put in by PEFT as training made them: the ground truth."""
    c = load_components(str(model), F(family))
    modules = c.named_modules(F(family))
    out = {}
    for component, adapter in adapters.items():
        targets = TARGETS if component == "unet" else TE_TARGETS
        add_lora(modules[component], RANK, ALPHA, targets, kind=kind)
        load_adapter_state_dict(modules[component], adapter.tensors)
        out[component] = modules[component]
    return out


# --------------------------------------------------------------------------------------------------------
# What each kind is for, on one layer: LoHa's update reaches rank r^2 for twice LoRA's parameters; LoKr's
# reaches far beyond r with fewer parameters than LoRA (LyCORIS' FedPara and KronA arguments)


def test_loha_and_lokr_buy_rank_per_parameter():
    from peft import inject_adapter_in_model

    from sdtune.lora import adapter_config

    found = {}
    for kind in ("lora", *KINDS):
        torch.manual_seed(0)
        layer = torch.nn.Sequential()
        layer.add_module("proj", torch.nn.Linear(64, 64, bias=False))
        config = adapter_config(kind, 2, None, ["proj"])
        config.init_weights = False  # random factors, none zero: the update's reachable rank shows
        if kind == "lora":
            config.init_lora_weights = False
        model = inject_adapter_in_model(config, layer)
        params = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
        with torch.no_grad():
            delta = model.proj.get_delta_weight("default")
        found[kind] = (params, int(torch.linalg.matrix_rank(delta)))
    assert found["lora"] == (256, 2)  # 64x2 + 2x64, rank r
    assert found["loha"] == (512, 4)  # twice the parameters, rank r^2 (Hadamard product of two rank r)
    assert found["lokr"] == (96, 16)  # lokr_w1 8x8 (x) lokr_w2_a 8x2 @ w2_b 2x8: rank 8 x 2 from 96 numbers


# --------------------------------------------------------------------------------------------------------
# Training and exact resume


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_resumes_bitwise(kind, lycoris_run, tiny_model, tmp_path):
    run = lycoris_run(kind)
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in losses)
    prefix = {"loha": ".hada_", "lokr": ".lokr_"}[kind]
    first = load_file(run / "checkpoints/step-000002/adapter-unet.safetensors")
    last = load_file(run / "checkpoints/step-000004/adapter-unet.safetensors")
    assert first and all(prefix in k for k in first) and first.keys() == last.keys()
    assert any(not torch.equal(first[k], last[k]) for k in first), "steps 3-4 changed nothing"
    with safe_open(str(run / WEIGHT_NAME), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.peft_type"] == kind.upper() and config["text_encoder.peft_type"] == kind.upper()

    # the run "crashed" after its step-2 checkpoint, then resumed: the same step-4 adapters, bit for bit
    split = tmp_path / "split"
    shutil.copytree(run, split)
    shutil.rmtree(split / "checkpoints/step-000004")
    (split / WEIGHT_NAME).unlink()
    train(load_config(None, _overrides(tiny_model("sd15"), kind, split, "train.resume=latest")))
    again = {r["step"]: r["loss"] for r in map(json.loads, (split / "losses.jsonl").read_text().splitlines())}
    assert [again[s] for s in (3, 4)] == [r["loss"] for r in losses[2:]]
    for component in ("unet", "text_encoder"):
        a = load_file(run / f"checkpoints/step-000004/adapter-{component}.safetensors")
        b = load_file(split / f"checkpoints/step-000004/adapter-{component}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


# --------------------------------------------------------------------------------------------------------
# The LyCORIS file: layout, metadata, and the UIs' formulas


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_kohya_file_is_lycoris_and_the_uis_rebuild_peft_updates(kind, lycoris_run, tiny_model, tmp_path):
    run = lycoris_run(kind)
    path = export.export_run(run, "kohya", tmp_path / f"{kind}.safetensors")[0]
    tensors, meta = _kohya(path)
    adapters = read_run(run).adapters
    assert {a.kind for a in adapters.values()} == {kind}

    # module names: exactly the LoRA export's for the same modules (checked against both loaders' key rules in
    # test_export.py); parts: LyCORIS' factors and alpha, nothing else
    lora_like = {c: Adapter({f"{m}.lora_{ab}.weight": torch.ones(1, 1) for m in a.modules() for ab in "AB"},
                            {"r": 1, "lora_alpha": 1}) for c, a in adapters.items()}
    lora_names = {k.split(".")[0] for k in to_kohya(F("sd15"), lora_like)[0]}
    grouped = _by_module(tensors)
    assert set(grouped) == lora_names
    assert {k.startswith(("lora_unet_", "lora_te_")) for k in tensors} == {True}
    for name, w in grouped.items():
        assert w["alpha"].dim() == 0 and w["alpha"].dtype == torch.float32
        if kind == "loha":  # LyCORIS LohaModule: w1_a (out, r), w1_b (r, in * kh * kw), the same for w2
            assert set(w) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, name
            out, flat_in = w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]
            for f, shape in {"hada_w1_a": (out, RANK), "hada_w1_b": (RANK, flat_in), "hada_w2_a": (out, RANK),
                             "hada_w2_b": (RANK, flat_in)}.items():
                assert tuple(w[f].shape) == shape, (name, f)
        else:  # LokrModule (factor -1, no decompose_both): full lokr_w1; lokr_w2 full or (b, r) @ (r, d*k*k)
            assert "lokr_w1" in w and ({"lokr_w2"} <= set(w) or {"lokr_w2_a", "lokr_w2_b"} <= set(w)), name
            if "lokr_w2_a" in w:
                assert w["lokr_w2_a"].shape[1] == RANK and w["lokr_w2_b"].shape[0] == RANK
    if kind == "lokr":  # both cases are exercised
        assert {"lokr_w2" in w for w in grouped.values()} == {True, False}
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    lokr_args = {"algo": "lokr", "factor": "-1", "decompose_both": "False"}
    assert args == ({"algo": "loha"} if kind == "loha" else lokr_args)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["ss_base_model_version"] == "sd_v1"

    modules = _injected(tiny_model("sd15"), "sd15", kind, adapters)
    n = _check_against_peft("sd15", kind, modules, tensors)
    assert n == sum(len(a.modules()) for a in adapters.values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sdxl_both_text_encoders_round_trip(kind, tiny_model, tmp_path):
    """SDXL (its lora_te1_ / lora_te2_ names, CLIPTextModelWithProjection): random adapters written with
    write_kohya rebuild PEFT's updates with the UIs' formulas, and read back (sample's path) into fresh
    modules give the same updates."""
    model = tiny_model("sdxl")
    c = load_components(str(model), F("sdxl"))
    modules = c.named_modules(F("sdxl"))
    torch.manual_seed(0)
    for component, module in modules.items():
        add_lora(module, RANK, ALPHA, TARGETS if component == "unet" else TE_TARGETS, kind=kind)
        for p in module.parameters():
            if p.requires_grad:  # trained-looking factors, none zero
                p.data.normal_()
    path = write_kohya(tmp_path / "xl.safetensors", F("sdxl"), modules)
    tensors, meta = _kohya(path)
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"].startswith("sdxl")
    assert json.loads(meta["ss_network_args"])["algo"] == kind
    _check_against_peft("sdxl", kind, modules, tensors)

    fresh = load_components(str(model), F("sdxl")).named_modules(F("sdxl"))
    adapters = lycoris_from_kohya(tensors, F("sdxl"), fresh, str(path))
    for component, adapter in adapters.items():
        inject_adapter(fresh[component], adapter.config, adapter.tensors, "default")
    for component, module in modules.items():
        layers = dict(fresh[component].named_modules())
        for name, layer in module.named_modules():
            if has_adapter(layer):
                with torch.no_grad():
                    want, got = layer.get_delta_weight("default"), layers[name].get_delta_weight("default")
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (component, name)


@pytest.mark.parametrize("kind", [*KINDS, "dora"])
def test_sd_scripts_sdxl_names_read_as_sdtunes(kind, tiny_model, tmp_path):
    """kohya's sd-scripts trains SDXL on the original (SGM) UNet, so its LyCORIS and DoRA files name the UNet's
    modules after it (lora_unet_input_blocks_4_1_...): `sdtune sample`'s readers take those names for the
    same modules (the names as ``sdtune.ldm.unet_to_original`` writes a single file, which diffusers' own
    single-file loader reads back in tests/test_single_file.py). Such files were refused ("names no SDXL
    module of this model"), or their DoRA magnitudes dropped."""
    from safetensors.torch import save_file

    model = tiny_model("sdxl")
    c = load_components(str(model), F("sdxl"))
    modules = c.named_modules(F("sdxl"))
    torch.manual_seed(0)
    add_lora(modules["unet"], RANK, ALPHA, TARGETS, **({"use_dora": True} if kind == "dora" else {"kind": kind}))
    for p in modules["unet"].parameters():
        if p.requires_grad:
            p.data.normal_()
    path = write_kohya(tmp_path / "xl.safetensors", F("sdxl"), {"unet": modules["unet"]})
    fresh = load_components(str(model), F("sdxl")).named_modules(F("sdxl"))
    unet = fresh["unet"]
    state = list(unet.state_dict())
    sgm = {d[: -len(".weight")].replace(".", "_"): o[: -len(".weight")].replace(".", "_")
           for d, o in zip(state, ldm.unet_to_original(unet)) if d.endswith(".weight")}
    renamed = {}
    for key, value in load_file(path).items():
        module, _, part = key.partition(".")
        renamed[f"lora_unet_{sgm[module.removeprefix('lora_unet_')]}.{part}"] = value
    assert any("input_blocks_" in k for k in renamed) and not any("down_blocks" in k for k in renamed)
    save_file(renamed, str(tmp_path / "sgm.safetensors"))
    if kind == "dora":
        ours, theirs = (export.read_kohya_lora(f, F("sdxl"), fresh) for f in (path, tmp_path / "sgm.safetensors"))
    else:
        ours = lycoris_from_kohya(load_file(path), F("sdxl"), fresh, str(path))
        theirs = lycoris_from_kohya(renamed, F("sdxl"), fresh, "sgm.safetensors")
    assert ours is not None and theirs is not None and ours["unet"].config == theirs["unet"].config
    assert ours["unet"].tensors.keys() == theirs["unet"].tensors.keys()
    assert all(torch.equal(ours["unet"].tensors[k], theirs["unet"].tensors[k]) for k in ours["unet"].tensors)


def _foreign_factors(kind: str, layer: torch.nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The factor shapes LyCORIS gives ``layer`` at ``rank`` (LoKr: factor 4, decompose_both, its rule for
    which factor is a full matrix)."""
    from peft.tuners.lokr.layer import factorization

    out, inn, *k = layer.weight.shape
    flat = math.prod(k)
    if kind == "loha":
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, inn * flat), "hada_w2_a": (out, rank),
                "hada_w2_b": (rank, inn * flat)}
    (a, b), (c, d) = factorization(out, 4), factorization(inn, 4)
    full_w1 = rank >= max(a, c) / 2
    parts = {"lokr_w1": (a, c)} if full_w1 else {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)}
    if rank < max(b, d) / 2:
        return parts | {"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * flat)}
    return parts | {"lokr_w2": (b, d, *k)}


def test_files_from_other_trainers_load(tiny_model):
    """LyCORIS files sdtune did not write: ranks differing per module, a LoKr with factor 4 and both factors
    rank-decomposed where its rank allows, a LoHa without alpha: sample's reader puts them into PEFT layers
    whose updates are ComfyUI's."""
    g = torch.Generator().manual_seed(0)
    for kind in KINDS:
        unet = load_components(str(tiny_model("sd15")), F("sd15")).denoiser
        layers = {n: m for n, m in unet.named_modules()
                  if n.endswith(("attn1.to_q", "attn1.to_v", "ff.net.0.proj", "resnets.0.conv1"))}
        tensors = {}
        for i, (name, layer) in enumerate(sorted(layers.items())):
            rank = 1 if i % 2 else 3
            key = kohya_module_name(F("sd15"), "unet", name)
            factors = _foreign_factors(kind, layer, rank)
            tensors |= {f"{key}.{p}": torch.randn(*shape, generator=g) for p, shape in factors.items()}
            if kind == "lokr":
                tensors[f"{key}.alpha"] = torch.tensor(float(rank + 1))
        if kind == "lokr":  # the file mixes full and rank-decomposed factors
            assert {k.endswith(".lokr_w1") for k in tensors if ".lokr_w1" in k} == {True, False}
        adapters = lycoris_from_kohya(tensors, F("sd15"), {"unet": unet})
        assert adapters["unet"].config["rank_pattern"]  # two ranks
        inject_adapter(unet, adapters["unet"].config, adapters["unet"].tensors, ADAPTER)
        grouped = _by_module(tensors)
        injected = dict(unet.named_modules())  # PEFT replaced each layer with its own, around it
        for name in layers:
            layer = injected[name]
            shape = layer.get_base_layer().weight.shape
            with torch.no_grad():
                got = layer.get_delta_weight(ADAPTER)
            want = comfy_delta(kind, grouped[kohya_module_name(F("sd15"), "unet", name)], shape)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (kind, name)


# --------------------------------------------------------------------------------------------------------
# Sampling the run, its checkpoint and the exported file


def _render(model: Path, setup=None, scale: float | None = None):
    pipe = F("sd15").pipeline(load_components(str(model), F("sd15")))
    pipe.set_progress_bar_config(disable=True)
    if setup is not None:
        setup(pipe)
    if scale is not None:
        pipe.set_adapters([next(iter(pipe.unet.peft_config))], adapter_weights=[scale])

    def images():
        return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    return images(), pipe, images


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_run_file_and_lycoris_export_render_like_the_trained_adapters(kind, lycoris_run, tiny_model,
                                                                      tmp_path):
    run = lycoris_run(kind)
    model = tiny_model("sd15")
    exported = export.export_run(run, "kohya", tmp_path / f"{kind}.safetensors")[0]
    adapters = read_run(run).adapters

    def direct(pipe):  # the ground truth: PEFT's layers holding the trained tensors
        for component, adapter in adapters.items():
            add_lora(getattr(pipe, component), RANK, ALPHA, TARGETS if component == "unet" else TE_TARGETS,
                     kind=kind)
            load_adapter_state_dict(getattr(pipe, component), adapter.tensors)

    base, _, _ = _render(model)
    truth, _, _ = _render(model, direct)
    half_truth = _render(model, direct, scale=0.5)[0]
    assert np.abs(truth - base).max() > 0.05, "the adapter must change the image, or equality proves nothing"
    assert np.abs(truth - half_truth).max() > 0.01
    for lora_file in (run / WEIGHT_NAME, run / "checkpoints/step-000004" / WEIGHT_NAME, exported):
        got, pipe, again = _render(model, lambda p, f=lora_file: _apply_lora(p, str(f), F("sd15")))
        assert np.abs(got - truth).max() <= TOLERANCE, lora_file.name
        assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
        # the LoRA scale reaches LoHa / LoKr layers too (sample's --lora-scale)
        pipe.set_adapters([ADAPTER], adapter_weights=[0.5])
        assert np.abs(again() - half_truth).max() <= TOLERANCE
        pipe.unload_lora_weights()  # as run_sample does between checkpoints: the base model again
        assert np.abs(again() - base).max() <= 1e-6
        assert not any(k in n for n, _ in pipe.unet.named_parameters() for k in ("hada_", "lokr_"))


@pytest.mark.slow
def test_sdtune_sample_renders_loha_runs_checkpoints_and_exports(lycoris_run, tmp_path, capsys):
    from PIL import Image

    run = lycoris_run("loha")
    exported = export.export_run(run, "kohya", tmp_path / "loha.safetensors")[0]
    model = str(read_run(run).base_model)
    common = ["--prompt", "a photo of sks toy", "--steps", "2", "--seeds", "0", "--lora-scale", "0,1",
              "--width", "64", "--height", "64"]
    for name, target, extra in [("run", run, []), ("step2", run / "checkpoints/step-000002", []),
                                ("file", exported, ["--model", model])]:
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(target), *common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        cells = sorted((tmp_path / f"{out.stem}_cells").glob("cell-*.png"))
        assert len(cells) == 2
        base, lora = (np.asarray(Image.open(p), dtype=np.float32) for p in cells)
        assert np.abs(base - lora).max() > 0, f"{target}: scale 1 rendered the base model"
    # two renders of the same run at scale 1: the run file and its LyCORIS export
    run_cell = np.asarray(Image.open(tmp_path / "run_cells/cell-0001.png"), dtype=np.int16)
    file_cell = np.asarray(Image.open(tmp_path / "file_cells/cell-0001.png"), dtype=np.int16)
    assert np.abs(run_cell - file_cell).max() <= 1  # 8-bit pictures: at most one level of rounding


# --------------------------------------------------------------------------------------------------------
# What LoHa / LoKr cannot do, refused before anything loads; the diffusers format says what reads it


@pytest.mark.parametrize("kind", KINDS)
def test_dora_and_dropout_are_refused_with_loha_and_lokr(kind, tiny_model, tmp_path):
    cfg = load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", f"lora.type={kind}",
                                      "lora.use_dora=true", "lora.dropout=0.1"))
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    message = str(e.value)
    assert f"lora.use_dora: DoRA is LoRA's; PEFT has no DoRA for lora.type={kind}" in message
    assert "lora.dropout:" in message and "has no input dropout" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_card_and_other_formats_of_a_lokr_run(lycoris_run, tmp_path):
    from peft import PeftModel

    run = lycoris_run("lokr")
    card = (run / "README.md").read_text()  # the model card does not promise what diffusers cannot load
    assert "pipe.load_lora_weights(" not in card and "LyCORIS lokr" in card and "(lokr)" in card
    path, warnings = export.export_run(run, "diffusers", tmp_path / "lokr.safetensors")
    assert any("does not read" in w and "--format kohya" in w for w in warnings)
    keys = read_run(run).adapters["unet"].tensors.keys()
    assert export.read_diffusers_lora(path)["unet"].tensors.keys() == keys
    folder = export.export_run(run, "peft", tmp_path / "peft")[0]
    config = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and config["r"] == RANK and config["alpha"] == ALPHA
    c = load_components(read_run(run).base_model, F("sd15"))
    peft_unet = PeftModel.from_pretrained(c.denoiser, str(folder / "unet"))
    assert any(has_adapter(m) for m in peft_unet.modules())
