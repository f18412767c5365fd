"""LoHa and LoKr (lora.type: loha / lokr): step-0 output, gradients against a dense float64 reference, the maths
against peft's, parameter roles, the kohya/LyCORIS layout (round trip, and read as LyCORIS, ComfyUI and AUTOMATIC1111
read it), merged exports, inspect, init_from, what diffusers does not read, and the combinations refused."""

import copy
import json

import pytest
import torch
from torch import nn

from outputs import load_pipeline, max_abs_diff, model_outputs
from sdlora.adapter.algebra import merge_adapter
from sdlora.adapter.functional import factorization
from sdlora.adapter.io import load_adapter, save_adapter
from sdlora.adapter.lycoris import LoHaDelta, LoKrDelta
from sdlora.errors import UserError
from sdlora.lora import adapters_disabled, build_param_groups, inject_all
from sdlora.lora.lycoris import LoHaLayer, LoKrLayer
from sdlora.model.loading import load_components
from sdlora.training.loop import train
from sdlora.model.families import SD1

TOL = 1e-5  # fp32 outputs of O(1) size, as in test_dora.py
CLASSES = {"loha": LoHaLayer, "lokr": LoKrLayer}
# (kind, init, rank): LoKr at rank 2 has a low-rank w2 (2 < max(b, d) / 2 for these shapes), at rank 8 a full one.
CASES = [("loha", "zero", 4), ("loha", "orthogonal", 4), ("loha", "orthogonal", 3), ("lokr", "zero", 2),
         ("lokr", "zero", 8)]


