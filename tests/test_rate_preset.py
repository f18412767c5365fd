"""optim.lr_rules preset match_full_finetune (docs/lora.md, 'A rate rule from the full fine-tune'): the rates follow
the formula, and the first AdamW step then moves each module's W about as much as a full fine-tune's first step."""

import math

import pytest
import torch

from sdlora.errors import UserError
from sdlora.lora import build_param_groups, inject_all
from sdlora.model.loading import load_components
from sdlora.training.loop import train
from sdlora.training.optim import make_optimizer

FULL_LR = 1e-5


def preset_cfg(make_config, **lora):
    return make_config({"lora": {"conv": True, "alpha": 2, **lora}, "optim": {"b_lr_ratio": 4.0, "lr_rules": [
        {"match": "unet", "preset": "match_full_finetune", "lr": FULL_LR},
        {"match": "text_encoder", "preset": "match_full_finetune"}]}})


def expected(layer, full_lr, rho):
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    out, k = b.shape[0], a[0].numel()
    moved = rho ** 2 * out * float((a * a).sum()) + k * float((b * b).sum())
    return full_lr * math.sqrt(out * k) / (abs(layer.scale_value()) * math.sqrt(moved))


@pytest.mark.parametrize("init", ["zero", "orthogonal"])
def test_the_rates_follow_the_formula_and_match_a_full_finetunes_first_step(make_config, init):
    cfg = preset_cfg(make_config, init=init)
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    groups = build_param_groups(layers, cfg, comps.family)
    rate_of = {id(p): g["lr"] for g in groups.groups for p in g["params"]}
    for name, layer in layers.items():
        full = FULL_LR if name.startswith("unet.") else cfg.optim.text_encoder_lr or cfg.optim.lr  # the part's rate
        want = expected(layer, full, 4.0)
        assert rate_of[id(layer.lora_A)] == pytest.approx(want, rel=0.05), name  # 2 significant digits
        assert rate_of[id(layer.lora_B)] == pytest.approx(4.0 * rate_of[id(layer.lora_A)], rel=1e-12), name
    if init == "zero":  # B = 0: only the sqrt(3k / r) / (s ρ) of the shapes is left (A's entries U(±1/sqrt k))
        layer = layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        k, r = layer.lora_A.shape[1], layer.rank
        assert rate_of[id(layer.lora_A)] == pytest.approx(FULL_LR * math.sqrt(3 * k / r) / (layer.scale_value() * 4),
                                                          rel=0.25)
    # what the rule claims: one AdamW step moves each W by about full_lr · sqrt(out · k), a full fine-tune's first step
    before = {n: l.delta_weight() for n, l in layers.items()}
    optimizer = make_optimizer(groups.groups, cfg)
    with torch.enable_grad():
        from outputs import PROMPTS
        from sdlora.model.text import encode, tokenize

        emb = encode(comps.text_encoder, tokenize(comps.tokenizer, PROMPTS), 1).float()
        latents = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))  # mid block 2x2
        comps.unet(latents, torch.tensor([10, 700]), emb).sample.pow(2).mean().backward()
    optimizer.step()
    ratios = {}
    for name, layer in layers.items():
        full = FULL_LR if name.startswith("unet.") else cfg.optim.lr
        moved = float(torch.linalg.norm(layer.delta_weight() - before[name]))
        ratios[name] = (moved / (full * math.sqrt(layer.base.weight[0].numel() * layer.base.weight.shape[0])))
    print(f"{init}: first-step ‖ΔW‖ / full fine-tune's: {min(ratios.values()):.2f} to {max(ratios.values()):.2f}")
    assert 0.5 <= min(ratios.values()) and max(ratios.values()) <= 2.0


def test_the_preset_shows_in_the_dry_run_plan(make_config, capsys):
    train(preset_cfg(make_config), dry_run=True)
    out = capsys.readouterr().out
    assert "rule0:unet:A" in out and "rule0:unet:A#1" in out  # several rates under one rule, each its own group


def test_the_preset_refuses_other_kinds_in_one_line(make_config):
    cfg = make_config({"lora": {"type": "loha"}, "optim": {"lr_rules": [{"match": "unet", "preset": "match_full_finetune"}]}})
    with pytest.raises(UserError, match="applies to lora.type lora"):
        train(cfg, dry_run=True)
