"""DoRA (lora.type: dora): step-0 output, gradients against a dense float64 reference, parameter roles, exports in
the native (peft) and kohya/LyCORIS layouts, and the adapter tools that read it through delta_weight()."""

import copy
import math

import pytest
import torch
from torch import nn

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.adapter.algebra import merge_adapter
from sdlora.adapter.io import load_adapter, save_adapter
from sdlora.adapter.weights import DoRADelta
from sdlora.errors import UserError
from sdlora.lora import adapters_disabled, build_param_groups, inject_all
from sdlora.lora.dora import DoRAConv2d, DoRALinear
from sdlora.model.loading import load_components
from sdlora.training.loop import train
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

TOL = 1e-5  # fp32 outputs of O(1) size: a few hundred roundings of 6e-8 each stay far below this on any x86 CPU
INITS = ["zero", "orthogonal", "orthonormal", "compensated", "principal"]


def _layer(kind, init, *, learnable=False, dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(24, 20) if kind == "linear" else nn.Conv2d(6, 10, 3, stride=2, padding=1)
    base = base.to(dtype)
    ref = copy.deepcopy(base)
    cls = DoRALinear if kind == "linear" else DoRAConv2d
    layer = cls(base, 4, 3.0, init=init, learnable_alpha=learnable, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = torch.randn(5, 24, dtype=dtype) if kind == "linear" else torch.randn(2, 6, 9, 9, dtype=dtype)
    return layer, ref, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", INITS)
def test_every_init_leaves_the_step0_output_unchanged(kind, init):
    """m starts at ‖W0‖ and V at W0 (the offset inits shift the base by what B0·A0 adds back), so W = W0."""
    layer, ref, x = _layer(kind, init)
    assert float((layer(x) - ref(x)).detach().abs().max()) <= TOL
    with adapters_disabled(layer):
        assert float((layer(x) - ref(x)).detach().abs().max()) <= TOL


def _dense_reference(layer, kind, leaves):
    """W = m ⊙ V / ‖V‖_row (‖V‖ detached, as the paper and peft train), V = W' + s·B·A, all in float64."""
    x, a, b, alpha, m, w = leaves
    v = w + (alpha / layer.rank) * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).detach()
    weight = v * (m / norm).reshape(-1, *([1] * (v.dim() - 1)))
    if kind == "linear":
        return torch.nn.functional.linear(x, weight, layer.base.bias.detach())
    c = layer.base
    return torch.nn.functional.conv2d(x, weight, c.bias.detach(), c.stride, c.padding, c.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", ["orthogonal", "compensated"])
def test_gradients_match_a_dense_float64_reference(kind, init):
    """Gradients of x, A, B, learnable alpha and m against autograd on the dense formula, both in float64: the two
    differ only in the order of float64 roundings (~1e-16 relative), so 1e-10 of the gradient's scale holds anywhere."""
    layer, _, _ = _layer(kind, init, learnable=True, dtype=torch.float64)
    layer.base.weight.requires_grad_(True)
    with torch.no_grad():  # move away from the init so that every term (and the norm) matters
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
        layer.magnitude.mul_(1 + 0.2 * torch.rand_like(layer.magnitude))
    x = (torch.randn(3, 7, 24) if kind == "linear" else torch.randn(2, 6, 9, 9)).double().requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    params = (x, layer.lora_A, layer.lora_B, layer.alpha, layer.magnitude, layer.base.weight)
    got = [t.grad.clone() for t in params]
    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    ref = _dense_reference(layer, kind, leaves)
    (ref * g).sum().backward()
    assert float((y - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    for name, mine, theirs in zip("x A B alpha m W".split(), got, leaves):
        scale = max(1e-3, float(theirs.grad.abs().max()))
        assert float((mine - theirs.grad).abs().max()) <= 1e-10 * scale, name


def test_magnitude_has_its_own_role_at_the_module_rate_without_weight_decay(make_config):
    cfg = make_config(lora={"type": "dora", "learnable_alpha": True},
                      optim={"weight_decay": 0.01, "alpha_lr": 0.5, "lr_rules": [{"match": "unet.up", "lr": 0.25}]})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    groups = build_param_groups(layers, cfg, comps.family).groups
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, layer in layers.items():
        g = group_of[id(layer.magnitude)]
        assert g["lr"] == (0.25 if name.startswith("unet.up_blocks") else 1e-3) and g["weight_decay"] == 0.0, name
        assert ":m" in g["name"]
        assert group_of[id(layer.lora_A)]["weight_decay"] == 0.01


@pytest.fixture(scope="module")
def trained_dora(tmp_path_factory, tiny_model, shapes_data):
    """A DoRA run: compensated init (offset base), learnable alpha, conv modules, 10 steps."""
    from sdlora.config import validate

    out = tmp_path_factory.mktemp("dora")
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out / "run")}, "train": {"max_steps": 10, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-2, "max_grad_norm": None, "alpha_lr": 1e-2},
                    "lora": {"type": "dora", "rank": 4, "alpha": 3, "init": "compensated", "learnable_alpha": True,
                             "conv": True}, "log": {"tracker": "none"}})
    result = train(cfg)
    c = result.components
    c.unet.eval(), c.text_encoder.eval()
    return result, model_outputs(c.unet, c.text_encoder, c.tokenizer)