def _layer(kind, module, init="zero", rank=4, *, learnable=False, dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(24, 20) if module == "linear" else nn.Conv2d(6, 10, 3, stride=2, padding=1)
    base = base.to(dtype)
    ref = copy.deepcopy(base)
    layer = CLASSES[kind](base, rank, 3.0, init=init, learnable_alpha=learnable,
                          generator=torch.Generator().manual_seed(1)).to(dtype)
    x = torch.randn(5, 24, dtype=dtype) if module == "linear" else torch.randn(2, 6, 9, 9, dtype=dtype)
    return layer, ref, x


def _perturb(layer, size=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters_by_name().values():
            if p.dim():
                p.add_(size * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@pytest.mark.parametrize("module", ["linear", "conv"])
@pytest.mark.parametrize("kind, init, rank", CASES)
def test_every_allowed_init_leaves_the_step0_output_exactly_the_base(kind, init, rank, module):
    """ΔW starts at 0: exactly with a zero factor; with LoHa's orthogonal pair w2a·w2b = P·Q - P·Q up to the rounding
    of one fp32 matrix product (a fused multiply-add keeps the rounding error of P·Q, as for LoRA's orthogonal init).
    The base weight is untouched."""
    layer, ref, x = _layer(kind, module, init, rank)
    if init == "zero":
        assert torch.equal(layer.delta_weight(), torch.zeros_like(ref.weight))
    else:
        assert float(layer.delta_weight().abs().max()) <= 1e-7
    assert torch.equal(layer.base.weight, ref.weight)
    assert float((layer(x) - ref(x)).detach().abs().max()) <= TOL
    with adapters_disabled(layer):
        assert torch.equal(layer(x), ref(x))


def test_loha_orthogonal_init_gives_both_second_factors_a_gradient_at_the_first_step():
    zero, _, x = _layer("loha", "linear", "zero")
    orth, _, _ = _layer("loha", "linear", "orthogonal")
    for layer in (zero, orth):
        layer(x).pow(2).sum().backward()
    assert zero.hada_w2_a.grad.abs().max() > 0 and zero.hada_w2_b.grad.abs().max() == 0
    assert orth.hada_w2_a.grad.abs().max() > 0 and orth.hada_w2_b.grad.abs().max() > 0
    # w1a's gradient is the output gradient ⊙ (w2a @ w2b): zero but for the product's fp32 rounding
    assert orth.hada_w1_a.grad.abs().max() <= 1e-5 * orth.hada_w2_a.grad.abs().max()


def _kron_reference(w1, w2, shape):
    """w1 ⊗ w2 written out by index (einsum), in the base weight's shape: ΔW[i·b + p, j·d + q, ...] = w1[i, j] w2[p, q, ...]."""
    a, c = w1.shape
    b, d = shape[0] // a, shape[1] // c
    w2 = w2.reshape(b, d, *shape[2:])
    return torch.einsum("ij,pq...->ipjq...", w1, w2).reshape(shape)


def _dense_reference(layer, leaves):
    """y = W0 x + (alpha / r) · ΔW x with ΔW from its definition, all in float64."""
    names = [n for n in layer.parameters_by_name() if n != "alpha"]
    x, alpha, w0, t = leaves[0], leaves[1], leaves[2], dict(zip(names, leaves[3:]))
    shape = w0.shape
    if isinstance(layer, LoHaLayer):
        delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
    else:
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        delta = _kron_reference(t["lokr_w1"], w2, shape)
    w = w0 + (alpha / layer.rank) * delta
    if layer.kind == "linear":
        return torch.nn.functional.linear(x, w, layer.base.bias.detach())
    c = layer.base
    return torch.nn.functional.conv2d(x, w, c.bias.detach(), c.stride, c.padding, c.dilation)


@pytest.mark.parametrize("module", ["linear", "conv"])
@pytest.mark.parametrize("kind, init, rank", [("loha", "zero", 4), ("lokr", "zero", 2), ("lokr", "zero", 8)])
def test_gradients_match_a_dense_float64_reference(kind, init, rank, module):
    """Output and gradients of x, every factor and a learnable alpha against autograd on the dense formula, both in
    float64: they differ only in the order of roundings (~1e-16 relative), so 1e-10 of the gradient's scale holds."""
    layer, _, _ = _layer(kind, module, init, rank, learnable=True, dtype=torch.float64)
    _perturb(layer)  # away from the init, so that every factor (and alpha) gets a gradient
    x = (torch.randn(3, 7, 24) if module == "linear" else torch.randn(2, 6, 9, 9)).double().requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    factors = {n: p for n, p in layer.parameters_by_name().items() if n != "alpha"}
    params = [x, layer.alpha, layer.base.weight, *factors.values()]
    got = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in params]
    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    ref = _dense_reference(layer, leaves)
    (ref * g).sum().backward()
    assert float((y - ref).detach().abs().max()) <= 1e-10 * float(ref.detach().abs().max())
    for name, mine, theirs in zip(["x", "alpha", "W"] + list(factors), got, leaves):
        scale = max(1e-3, float(theirs.grad.abs().max()))
        assert float((mine - theirs.grad).abs().max()) <= 1e-10 * scale, name


def test_the_update_maths_equals_peft_loha_and_lokr():
    """peft's make_weight (LoHa) and make_kron (LoKr) on the same tensors, and peft's factorization for every size
    up to 2048 (LyCORIS' rule; peft does not reorder an explicit factor larger than its cofactor, LyCORIS does)."""
    from peft.tuners.loha.layer import make_weight
    from peft.tuners.lokr.layer import factorization as peft_factorization
    from peft.tuners.lokr.layer import make_kron

    assert all(factorization(n) == peft_factorization(n) for n in range(1, 2049))
    assert factorization(320) == (16, 20) and factorization(1280, 8) == (8, 160) and factorization(360, 16) == (15, 24)
    for module in ("linear", "conv"):
        for rank in (2, 8):
            layer, ref, _ = _layer("lokr", module, rank=rank)
            _perturb(layer)
            m = layer.to_record(scale=layer.scale_value())
            peft = make_kron(m.w1, m.w2 if m.w2 is not None else m.w2a @ m.w2b)  # peft's conv w2: 4-d or flattened
            torch.testing.assert_close(m.delta_weight().float(), peft.reshape(ref.weight.shape), rtol=1e-6, atol=1e-7)
        layer, ref, _ = _layer("loha", module)
        _perturb(layer)
        m = layer.to_record(scale=layer.scale_value())
        peft = make_weight(m.w1a, m.w1b, m.w2a, m.w2b, torch.tensor(1.0)).reshape(ref.weight.shape)
        torch.testing.assert_close(m.delta_weight().float(), peft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_under_bf16_autocast_the_factors_stay_fp32_and_get_fp32_gradients(kind):
    layer, _, x = _layer(kind, "conv", rank=2)
    _perturb(layer)
    exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.bfloat16
    assert float((y.float() - exact).abs().max()) <= 2**-6 * float(exact.abs().max())  # bf16: 8 significant bits
    for name, p in layer.trainable_parameters().items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_roles_give_up_factors_the_lora_plus_ratio_and_full_factors_the_module_rate(make_config, kind):
    extra = {"lokr_factor": 2} if kind == "lokr" else {}  # w1 2 x 2 and a low-rank w2 everywhere at rank 2
    cfg = make_config(lora={"type": kind, "rank": 2, "learnable_alpha": True, "conv": True, **extra},
                      optim={"weight_decay": 0.01, "alpha_lr": 0.5, "b_lr_ratio": 4.0,
                             "lr_rules": [{"match": "unet.up", "lr": 0.25}]})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    group_of = {id(p): g for g in build_param_groups(layers, cfg, comps.family).groups for p in g["params"]}
    seen = set()
    for name, layer in layers.items():
        lr = 0.25 if name.startswith("unet.up_blocks") else 1e-3
        for attr, p in layer.trainable_parameters().items():
            role = layer.PARAMETER_ROLES[attr]
            seen.add(role)
            want = {"down": (lr, 0.01), "up": (4 * lr, 0.01), "factor": (lr, 0.01), "scale": (0.5, 0.0)}[role]
            assert (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) == want, (name, attr)
    assert seen == ({"down", "up", "scale"} if kind == "loha" else {"down", "up", "factor", "scale"})


# ------------------------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tmp_path_factory, tiny_model, shapes_data):
    """10 steps with learnable alpha, conv modules, the text encoder and the embedding-norm penalty; LoHa with the
    orthogonal init; LoKr at rank 5, which gives the tiny model's 96-wide inputs a low-rank w2 (5 < 12 / 2) and every
    other module a full one."""
    from sdlora.config import validate

    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out / "run")}, "train": {"max_steps": 10, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-2, "max_grad_norm": None, "alpha_lr": 1e-2},
                    "lora": {"type": kind, "rank": 5 if kind == "lokr" else 4, "alpha": 3, "learnable_alpha": True,
                             "conv": True, **({"init": "orthogonal"} if kind == "loha" else {})},
                    "reg": {"embedding_norm": {"weight": 0.1}}, "log": {"tracker": "none"}})
    result = train(cfg)
    c = result.components
    c.unet.eval(), c.text_encoder.eval()
    return kind, result, model_outputs(c.unet, c.text_encoder, c.tokenizer)


