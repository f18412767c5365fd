"""Rectified-flow maths (model/flow_matching.py) against diffusers' own code: its SD3 training utilities, its
FlowMatchEulerDiscreteScheduler (shifted grid, noising, timesteps, and the Euler sampler that fixes the target's sign),
and the SD3 paper's cosmap density."""

import pytest
import torch

from sdlora.errors import UserError
from sdlora.model import flow_matching as fm


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **{"shift": 3.0, **kw})


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_draws_equal_diffusers_density_sampling(sampling):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = fm.draw_density(sampling, 64, torch.Generator().manual_seed(3), logit_mean=0.3, logit_std=1.2,
                           mode_scale=1.29)
    theirs = compute_density_for_timestep_sampling(sampling if sampling != "uniform" else "none", 64, logit_mean=0.3,
                                                   logit_std=1.2, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(3))
    if sampling == "logit_normal":  # z * std + mean vs torch.normal's fused form: 1-2 float32 ulps before sigmoid
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0) and not torch.equal(ours, torch.sigmoid(
            torch.randn(64, generator=torch.Generator().manual_seed(3))))  # (and the mean and std are applied)
    else:
        assert torch.equal(ours, theirs)  # the same formulas on the same random numbers: bit-identical


def test_cosmap_draw_has_the_density_diffusers_weights_by():
    import numpy as np
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    # The draw maps a uniform u to sigma = f(u); f is the inverse CDF of the cosmap density exactly when the density's
    # integral from 0 to f(u) is u. Trapezoid rule on 20001 points: error ~1e-9 on this smooth density (max 2/pi*2);
    # 1e-6 is far below the 1/256 spacing of the u checked, so a wrong map cannot pass.
    t = np.linspace(0, 1, 20001)
    density = compute_loss_weighting_for_sd3("cosmap", sigmas=torch.from_numpy(t)).numpy()
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(t))])
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)
    sigma = fm.draw_density("cosmap", 256, torch.Generator().manual_seed(0)).double().numpy()
    u = torch.rand(256, generator=torch.Generator().manual_seed(0)).double().numpy()  # the uniforms it mapped
    assert np.allclose(np.interp(sigma, t, cdf), u, atol=1e-6)


def test_shift_is_the_schedulers_and_its_default_comes_from_the_config(tiny_sd3):
    import json

    sched = _scheduler()
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the scheduler's own grid before its shift
    # float32 arithmetic in a different order than the scheduler's numpy: within a few ulps of values <= 1
    assert torch.allclose(fm.shift_sigmas(unshifted, 3.0), sched.sigmas, atol=1e-6, rtol=0)
    config = json.loads((tiny_sd3 / "scheduler" / "scheduler_config.json").read_text())
    assert fm.shift_from_scheduler_config(config) == 3.0
    with pytest.raises(UserError, match="use_dynamic_shifting"):
        fm.shift_from_scheduler_config({"shift": 1.0, "use_dynamic_shifting": True})
    draw = fm.SigmaDraw(sampling="uniform")  # shift None: the config's
    got = fm.draw_sigmas(draw, 8, torch.Generator().manual_seed(1), scheduler_config=config)
    u = torch.rand(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, fm.shift_sigmas(u, 3.0))


def test_noising_and_timestep_are_the_schedulers():
    sched = _scheduler()
    sched.set_timesteps(10)
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = sched.timesteps[[0, 4, 9]]
    sigma = sched.sigmas[[0, 4, 9]]
    assert torch.allclose(fm.noisy_latents(x0, noise, sigma), sched.scale_noise(x0, t, noise), atol=1e-6)
    # inference timesteps are sigma * 1000 (float32 rounding of products up to 1000: ~6e-5)
    assert torch.allclose(fm.transformer_timestep(sched.sigmas[:-1], 1000), sched.timesteps, atol=1e-4, rtol=0)


def test_velocity_target_is_what_diffusers_euler_sampler_integrates():
    # A model that always outputs the exact training target, sampled with the scheduler from x_1 = noise, must land
    # on x0: this pins the sign and the convention of the target (a wrong sign walks away from x0).
    sched = _scheduler()
    sched.set_timesteps(4)
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    x = fm.noisy_latents(x0, noise, sched.sigmas[:1].expand(2))
    for t in sched.timesteps:
        x = sched.step(fm.training_target("velocity", x0, noise), t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-5)  # float32 sums of values ~1 over 4 steps


def test_x0_preconditioning_is_velocity_weighted_by_sigma_squared():
    x0, noise, pred = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    sigma = torch.tensor([0.05, 0.3, 0.7, 0.99])
    x_t = fm.noisy_latents(x0, noise, sigma)
    x0_err = ((fm.model_output("x0", pred, x_t, sigma) - fm.training_target("x0", x0, noise)) ** 2).mean((1, 2, 3))
    v_err = ((fm.model_output("velocity", pred, x_t, sigma) - fm.training_target("velocity", x0, noise)) ** 2
             ).mean((1, 2, 3))
    assert torch.allclose(x0_err, sigma ** 2 * v_err, rtol=1e-4)  # float32 cancellation in x_t - x0 at small sigma
    assert torch.allclose(fm.loss_weight("sigma_sqrt", sigma) * x0_err, v_err, rtol=1e-4)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = torch.rand(32, generator=torch.Generator().manual_seed(0)).clamp(min=1e-3)
    assert torch.equal(fm.loss_weight(weighting, sigma), compute_loss_weighting_for_sd3(weighting, sigmas=sigma))


def test_draws_are_reproducible_and_resume_exact():
    draw = fm.SigmaDraw(sampling="logit_normal", shift=3.0, sigma_range=(0.1, 0.9))
    gen = torch.Generator().manual_seed(7)
    first = fm.draw_sigmas(draw, 4, gen)
    state = gen.get_state()  # what a checkpoint stores
    second = fm.draw_sigmas(draw, 4, gen)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(fm.draw_sigmas(draw, 4, resumed), second) and not torch.equal(first, second)
    assert torch.all((first >= 0.1) & (first <= 0.9))


def test_bad_names_and_ranges_are_refused_in_one_line():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(UserError, match="allowed uniform, logit_normal, mode, cosmap"):
        fm.draw_sigmas(fm.SigmaDraw(sampling="lognorm", shift=1.0), 2, gen)
    with pytest.raises(UserError, match="sigma range"):
        fm.draw_sigmas(fm.SigmaDraw(shift=1.0, sigma_range=(0.5, 0.5)), 2, gen)
    with pytest.raises(UserError, match="no scheduler config"):
        fm.draw_sigmas(fm.SigmaDraw(), 2, gen)
    with pytest.raises(UserError, match="allowed velocity, x0"):
        fm.training_target("epsilon", torch.zeros(1), torch.zeros(1))
    with pytest.raises(UserError, match="allowed none, sigma_sqrt, cosmap"):
        fm.loss_weight("min_snr", torch.ones(1))