def test_export_loads_in_diffusers_as_peft_dora(trained_dora, tiny_model):
    """The native file (lora_A/lora_B with the scale folded in, the magnitudes) through load_lora_weights gives the
    trained model's outputs, text encoder included: peft computes the same m ⊙ V / ‖V‖ from the file and the base
    weight. (Text-encoder magnitudes under peft's own key, `lora_magnitude_vector`, were dropped by transformers 5's
    load_adapter: that text encoder was wrong by far more than TOL, in silence.)"""
    result, ours = trained_dora
    adapter = load_adapter(result.adapter_path)
    assert {m.kind for m in adapter.modules.values()} == {"dora"}
    assert any(m.is_conv for m in adapter.modules.values())
    assert any(n.startswith("text_encoder.") for n in adapter.modules)
    pipe = load_pipeline(tiny_model)
    base = pipeline_outputs(pipe)
    pipe.load_lora_weights(str(result.adapter_path))
    theirs = pipeline_outputs(pipe)
    diff = max_abs_diff(ours, theirs)
    assert all(v <= TOL for v in diff.values()), diff
    moved = max_abs_diff(ours, base)  # the run moved both outputs by far more than TOL
    assert all(v > 100 * TOL for v in moved.values()), moved


def test_kohya_layout_round_trips_every_tensor(trained_dora, tmp_path):
    result, _ = trained_dora
    native = load_adapter(result.adapter_path)
    save_adapter(native, tmp_path / "k.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        scale_key = next(k for k in keys if k.endswith(".dora_scale") and "attn1_to_q" in k)
        out = f.get_tensor(scale_key.replace(".dora_scale", ".lora_up.weight")).shape[0]
        assert f.get_tensor(scale_key).shape == (out, 1)  # LyCORIS' output-axis (wd_on_out) layout
    assert meta["ss_network_module"] == "lycoris.kohya" and '"dora_wd": "True"' in meta["ss_network_args"]
    back = load_adapter(tmp_path / "k.safetensors")
    assert set(back.modules) == set(native.modules)
    for name, m in native.modules.items():
        r = back.modules[name]
        assert isinstance(r, DoRADelta)
        for role, t in m.tensors().items():
            assert torch.equal(t, r.tensors()[role]), (name, role)


def test_merge_into_the_base_through_delta_weight_reproduces_the_trained_model(trained_dora, tiny_model):
    """merge_adapter writes W0 + ΔW with ΔW = m ⊙ V / ‖V‖ - W0 from the record and the base weight."""
    result, ours = trained_dora
    comps = load_components(str(tiny_model))
    merge_adapter(load_adapter(result.adapter_path), comps.adaptable())
    diff = max_abs_diff(ours, model_outputs(comps.unet, comps.text_encoder, comps.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_record_delta_weight_needs_the_base_and_low_rank_tools_refuse_dora(trained_dora, tmp_path):
    result, _ = trained_dora
    adapter = load_adapter(result.adapter_path)
    m = next(iter(adapter.modules.values()))
    with pytest.raises(UserError, match="depends on the base weight"):
        m.delta_weight()
    from sdlora.commands.merge import run_merge

    path = str(result.adapter_path)
    with pytest.raises(UserError, match="is a DoRA, whose update depends on W0 and is not low-rank"):
        run_merge([path, path], tmp_path / "m.safetensors", report=lambda *_: None)  # concat: no exact sum exists
    with pytest.raises(UserError, match="give --base"):
        run_merge([path, path], tmp_path / "m.safetensors", method="svd", rank=2, report=lambda *_: None)


def test_resize_keeps_dora_magnitudes_exact_at_full_rank_and_truncates_the_direction_below(trained_dora, tmp_path):
    from sdlora.adapter.algebra import factor_to_rank
    from sdlora.commands.resize import run_resize

    result, _ = trained_dora
    adapter = load_adapter(result.adapter_path)
    full = max(m.rank for m in adapter.modules.values())
    run_resize(result.adapter_path, tmp_path / "full.safetensors", "rank", full, report=lambda *_: None)
    run_resize(result.adapter_path, tmp_path / "r2.safetensors", "rank", 2, report=lambda *_: None)
    same, cut = (load_adapter(tmp_path / f).modules for f in ("full.safetensors", "r2.safetensors"))
    for name, m in adapter.modules.items():
        assert same[name].kind == "dora" and cut[name].kind == "dora"
        for role, t in m.tensors().items():
            assert torch.equal(same[name].tensors()[role], t), (name, role)
        assert torch.equal(cut[name].magnitude, m.magnitude) and cut[name].rank == min(2, m.rank)
        if m.rank > 2:  # the direction's update is the plain rank-2 truncation (1e-6 relative: fp32 factors)
            down, up, _ = factor_to_rank(m.down, m.up, 2)
            ref = (up.flatten(1) @ down.flatten(1)).double()
            got = (cut[name].up.flatten(1) @ cut[name].down.flatten(1)).double()
            assert float((got - ref).norm()) <= 1e-6 * float(ref.norm()), name


def test_svd_merge_of_doras_with_the_base_is_their_dense_sum_as_a_plain_lora(trained_dora, tiny_model, tmp_path):
    """At a rank no module's dense update exceeds, the svd merge is exact: Σ w_i (m ⊙ V/‖V‖ − W0) as up @ down.
    1e-6 relative to ‖ΔW‖_F: float64 SVD of a float64 sum, stored as fp32 factors."""
    from sdlora.adapter.algebra import find_module
    from sdlora.commands.merge import run_merge

    result, _ = trained_dora
    adapter = load_adapter(result.adapter_path)
    rank = max(min(m.weight_shape[0], math.prod(m.weight_shape[1:])) for m in adapter.modules.values())
    path = str(result.adapter_path)
    merged, rows = run_merge([path, path], tmp_path / "m.safetensors", weights=[0.25, 0.5], method="svd", rank=rank,
                             base=str(tiny_model), report=lambda *_: None)
    comps = load_components(str(tiny_model))
    written = load_adapter(tmp_path / "m.safetensors")
    assert written.kinds() == {"lora"}
    for name, m in adapter.modules.items():
        w0 = find_module(comps.unet if name.startswith("unet.") else comps.text_encoder, name).weight.detach()
        ref = 0.75 * m.delta_weight(w0).double()
        got = written.modules[name].delta_weight().double()
        assert float((got - ref).norm()) <= 1e-6 * float(ref.norm()), name


def test_svd_merge_of_sdxl_doras_reads_w0_from_every_component_of_the_sdxl_base(sdxl_config, tiny_sdxl, tmp_path):
    """As above on SDXL: the second text encoder's W0 comes from the SDXL base (`--base`), so its DoRA modules
    merge exactly too (1e-6 relative, the same reasoning)."""
    from sdlora.adapter.algebra import component_module
    from sdlora.commands.merge import run_merge

    result = train(sdxl_config(lora={"type": "dora"}, train={"max_steps": 2}, optim={"lr": 1e-2}), log=lambda *_: None)
    adapter = load_adapter(result.adapter_path)
    assert {n.split(".")[0] for n in adapter.modules} == {"unet", "text_encoder", "text_encoder_2"}
    rank = max(min(m.weight_shape[0], math.prod(m.weight_shape[1:])) for m in adapter.modules.values())
    path = str(result.adapter_path)
    run_merge([path, path], tmp_path / "m.safetensors", weights=[0.25, 0.5], method="svd", rank=rank,
              base=str(tiny_sdxl), report=lambda *_: None)
    models = load_components(str(tiny_sdxl)).adaptable()
    written = load_adapter(tmp_path / "m.safetensors")
    for name, m in adapter.modules.items():
        ref = 0.75 * m.delta_weight(component_module(models, name).weight.detach()).double()
        got = written.modules[name].delta_weight().double()
        assert float((got - ref).norm()) <= 1e-6 * float(ref.norm()), name


def test_inspect_reads_dora_through_delta_weight_and_needs_a_base(trained_dora, tiny_model):
    from sdlora.analysis.inspect import BaseModel, inspect_adapter

    result, _ = trained_dora
    with pytest.raises(UserError, match="depends on the base weight; give --base"):
        inspect_adapter(result.adapter_path)
    report = inspect_adapter(result.adapter_path, BaseModel(str(tiny_model)))
    adapter = load_adapter(result.adapter_path)
    comps = load_components(str(tiny_model))
    e = next(e for e in report["modules"] if e["name"].startswith("unet."))
    w0 = comps.unet.get_submodule(e["name"].removeprefix("unet.")).weight
    expect = float(torch.linalg.vector_norm(adapter.modules[e["name"]].delta_weight(w0).double()))
    assert abs(e["dw_norm"] - expect) <= 1e-9 * expect


def test_an_input_axis_dora_scale_is_a_one_line_error(tmp_path):
    from sdlora.util.atomic import save_safetensors

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_safetensors(tmp_path / "in.safetensors", {f"{stem}.lora_down.weight": torch.zeros(2, 8),
                                                  f"{stem}.lora_up.weight": torch.zeros(6, 2),
                                                  f"{stem}.dora_scale": torch.ones(1, 8)})
    with pytest.raises(UserError, match="input-axis DoRA") as e:
        load_adapter(tmp_path / "in.safetensors")
    assert "\n" not in str(e.value)


def test_init_from_continues_a_dora_file_exactly_and_refuses_another_kind(trained_dora, make_config):
    """lora.init_from with a DoRA file: A, B and m from the file, so the step-0 model is the file's; as a plain LoRA
    run it would drop m, so that is a one-line error."""
    result, ours = trained_dora
    with pytest.raises(UserError, match="holds dora modules .*set lora.type: dora"):
        cfg = make_config(lora={"init_from": str(result.adapter_path), "conv": True})
        inject_all(*_comps(cfg))
    cfg = make_config(lora={"type": "dora", "init_from": str(result.adapter_path), "conv": True})
    comps = load_components(cfg.model.path)
    inject_all(comps.adaptable(), cfg, comps.family)
    diff = max_abs_diff(ours, model_outputs(comps.unet, comps.text_encoder, comps.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def _comps(cfg):
    comps = load_components(cfg.model.path)
    return comps.adaptable(), cfg, comps.family