def test_the_run_trains_every_factor_and_alpha(trained):
    kind, result, _ = trained
    adapter = load_adapter(result.adapter_path)
    assert adapter.kinds() == {kind}
    assert any(m.is_conv for m in adapter.modules.values()) and any(n.startswith("text_encoder.") for n in adapter.modules)
    # alphas learned; not quite all: the tiny UNet's mid block sees a single token, whose self-attention q and k get
    # next to no gradient (softmax over one key), too little to move an fp32 alpha of 3 through Adam's epsilon
    learned = [n for n, m in adapter.modules.items() if m.alpha != 3.0]
    assert len(learned) >= 0.95 * len(adapter.modules), sorted(set(adapter.modules) - set(learned))
    if kind == "lokr":  # both forms of w2 (see the fixture)
        assert {m.w2 is None for m in adapter.modules.values()} == {True, False}
    for name, layer in result.layers.items():
        assert torch.count_nonzero(layer.delta_weight()) > 0, name


def _lycoris_loader_delta(sd, stem, shape):
    """ΔW as LyCORIS (modules/loha.py, lokr.py), ComfyUI (weight_adapter/loha.py, lokr.py) and AUTOMATIC1111
    (network_hada.py, network_lokr.py) compute it from a kohya-layout file: LoHa scaled by alpha / hada_w1_b's rows;
    LoKr by alpha / the rank of a decomposed factor (lokr_w2_b's rows, else lokr_w1_b's), by 1 when both are full;
    w1 gets two trailing axes when w2 is 4-d; the product is reshaped to the weight."""
    t = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.split(".", 1)[0] == stem}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (delta * (alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0)).reshape(shape)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim else 1.0)).reshape(shape)


