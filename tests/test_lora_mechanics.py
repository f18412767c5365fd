"""LoRA mechanics: inits keep step-0 output, gradients flow, learnable alpha, rate rules, exact export."""

import copy
import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.adapter.io import load_adapter
from sdlora.errors import UserError
from sdlora.lora import LoRAConv2d, LoRALinear, adapters_disabled, build_param_groups, inject_all
from sdlora.model.loading import load_components
from sdlora.training.loop import train

TOL = 1e-5  # fp32
INITS = ["zero", "orthogonal", "orthonormal", "compensated", "principal"]


def _layer(kind, init, scaling="standard", learnable=False, rank=4):
    torch.manual_seed(0)
    base = nn.Linear(24, 20) if kind == "linear" else nn.Conv2d(6, 10, 3, stride=2, padding=1)
    ref = copy.deepcopy(base)
    cls = LoRALinear if kind == "linear" else LoRAConv2d
    layer = cls(base, rank, 3.0, init=init, scaling=scaling, learnable_alpha=learnable,
                generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 24) if kind == "linear" else torch.randn(2, 6, 9, 9)
    return layer, ref, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", INITS)
def test_every_init_leaves_the_step0_output_unchanged(kind, init):
    layer, ref, x = _layer(kind, init)
    assert float((layer(x) - ref(x)).detach().abs().max()) <= TOL
    with adapters_disabled(layer):  # the disabled path restores W0 even where the base was offset
        assert float((layer(x) - ref(x)).abs().max()) <= TOL


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", ["orthogonal", "compensated", "principal"])
def test_nonzero_inits_give_A_and_B_gradient_on_the_first_backward(kind, init):
    layer, _, x = _layer(kind, init)
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() > 0
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0


def test_zero_init_starves_A_of_gradient_at_the_first_step():
    layer, _, x = _layer("linear", "zero")
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() > 0


def test_orthogonal_init_has_BA_exactly_zero_and_leaves_base_untouched():
    layer, ref, _ = _layer("linear", "orthogonal")
    a, b, h = layer.lora_A.double(), layer.lora_B.double(), layer.rank // 2
    # B·A = P·Q + (-P)·Q: the two halves cancel exactly (bit for bit); a fused matmul only rounds.
    assert torch.equal(b[:, :h] @ a[:h], -(b[:, h:2 * h] @ a[h:2 * h]))
    assert float((b @ a).abs().max()) <= 1e-12
    assert torch.equal(layer.base.weight, ref.weight)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("scaling", ["standard", "rank_stabilized"])
def test_delta_weight_matches_the_dense_forward(kind, init, scaling):
    layer, ref, x = _layer(kind, init, scaling)
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
    dense = copy.deepcopy(ref)
    with torch.no_grad():
        dense.weight += layer.delta_weight()
    assert float((layer(x) - dense(x)).abs().max()) <= TOL
    merged = copy.deepcopy(layer).merge()
    assert float((merged(x) - dense(x)).abs().max()) <= TOL


