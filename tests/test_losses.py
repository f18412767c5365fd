"""Loss options and optimiser schedules against their formulas."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.config import LossConfig, validate
from sdlora.errors import UserError
from sdlora.training.losses import diffusion_loss, diffusion_target, min_snr_weights, per_sample_loss, sample_noise
from sdlora.training.optim import lr_lambda, make_lr_scheduler, make_optimizer


def scheduler(kind="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=kind)


T = torch.tensor([0, 10, 250, 500, 999])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula(kind):
    s = scheduler(kind)
    ac = s.alphas_cumprod.double()[T]
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + (1 if kind == "v_prediction" else 0))
    got = min_snr_weights(s, T, 5.0).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)


def test_v_prediction_target_is_the_velocity_sqrt_abar_eps_minus_sqrt_1_minus_abar_x0():
    s = scheduler("v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=gen), torch.randn(5, 4, 8, 8, generator=gen)
    ac = s.alphas_cumprod[T].view(-1, 1, 1, 1)
    expected = ac.sqrt() * eps - (1 - ac).sqrt() * x0
    assert float((diffusion_target(s, x0, eps, T) - expected).abs().max()) <= 1e-6
    assert torch.equal(diffusion_target(scheduler("epsilon"), x0, eps, T), eps)


def test_huber_and_mse_per_sample_losses():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    d = (pred - target).abs()
    huber = torch.where(d < 0.1, 0.5 * d ** 2, 0.1 * (d - 0.05)).flatten(1).mean(1)
    assert torch.allclose(per_sample_loss(pred, target, "huber", 0.1), huber, atol=1e-7)
    assert torch.allclose(per_sample_loss(pred, target, "mse"), (d ** 2).flatten(1).mean(1), atol=1e-7)


def test_diffusion_loss_applies_min_snr_and_per_sample_weights():
    s = scheduler()
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, 2, 2, generator=gen), torch.randn(5, 4, 2, 2, generator=gen)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0])
    cfg = LossConfig(min_snr_gamma=5.0)
    expected = (per_sample_loss(pred, target) * min_snr_weights(s, T, 5.0) * w).mean()
    assert torch.allclose(diffusion_loss(pred, target, T, s, cfg, w), expected)


def test_noise_offset_adds_one_constant_per_channel():
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 0.1, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6) and float(shift.abs().max()) > 0


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_lr_schedule_with_warmup_follows_its_formula(kind, make_config):
    cfg = make_config(optim={"scheduler": kind, "warmup_steps": 3, "lr": 1e-3}, train={"max_steps": 10})
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([{"params": [p], "lr": 1e-3, "name": "g"}], cfg)
    sched = make_lr_scheduler(opt, cfg)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step, lr in enumerate(seen):
        if step < 3:
            want = (step + 1) / 3
        else:
            progress = (step - 3) / 7
            want = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[kind]
        assert lr == pytest.approx(1e-3 * want, rel=1e-12), (step, lr)
    assert lr_lambda("cosine", 0, 10)(10) == pytest.approx(0.0)


def test_adamw_uses_foreach_on_cpu(make_config):
    opt = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}], make_config())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] and not opt.defaults.get("fused")


@pytest.mark.parametrize("name, module", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_optional_optimisers_name_their_extra_when_missing(name, module, make_config):
    pytest.importorskip("importlib").util.find_spec(module) and pytest.skip(f"{module} is installed")
    with pytest.raises(UserError, match=r"pip install 'sdlora\["):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}],
                       make_config(optim={"optimizer": name, "lr": 1.0}))


def test_timestep_range_limits_validate():
    base = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}}
    assert validate({**base, "loss": {"min_timestep": 100, "max_timestep": 900}}).loss.max_timestep == 900
    with pytest.raises(UserError, match="loss.max_timestep"):
        validate({**base, "loss": {"max_timestep": 0}})
    with pytest.raises(UserError, match="min_timestep .* must be < loss.max_timestep"):
        validate({**base, "loss": {"min_timestep": 500, "max_timestep": 500}})