def test_kohya_layout_has_lycoris_keys_round_trips_and_reads_as_lycoris_computes_it(trained, tmp_path, tiny_model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdlora.adapter.kohya import kohya_name

    kind, result, _ = trained
    native = load_adapter(result.adapter_path)
    save_adapter(native, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(tmp_path / "k.safetensors"))
    suffixes = {k.split(".", 1)[1] for k in sd}
    assert suffixes <= {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a",
                        "lokr_w2_b"} and "alpha" in suffixes
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
    back = load_adapter(tmp_path / "k.safetensors")
    comps = load_components(str(tiny_model))
    models = {"unet": comps.unet, "text_encoder": comps.text_encoder}
    assert set(back.modules) == set(native.modules)
    for name, m in native.modules.items():
        r = back.modules[name]
        assert type(r) is type(m) and r.weight_shape == m.weight_shape and r.alpha == m.alpha
        assert m.tensors().keys() == r.tensors().keys()
        for role, t in m.tensors().items():
            assert torch.equal(t, r.tensors()[role]), (name, role)
        w0 = models[name.split(".")[0]].get_submodule(name.split(".", 1)[1]).weight
        theirs = _lycoris_loader_delta(sd, kohya_name(name, SD1), w0.shape)
        torch.testing.assert_close(theirs, m.delta_weight(w0), rtol=1e-12, atol=1e-12)
        assert float(sd[kohya_name(name, SD1) + ".alpha"]) == m.rank  # alpha / rank = 1: the scale is in the factors


def _magnitude(m):
    """|ΔW| with every factor entry taken by its absolute value: what rounding the stored factors acts on."""
    t = {r: x.double().abs() for r, x in m.tensors().items()}
    if isinstance(m, LoHaDelta):
        return ((t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])).reshape(m.weight_shape)
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    w2 = t["w2"].flatten(1) if "w2" in t else t["w2a"] @ t["w2b"]
    return torch.kron(w1, w2).reshape(m.weight_shape)


def test_a_16_bit_export_keeps_16_bit_precision_of_every_factor(trained):
    """fp16 / bf16 files hold the balanced factors (the scale spread over them, so they stay out of fp16's
    subnormals): the error of ΔW is within 2 unit roundoffs of ‖|ΔW|‖, the update with every factor entry taken by
    its absolute value (what rounding the factors acts on), however much the terms cancel (LoHa's orthogonal start).
    Measured on these runs: at most 0.75 balanced; the LoKr factors cast as they are reach 3.3 in fp16."""
    kind, result, _ = trained
    adapter = load_adapter(result.adapter_path)
    for name, m in adapter.modules.items():
        exact, balanced = m.delta_weight(), m.balanced()
        size = float(torch.linalg.vector_norm(_magnitude(balanced)))
        assert float(torch.linalg.vector_norm(balanced.delta_weight() - exact)) <= 4 * 2**-24 * size, name  # same ΔW
        for dtype, unit in ((torch.float16, 2**-11), (torch.bfloat16, 2**-8)):
            err = float(torch.linalg.vector_norm(m.cast(dtype).delta_weight() - exact))
            assert err <= 2 * unit * size, (name, dtype, err / (unit * size))