def test_learnable_alpha_gradient_matches_finite_difference():
    layer, _, x = _layer("linear", "compensated", learnable=True)
    layer.double()
    x = x.double()
    loss = lambda: layer(x).pow(2).sum()  # noqa: E731
    loss().backward()
    analytic = float(layer.alpha.grad)
    h = 1e-6
    with torch.no_grad():
        layer.alpha += h
        up = float(loss())
        layer.alpha -= 2 * h
        down = float(loss())
        layer.alpha += h
    numeric = (up - down) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_gradients_match_the_dense_reference(bias):
    """The one-node linear forward/backward against autograd on y = x (W + s·B·A)ᵀ + b, in float64 (1e-10)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).double()
    layer = LoRALinear(base, 4, 3.0, init="orthogonal", learnable_alpha=True,
                       generator=torch.Generator().manual_seed(1)).double()
    base.weight.requires_grad_(True)  # the trainer freezes it; the layer must still get its gradient right
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)  # (batch, tokens, features)
    g = torch.randn(3, 7, 20, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.alpha, base.weight)]

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B, layer.alpha,
                                                                 base.weight)]
    xr, a, b, alpha, w = leaves
    dense = w + (alpha / layer.rank) * (b @ a)
    ref = xr @ dense.t() + (base.bias.detach() if bias else 0)
    (ref * g).sum().backward()
    assert float((layer(x) - ref).abs().max()) <= 1e-10
    for mine, theirs in zip(got, leaves):
        assert float((mine - theirs.grad).abs().max()) <= 1e-10 * max(1.0, float(theirs.grad.abs().max()))


def test_fused_linear_under_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    layer, ref, _ = _layer("linear", "orthogonal")
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16 == y_ref.dtype
    assert float((y.float() - y_ref.float()).abs().max()) <= 2e-2 * float(y_ref.float().abs().max())  # bf16 rounding
    y.float().pow(2).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.lora_A.grad.abs().max() > 0


def test_alpha_changes_in_training_and_init_alphas_from_reproduces_it(make_config, tmp_path):
    cfg = make_config(lora={"learnable_alpha": True, "alpha": 4, "init": "orthogonal"}, optim={"alpha_lr": 0.05})
    first = train(cfg)
    learned = {n: float(layer.alpha) for n, layer in first.layers.items()}
    assert max(abs(a - 4.0) for a in learned.values()) > 1e-3

    cfg2 = make_config(lora={"learnable_alpha": True, "init_alphas_from": str(first.adapter_path)},
                       output={"dir": str(tmp_path / "second")})
    comps = load_components(cfg2.model.path)
    layers = inject_all(comps.adaptable(), cfg2, comps.family)
    for n, layer in layers.items():
        assert float(layer.alpha) == pytest.approx(learned[n], abs=1e-6), n


def test_init_alphas_from_an_adapter_missing_modules_is_a_clear_error(make_config, tmp_path):
    first = train(make_config(text_encoder={"train": False}))  # no text-encoder modules in this adapter
    cfg = make_config(lora={"learnable_alpha": True, "init_alphas_from": str(first.adapter_path)},
                      output={"dir": str(tmp_path / "second")})
    comps = load_components(cfg.model.path)
    with pytest.raises(UserError, match="init_alphas_from.*text_encoder"):
        inject_all(comps.adaptable(), cfg, comps.family)


def _groups_for(make_config, **optim):
    cfg = make_config(optim=optim, lora={"learnable_alpha": True})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    return cfg, layers, build_param_groups(layers, cfg, comps.family)


def test_lr_rules_put_each_parameter_in_the_group_its_rule_names(make_config):
    rules = [{"match": "text_encoder.layers.0", "lr": 1e-5}, {"match": "unet.up", "lr_scale": 0.5},
             {"match": "attn2", "lr": 3e-4}]
    cfg, layers, groups = _groups_for(make_config, lr=1e-3, text_encoder_lr=2e-4, b_lr_ratio=4.0, alpha_lr=1e-2, lr_rules=rules)
    rate = {id(p): g["lr"] for g in groups.groups for p in g["params"]}
    for name, layer in layers.items():
        if name.startswith("text_encoder.encoder.layers.0."):
            expect = 1e-5
        elif name.startswith("unet.up_blocks."):
            expect = 0.5e-3
        elif ".attn2." in name:
            expect = 3e-4
        else:
            expect = 2e-4 if name.startswith("text_encoder.") else 1e-3
        assert rate[id(layer.lora_A)] == pytest.approx(expect), name
        assert rate[id(layer.lora_B)] == pytest.approx(4 * expect), name
        assert rate[id(layer.alpha)] == pytest.approx(1e-2), name
    assert len(groups.groups) == len({(g["lr"], g["weight_decay"], "alpha" in g["name"]) for g in groups.groups})


def test_an_lr_rule_matching_nothing_fails_naming_it(make_config):
    with pytest.raises(UserError, match=r"optim.lr_rules.1.*no_such_module"):
        _groups_for(make_config, lr_rules=[{"match": "unet.mid", "lr": 1e-4}, {"match": "no_such_module", "lr": 1e-4}])


def test_train_a_false_trains_only_B(make_config):
    cfg = make_config(lora={"train_a": False, "init": "orthogonal"}, train={"max_steps": 3})
    comps = load_components(cfg.model.path)
    before = {n: l.lora_A.detach().clone() for n, l in inject_all(comps.adaptable(), cfg, comps.family).items()}
    result = train(cfg)
    for n, layer in result.layers.items():
        assert torch.equal(layer.lora_A.detach(), before[n]), n
        assert not layer.lora_A.requires_grad


def test_conv_adapters_have_base_kernel_stride_padding_and_1x1_B(make_config):
    cfg = make_config(lora={"conv": True, "conv_rank": 2})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    convs = {n: l for n, l in layers.items() if isinstance(l, LoRAConv2d)}
    assert any(n.endswith(".conv1") for n in convs) and any("downsamplers" in n for n in convs)
    for n, layer in convs.items():
        assert layer.lora_A.shape[2:] == layer.base.weight.shape[2:], n
        assert layer.lora_B.shape[2:] == (1, 1) and layer.lora_A.shape[0] == 2, n


def test_dry_run_prints_the_plan(make_config, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(make_config(lora={"conv": True, "learnable_alpha": True}), dry_run=True)
    ours = [w for w in caught if "sdlora" in Path(w.filename).parts]  # a library's own deprecations are not ours
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    out = capsys.readouterr().out
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in out
    assert "conv" in out and "trainable parameters" in out


EXPORT_CASES = list(itertools.product(INITS, [False, True], [False, True], ["standard", "rank_stabilized"]))


@pytest.mark.parametrize("init, learnable, conv, scaling", EXPORT_CASES,
                         ids=[f"{i}-{'la' if l else 'fa'}-{'conv' if c else 'lin'}-{s[:4]}" for i, l, c, s in EXPORT_CASES])
def test_export_reproduces_the_trained_model_in_diffusers(make_config, tiny_model, init, learnable, conv, scaling):
    cfg = make_config(lora={"init": init, "learnable_alpha": learnable, "conv": conv, "scaling": scaling, "alpha": 3},
                      optim={"alpha_lr": 1e-2}, train={"max_steps": 10})
    result = train(cfg)
    c = result.components
    c.unet.eval(), c.text_encoder.eval()
    ours = model_outputs(c.unet, c.text_encoder, c.tokenizer)
    pipe = load_pipeline(tiny_model)
    pipe.load_lora_weights(str(result.adapter_path))
    diff = max_abs_diff(ours, pipeline_outputs(pipe))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_reduce_rank_export_reports_its_error(make_config, capsys):
    cfg = make_config(lora={"init": "compensated"}, export={"reduce_rank": True})
    result = train(cfg)
    adapter = load_adapter(result.adapter_path)
    assert all(m.rank == 4 for m in adapter.modules.values())
    assert "export.reduce_rank" in capsys.readouterr().out


@pytest.mark.parametrize("init", INITS)
def test_whole_model_output_at_step0_equals_the_base_model(make_config, init):
    cfg = make_config(lora={"init": init, "conv": True, "alpha": 3})
    comps = load_components(cfg.model.path)
    base = model_outputs(comps.unet, comps.text_encoder, comps.tokenizer)
    inject_all(comps.adaptable(), cfg, comps.family)
    diff = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), base)
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_orthonormal_init_gives_A_singular_values_one_and_B_zero():
    """Shuttleworth et al.'s LoRA-FA setting: A frozen with orthonormal rows (every singular value 1), B = 0."""
    layer, _, _ = _layer("linear", "orthonormal")
    s = torch.linalg.svdvals(layer.lora_A.double())
    assert float((s - 1).abs().max()) <= 1e-6  # fp32 storage of an exactly orthonormal float64 Q: ~1e-7 error
    assert float(layer.lora_B.abs().max()) == 0