def test_merged_exports_reproduce_the_trained_model(trained, tiny_model, tmp_path):
    """merge_adapter (what merged-diffusers and merged-single-file call) adds delta_weight(W0) to every module; the
    merged diffusers folder loads in diffusers and gives the trained model's outputs."""
    from sdlora.commands.export import run_export

    kind, result, ours = trained
    comps = load_components(str(tiny_model))
    merge_adapter(load_adapter(result.adapter_path), comps.adaptable())
    diff = max_abs_diff(ours, model_outputs(comps.unet.eval(), comps.text_encoder.eval(), comps.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff
    run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=str(tiny_model),
               report=lambda *_: None)
    pipe = load_pipeline(tmp_path / "merged")
    diff = max_abs_diff(ours, model_outputs(pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_diffusers_does_not_read_these_kinds_and_the_diffusers_layout_export_says_so(trained, tiny_model, tmp_path):
    """diffusers 0.42: StableDiffusionPipeline.load_lora_weights refuses both layouts (the native one: "all LoRA param
    names contain 'lora'"; kohya: keys its converter does not rename). When a check below starts failing, diffusers
    reads the kind: test the load to <= 1e-5 and update docs/formats.md."""
    from sdlora.commands.export import run_export

    kind, result, _ = trained
    save_adapter(load_adapter(result.adapter_path), tmp_path / "k.safetensors", "kohya")
    for path in (result.adapter_path, tmp_path / "k.safetensors"):
        pipe = load_pipeline(tiny_model)
        with pytest.raises(ValueError):
            pipe.load_lora_weights(str(path))
    with pytest.raises(UserError, match=f"does not read {kind} adapters.*kohya layout.*merged") as e:
        run_export(result.adapter_path, "diffusers", tmp_path / "d.safetensors", report=lambda *_: None)
    assert "\n" not in str(e.value) and not (tmp_path / "d.safetensors").exists()


def test_diffusers_unet_loader_reads_the_linear_lokr_modules_exactly(trained, tiny_model, tmp_path):
    """What diffusers 0.42 does read: UNet2DConditionModel.load_lora_adapter (loaders/peft.py) builds a peft LoKr from
    `.lokr_` keys (utils/peft_utils._create_lokr_config, alpha = r: scale 1, as sdlora writes it), for Linear modules;
    a conv module's 4-d lokr_w2 fails there, and no LoHa or text-encoder LoKr loader exists. The native file's UNet
    Linear modules read to within fp32 rounding of outputs of O(1) (measured 1.8e-6; the update moves them by 0.18).
    The run's Linear modules all have a full w2, so every other one is given a rank-1 w2a @ w2b (of the same norm)
    to read both forms."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from sdlora.adapter.weights import AdapterWeights, save_native

    kind, result, _ = trained
    adapter = load_adapter(result.adapter_path)
    linear = sorted(n for n, m in adapter.modules.items() if n.startswith("unet.") and not m.is_conv)
    pipe, comps, base = load_pipeline(tiny_model), load_components(str(tiny_model)), load_components(str(tiny_model))
    if kind == "loha":
        with pytest.raises(Exception):
            pipe.unet.load_lora_adapter(load_file(str(result.adapter_path)), prefix="unet")
        return
    g = torch.Generator().manual_seed(0)
    mods = {n: adapter.modules[n] for n in linear}
    for n in linear[::2]:
        m = mods[n]
        a, b = torch.randn(m.w2.shape[0], 1, generator=g), torch.randn(1, m.w2.shape[1], generator=g)
        k = float(torch.linalg.vector_norm(m.w2) / torch.linalg.vector_norm(a @ b))
        mods[n] = replace(m, w2=None, w2a=a * k, w2b=b)
    unet_only = AdapterWeights(mods)
    assert {m.w2 is None for m in mods.values()} == {True, False}
    save_native(unet_only, tmp_path / "unet.safetensors")
    pipe.unet.load_lora_adapter(load_file(str(tmp_path / "unet.safetensors")), prefix="unet")
    merge_adapter(unet_only, comps.adaptable())
    ref = model_outputs(comps.unet.eval(), comps.text_encoder.eval(), comps.tokenizer)
    got = model_outputs(pipe.unet.eval(), comps.text_encoder.eval(), comps.tokenizer)
    plain = model_outputs(base.unet.eval(), base.text_encoder.eval(), base.tokenizer)
    assert max_abs_diff(ref, got)["unet"] <= TOL
    assert max_abs_diff(ref, plain)["unet"] > 1000 * TOL  # the adapter does move the output


def test_inspect_reads_them_through_their_dense_update(trained, tiny_model):
    from sdlora.analysis.inspect import BaseModel, inspect_adapter

    kind, result, _ = trained
    adapter = load_adapter(result.adapter_path)
    plain = inspect_adapter(result.adapter_path)  # ΔW does not depend on W0: no base needed
    report = inspect_adapter(result.adapter_path, BaseModel(str(tiny_model)))
    for entries in (plain["modules"], report["modules"]):
        for e in entries:
            m = adapter.modules[e["name"]]
            expect = float(torch.linalg.vector_norm(m.delta_weight()))
            assert abs(e["dw_norm"] - expect) <= 1e-9 * expect and e["shape"] == list(m.weight_shape)
            assert e["kind"] == ("conv" if m.is_conv else "linear") and e["effective_rank"] > 0
    assert all(e["intruders"] is not None for e in report["modules"])


def test_init_from_continues_the_file_exactly_and_refuses_another_kind(trained, make_config):
    kind, result, ours = trained
    lora = {"init_from": str(result.adapter_path), "conv": True}
    with pytest.raises(UserError, match=f"holds {kind} modules .*set lora.type: {kind}"):
        cfg = make_config(lora=lora)
        comps = load_components(cfg.model.path)
        inject_all(comps.adaptable(), cfg, comps.family)
    cfg = make_config(lora={**lora, "type": kind, "learnable_alpha": True})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    diff = max_abs_diff(ours, model_outputs(comps.unet.eval(), comps.text_encoder.eval(), comps.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff
    trained_alphas = {n: float(layer.alpha.detach()) for n, layer in result.layers.items()}
    assert all(abs(float(layers[n].alpha.detach()) - a) <= 1e-6 for n, a in trained_alphas.items())


def test_merge_refactors_them_as_a_lora_and_concat_resize_and_mitigation_refuse_them(trained, tiny_model, tmp_path):
    """merge --method svd (and fisher) combines the dense updates (no --base: ΔW does not depend on W0) and factors
    the sum as a plain LoRA: the file with itself at 0.5 + 0.5 at full rank is its own update, up to fp32 rounding of the stored
    SVD factors (~1e-7 relative; 1e-5 of ‖ΔW‖_F leaves a wide margin). concat, resize and --mitigate-intruders
    work on up @ down and refuse the kind in one line."""
    from sdlora.analysis.inspect import BaseModel
    from sdlora.analysis.mitigate import mitigate_adapter
    from sdlora.adapter.fisher import RowFisher
    from sdlora.commands.merge import merge_adapters, run_merge
    from sdlora.commands.resize import run_resize

    kind, result, _ = trained
    path, quiet = str(result.adapter_path), (lambda *_: None)
    run_merge([path, path], tmp_path / "m.safetensors", weights=[0.5, 0.5], method="svd", rank=10_000, report=quiet)
    merged, adapter = load_adapter(tmp_path / "m.safetensors"), load_adapter(path)
    assert merged.kinds() == {"lora"} and set(merged.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        exact, got = m.delta_weight(), merged.modules[name].delta_weight()
        assert got.shape == exact.shape, name
        assert float(torch.linalg.vector_norm(got.double() - exact)) <= 1e-5 * float(torch.linalg.vector_norm(exact))
    # fisher: the same through algebra.fisher_dense_to_rank, with a made-up row Fisher (any positive one: the
    # Fisher-weighted average of one update with itself is that update, and full rank keeps it)
    g = torch.Generator().manual_seed(0)
    fisher = RowFisher({n: torch.rand(m.weight_shape[0], generator=g) + 0.1 for n, m in adapter.modules.items()})
    by_fisher, _ = merge_adapters([adapter, adapter], [0.5, 0.5], "fisher", 10_000, [fisher, fisher])
    for name, m in adapter.modules.items():
        exact, got = m.delta_weight(), by_fisher.modules[name].delta_weight()
        assert float(torch.linalg.vector_norm(got.double() - exact)) <= 1e-5 * float(torch.linalg.vector_norm(exact))
    title = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    refusals = [(lambda: run_merge([path, path], tmp_path / "c.safetensors", report=quiet),
                 f"merge --method concat: module .* is a {title}, whose update is a"),
                (lambda: run_resize(path, tmp_path / "r.safetensors", "rank", 2, report=quiet),
                 f"resize: module .* is a {title}, whose update is a .*resize takes LoRA and DoRA"),
                (lambda: mitigate_adapter(path, BaseModel(str(tiny_model)), 0.5, tmp_path / "i.safetensors"),
                 f"--mitigate-intruders works on plain LoRA adapters; this one holds {kind} modules")]
    for call, message in refusals:
        with pytest.raises(UserError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert not any((tmp_path / f).exists() for f in ("c.safetensors", "r.safetensors", "i.safetensors"))


# ------------------------------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("lora, message", [
    ({"type": "loha", "init": "compensated"}, "lora.init=compensated does not apply to lora.type=loha: its offset of "
     "the base by the start update would make the export a difference of two Hadamard products"),
    ({"type": "loha", "init": "principal"}, "lora.init=principal does not apply to lora.type=loha"),
    ({"type": "lokr", "init": "compensated"}, "difference of two Kronecker products, which no lokr file holds"),
    ({"type": "lokr", "init": "orthogonal"}, "lora.init=orthogonal does not apply to lora.type=lokr: a Kronecker "
     "product is zero only where a factor is"),
    ({"type": "lokr", "train_a": False}, "lora.train_a=false (LoRA-FA) applies to lora and dora, not lora.type=lokr"),
    ({"type": "loha", "lokr_factor": 4}, "lora.lokr_factor is set but has effect only with lora.type: lokr"),
    ({"type": "lokr", "lokr_factor": 0}, "lora.lokr_factor=0: use -1 or a positive number"),
])
def test_combinations_the_kind_cannot_carry_are_one_line_errors(lora, message):
    from sdlora.config import validate

    with pytest.raises(UserError) as e:
        validate({"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}, "lora": lora})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_kohya_files_in_lycoris_forms_sdlora_does_not_read_are_one_line_errors():
    from sdlora.adapter.kohya import from_kohya_state_dict

    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    tucker = {f"{stem}.hada_w1_a": torch.zeros(2, 8), f"{stem}.hada_w1_b": torch.zeros(2, 4),
              f"{stem}.hada_t1": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(UserError, match="Tucker"):
        from_kohya_state_dict(tucker)
    with pytest.raises(UserError, match="not a whole .* module"):
        from_kohya_state_dict({f"{stem}.lokr_w1": torch.zeros(2, 2), f"{stem}.lokr_w2_a": torch.zeros(4, 1)})
    with pytest.raises(UserError, match="not a whole .* module"):  # LyCORIS' weight-decomposed LoKr
        from_kohya_state_dict({f"{stem}.lokr_w1": torch.zeros(2, 2), f"{stem}.lokr_w2": torch.zeros(4, 4),
                               f"{stem}.dora_scale": torch.ones(8, 1)})


def test_a_lokr_file_with_both_factors_full_ignores_its_alpha_as_every_loader_does():
    from sdlora.adapter.kohya import from_kohya_state_dict

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    full = from_kohya_state_dict({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2, f"{stem}.alpha": torch.tensor(2.0)})
    m = next(iter(full.modules.values()))
    torch.testing.assert_close(m.delta_weight(), torch.kron(w1, w2))
    w2a, w2b = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    low = from_kohya_state_dict({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
                                 f"{stem}.alpha": torch.tensor(1.0)})
    m = next(iter(low.modules.values()))
    torch.testing.assert_close(m.delta_weight(), 0.5 * torch.kron(w1, w2a @ w2b))
    assert isinstance(m, LoKrDelta) and m.rank == 2 and m.alpha == 1.0 and m.scale == 0.5
    hada = {f"{stem}.hada_w1_a": w2a, f"{stem}.hada_w1_b": w2b, f"{stem}.hada_w2_a": w2a, f"{stem}.hada_w2_b": w2b,
            f"{stem}.alpha": torch.tensor(1.0)}
    m = next(iter(from_kohya_state_dict(hada).modules.values()))
    assert isinstance(m, LoHaDelta)
    torch.testing.assert_close(m.delta_weight(), 0.5 * (w2a @ w2b) ** 2)
