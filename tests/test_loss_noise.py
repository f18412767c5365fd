"""The DDPM loss and noise options of issue 29 item 4, each against its formula on a case worked by hand (the
numbers in the comments), with its source: debiased estimation (kohya's apply_debiased_estimation), input
perturbation (Ning et al. 2023; kohya's ip_noise_gamma), pyramid noise (kohya's pyramid_noise_like), timestep
distributions (the SD3 paper's maps as OneTrainer draws discrete timesteps), the Huber family and its schedules
(kohya's conditional_loss and get_huber_threshold_if_needed). Then: a run with all of them resumes bit-identically."""

import math
import os
import signal

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from safetensors.torch import load_file

from sdlora.config import LossConfig
from sdlora.model.ddpm_draws import TimestepDraw, perturbed_noise, pyramid_noise
from sdlora.model.objective import DDPMObjective, debiased_weights, huber_deltas, min_snr_weights
from sdlora.training.losses import pointwise_loss, weighted_loss


class Scripted:
    """A `Draws` (model/objective.py) that hands out the given values in order, each checked against the kind of
    draw asked for (and its shape): a draw out of order or one too many fails the test."""

    def __init__(self, *script):
        self.script = list(script)

    def _take(self, kind, shape=None):
        assert self.script, f"an unexpected draw: {kind}"
        want, value = self.script.pop(0)
        assert want == kind, f"drew {kind} where the script has {want}"
        if shape is not None:
            assert tuple(value.shape[1:]) == tuple(shape), (kind, shape, value.shape)
        return value

    def normal(self, shape):
        return self._take("normal", shape)

    def uniform(self):
        return self._take("uniform")

    def integers(self, low, high):
        return self._take("integers")

    def batch_uniform(self):
        return self._take("batch_uniform")


def sd_scheduler(kind="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=kind)


def two_step_scheduler(kind="epsilon"):
    """alphas_cumprod [0.64, 0.32]: sqrt(ᾱ_0) = 0.8 and sqrt(1 - ᾱ_0) = 0.6, easy to work by hand."""
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.5], prediction_type=kind)


def objective(scheduler, **kw):
    return DDPMObjective(scheduler, 1.0, **kw)


# ------------------------------------------------------------------------------------------ debiased estimation
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_debiased_weight_is_kohyas_inverse_sqrt_snr_capped_at_1000(kind):
    s = sd_scheduler(kind)
    t = torch.tensor([0, 10, 250, 500, 999])
    # t = 0: beta_0 = 0.00085, SNR = 0.99915 / 0.00085 = 1175.5, capped to 1000: 1/sqrt(1000) = 0.0316228 (epsilon),
    # 1/1001 = 0.000999 (v-prediction)
    first = 0.0316228 if kind == "epsilon" else 1 / 1001
    got = debiased_weights(s, t).double()
    assert float(got[0]) == pytest.approx(first, rel=1e-5)  # float32 SNR: 1e-5 relative is rounding
    ac = s.alphas_cumprod.double()[t]
    snr = torch.clamp(ac / (1 - ac), max=1000.0)
    expected = 1 / snr.sqrt() if kind == "epsilon" else 1 / (snr + 1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
    # with min-SNR on, the objective's weight is the product (kohya applies one after the other)
    noised = objective(s, min_snr_gamma=5.0, debiased=True).noised(torch.zeros(5, 4, 2, 2), torch.zeros(5, 4, 2, 2), t)
    assert torch.allclose(noised.weight.double(), min_snr_weights(s, t, 5.0).double() * expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------- input perturbation
X0 = torch.tensor([[[[1.0, 2.0]]]])
NOISE = torch.tensor([[[[0.5, -1.0]]]])
XI = torch.tensor([[[[2.0, 4.0]]]])


@pytest.mark.parametrize("kind, target", [("epsilon", [0.5, -1.0]),
                                          ("v_prediction", [-0.2, -2.0])])  # 0.8·eps - 0.6·x0
def test_input_perturbation_noises_the_input_with_noise_plus_gamma_xi_and_keeps_the_target(kind, target):
    obj = objective(two_step_scheduler(kind), ip_noise_gamma=0.1)
    draws = Scripted(("normal", NOISE), ("integers", torch.tensor([0])), ("normal", XI))
    drawn = obj.draw(draws, X0)
    assert not draws.script and len(drawn) == 3
    noised = obj.noised(X0, *drawn)
    # input noise 0.5 + 0.1·2 = 0.7 and -1 + 0.1·4 = -0.6; noisy = 0.8·x0 + 0.6·(input noise) = [1.22, 1.24]
    assert torch.allclose(noised.noisy, torch.tensor([[[[1.22, 1.24]]]]), atol=1e-6)
    assert torch.allclose(noised.target, torch.tensor([[[target]]]), atol=1e-6)
    # off: the input is made with the noise itself, and nothing more is drawn
    plain = objective(two_step_scheduler(kind)).noised(X0, *objective(two_step_scheduler(kind)).draw(
        Scripted(("normal", NOISE), ("integers", torch.tensor([0]))), X0))
    assert torch.allclose(plain.noisy, 0.8 * X0 + 0.6 * NOISE, atol=1e-6) and torch.equal(plain.target, noised.target)


def test_input_perturbation_with_random_strength_draws_one_strength_per_example():
    noise = torch.cat([NOISE, NOISE])
    draws = Scripted(("normal", torch.cat([XI, XI])), ("uniform", torch.tensor([0.5, 0.25])))
    got = perturbed_noise(draws, noise, 0.1, random_strength=True)
    # strengths 0.05 and 0.025: [0.5 + 0.1, -1 + 0.2] and [0.5 + 0.05, -1 + 0.1]
    assert torch.allclose(got, torch.tensor([[[[0.6, -0.8]]], [[[0.55, -0.9]]]]), atol=1e-6)


def test_noise_offset_with_random_strength_scales_the_offset_per_example():
    obj = objective(two_step_scheduler(), noise_offset=0.1, noise_offset_random_strength=True)
    draws = Scripted(("normal", torch.zeros(2, 1, 1, 2)), ("uniform", torch.tensor([0.5, 0.25])),
                     ("normal", torch.full((2, 1, 1, 1), 2.0)), ("integers", torch.tensor([0, 1])))
    noise, _ = obj.draw(draws, torch.zeros(2, 1, 1, 2))
    # offsets 0.1·0.5·2 = 0.1 and 0.1·0.25·2 = 0.05, the same over each channel's pixels
    assert not draws.script and torch.allclose(noise, torch.tensor([[[[0.1, 0.1]]], [[[0.05, 0.05]]]]), atol=1e-7)


def test_adaptive_noise_scale_adds_the_channel_mean_magnitude_to_the_offset_floored_at_zero():
    obj = objective(two_step_scheduler(), noise_offset=0.1, adaptive_noise_scale=-0.5)
    x0 = torch.tensor([[[[1.0, 3.0]], [[-0.1, -0.1]]]])  # channel means 2 and -0.1
    draws = Scripted(("normal", torch.zeros(1, 2, 1, 2)), ("normal", torch.ones(1, 2, 1, 1)), ("integers", torch.tensor([0])))
    noise, _ = obj.draw(draws, x0)
    # offsets max(0.1 - 0.5·2, 0) = 0 and 0.1 - 0.5·0.1 = 0.05, times the per-channel normal 1
    assert not draws.script and torch.allclose(noise, torch.tensor([[[[0.0, 0.0]], [[0.05, 0.05]]]]), atol=1e-7)


# --------------------------------------------------------------------------------------------- pyramid noise
def test_pyramid_noise_adds_upsampled_levels_weighted_discount_to_the_i_and_normalises_per_example():
    level0 = torch.zeros(1, 1, 4, 4)
    level0[0, 0, 0, 0] = 1.0
    level1 = torch.tensor([[[[0.0, 4.0], [0.0, 4.0]]]])
    level2 = torch.full((1, 1, 1, 1), 8.0)
    # u = 0: r = 2, sizes 4 / 2^i: 4x4, 2x2, 1x1 (the last level: it stops there)
    draws = Scripted(("batch_uniform", 0.0), ("normal", level0), ("batch_uniform", 0.0), ("normal", level1),
                     ("batch_uniform", 0.0), ("normal", level2))
    got = pyramid_noise(draws, torch.zeros(1, 1, 4, 4), iterations=5, discount=0.5)
    assert not draws.script  # stopped after the 1x1 level, before iteration 4
    # bilinear 2 -> 4 (half-pixel centres, clamped at the border) of a row [0, 4]: [0, 1, 3, 4]
    row = torch.tensor([0.0, 1.0, 3.0, 4.0])
    by_hand = level0 + 0.5 * row.expand(4, 4) + 0.25 * 8.0  # 1·level 0 + 0.5·level 1 + 0.25·level 2
    assert torch.allclose(got, by_hand / by_hand.std(), atol=1e-6)


def test_pyramid_noise_level_sizes_follow_the_drawn_ratio():
    # u = 0.5: r = 3: level 1 is int(8 / 3) = 2 pixels wide, level 2 int(8 / 9) -> 1: the last one drawn
    draws = Scripted(("batch_uniform", 0.5), ("normal", torch.zeros(2, 1, 8, 8)),
                     ("batch_uniform", 0.5), ("normal", torch.ones(2, 1, 2, 2)),
                     ("batch_uniform", 0.5), ("normal", torch.ones(2, 1, 1, 1)))
    noise = torch.stack([torch.arange(64.0).view(1, 8, 8), -torch.arange(64.0).view(1, 8, 8) ** 2])
    got = pyramid_noise(draws, noise, iterations=6, discount=0.3)
    assert not draws.script
    by_hand = noise + 0.3 + 0.09  # levels of ones upsampled are 1 everywhere, times 0.3^1 and 0.3^2
    for i in range(2):  # each example divided by its own standard deviation
        assert torch.allclose(got[i], by_hand[i] / by_hand[i].std(), atol=1e-6)


def test_the_objective_draws_noise_offset_pyramid_timesteps_then_perturbation_in_that_order():
    obj = objective(two_step_scheduler(), noise_offset=0.1, multires_iterations=1, ip_noise_gamma=0.1,
                    timestep_draw=TimestepDraw("cosmap"))
    x0 = torch.zeros(1, 1, 2, 2)
    draws = Scripted(("normal", torch.ones(1, 1, 2, 2)), ("normal", torch.ones(1, 1, 1, 1)),  # noise, offset
                     ("batch_uniform", 0.0), ("normal", torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])),  # level 0
                     ("uniform", torch.tensor([0.75])), ("normal", torch.ones(1, 1, 2, 2)))  # timestep, xi
    noise, times, input_noise = obj.draw(draws, x0)
    assert not draws.script
    by_hand = torch.tensor([[[[2.1, 3.1], [4.1, 5.1]]]])  # 1 + 0.1 + level 0, then / its std
    assert torch.allclose(noise, by_hand / by_hand.std(), atol=1e-6)
    assert times.tolist() == [1] and torch.allclose(input_noise, noise + 0.1, atol=1e-6)  # 0.707107 of [0, 2)


# ------------------------------------------------------------------------------------- timestep distributions
@pytest.mark.parametrize("draw, kind, u, expected", [
    # sigmoid(0.5 + 2·0) = 0.622459, sigmoid(0.5 + 2·1) = 0.924142; 100 + floor(x · 800)
    (TimestepDraw("logit_normal", 0.5, 2.0), "normal", [0.0, 1.0], [597, 839]),
    # 1 - 1/(tan(pi·u/2) + 1): u = 0.25 -> 0.292893, u = 0.75 -> 0.707107; 100 + floor(x · 800)
    (TimestepDraw("cosmap"), "uniform", [0.25, 0.75], [334, 665]),
    # 1 - u - 1.29·(cos²(pi·u/2) - 1 + u): 0.616416, 0.383584, and 1.0 at u = 0 (clamped to max - 1)
    (TimestepDraw("mode", mode_scale=1.29), "uniform", [0.25, 0.75, 0.0], [593, 406, 899]),
])
def test_timestep_distributions_map_one_draw_per_example_onto_the_timestep_range(draw, kind, u, expected):
    draws = Scripted((kind, torch.tensor(u)))
    assert draw.draw(draws, 100, 900).tolist() == expected and not draws.script


def test_uniform_timesteps_are_the_integers_sdlora_always_drew():
    assert TimestepDraw().draw(Scripted(("integers", torch.tensor([7, 3]))), 0, 1000).tolist() == [7, 3]


def test_validation_timesteps_are_the_distributions_quantiles():
    # the normal's quartiles are ±0.674490: sigmoid -> 0.337492, 0.662508 -> 337, 662 of [0, 1000)
    assert TimestepDraw("logit_normal").fixed(2, 0, 1000).tolist() == [337, 662]
    assert TimestepDraw().fixed(3, 0, 1000).tolist() == [0, 500, 999]  # uniform: evenly spread, as before


# ------------------------------------------------------------------------------------ Huber loss and schedules
def test_huber_family_pointwise_values():
    pred, target = torch.tensor([[0.3, 1.0]]), torch.zeros(1, 2)
    # d = 0.3, 1.0 with c = 0.4: huber 0.5·0.09 = 0.045 and 0.4·(1 - 0.2) = 0.32; pseudo-Huber 2c(sqrt(d² + c²) - c):
    # 0.8·(0.5 - 0.4) = 0.08 and 0.8·(1.077033 - 0.4) = 0.541626; smooth_l1 2(sqrt(d² + c²) - c): 0.2 and 1.354066
    cases = {"huber": [0.045, 0.32], "pseudo_huber": [0.08, 0.541626], "smooth_l1": [0.2, 1.354066],
             "l1": [0.3, 1.0], "mse": [0.09, 1.0]}
    for kind, values in cases.items():
        assert torch.allclose(pointwise_loss(pred, target, kind, 0.4), torch.tensor([values]), atol=1e-6), kind
    # a (B,) parameter gives each example its own c (torch's Huber as well)
    assert torch.allclose(pointwise_loss(pred.T, torch.zeros(2, 1), "huber", torch.tensor([0.4, 0.4])),
                          torch.tensor([[0.045], [0.32]]), atol=1e-6)


def test_huber_schedules_follow_kohya():
    # exponential: scale·c^(t/T): 2·0.1^0 = 2 and 2·0.1^0.5 = 0.632456 (T = 1000)
    got = huber_deltas(sd_scheduler(), torch.tensor([0, 500]), "exponential", 0.1, 2.0)
    assert torch.allclose(got, torch.tensor([2.0, 0.632456]), atol=1e-6)
    # snr: (1 - c)/(1 + sigma)² + c, sigma = sqrt((1 - ᾱ)/ᾱ): ᾱ 0.64 -> 0.75 -> 0.393878; ᾱ 0.32 -> 1.457738 -> 0.248995
    got = huber_deltas(two_step_scheduler(), torch.tensor([0, 1]), "snr", 0.1, 2.0)
    assert torch.allclose(got, torch.tensor([0.393878, 0.248995]), atol=1e-6)
    assert torch.allclose(huber_deltas(sd_scheduler(), torch.tensor([3]), "constant", 0.1, 2.0), torch.tensor([0.2]))


class FixedPrediction:
    """A family whose denoiser call returns `pred`, so step_loss's own part (target, weights, Huber parameter) is
    what is measured."""

    def __init__(self, pred):
        self.pred = pred

    def predict(self, denoiser, noisy, timesteps, conditioning, batch):
        return self.pred


def test_a_scheduled_huber_parameter_reaches_the_steps_loss_per_example():
    from sdlora.training.step import step_loss

    cfg = LossConfig(type="pseudo_huber", huber_schedule="snr", huber_delta=0.1)
    obj = DDPMObjective.from_config(two_step_scheduler(), FrozenDict(scaling_factor=1.0), cfg)
    noised = obj.noised(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]))
    pred = torch.full((2, 1, 1, 1), 0.3)
    got = step_loss(obj, FixedPrediction(pred), None, noised, None, {}, cfg)
    c = torch.tensor([0.393878, 0.248995])  # the snr schedule's values above
    by_hand = (2 * c * (torch.sqrt(0.09 + c ** 2) - c)).mean()
    assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
    # the constant schedule is the loss's own parameter, times huber_scale
    assert objective(two_step_scheduler()).noised(X0, NOISE, torch.tensor([0])).huber_delta is None
    cfg = LossConfig(type="smooth_l1", huber_delta=0.2, huber_scale=2.0)
    assert float(weighted_loss(pred[:1], torch.zeros(1, 1, 1, 1), cfg)) == pytest.approx(2 * (0.5 - 0.4), rel=1e-5)


def test_the_loss_types_apply_to_rectified_flow_with_the_constant_parameter():
    from sdlora.model.flow_objective import FlowMatchingObjective
    from sdlora.training.step import step_loss

    obj = FlowMatchingObjective.from_configs({"shift": 3.0}, {"scaling_factor": 1.0})
    noised = obj.noised(torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.3, 1.0]]]]), torch.tensor([0.5]))
    cfg = LossConfig(type="pseudo_huber", huber_delta=0.2, huber_scale=2.0)  # c = 0.4
    got = step_loss(obj, FixedPrediction(torch.zeros(1, 1, 1, 2)), None, noised, None, {}, cfg)
    # the velocity target noise - x0 = [0.3, 1.0]: pseudo-Huber 0.08 and 0.541626 (above), mean 0.310813
    assert noised.huber_delta is None and float(got) == pytest.approx(0.310813, rel=1e-5)


# ------------------------------------------------------------------------------------------------- wiring
def test_the_loss_section_becomes_the_objective_and_plain_drops_the_perturbations():
    cfg = LossConfig(debiased_estimation=True, ip_noise_gamma=0.1, ip_noise_random_strength=True,
                     multires_noise_iterations=6, multires_noise_discount=0.4, timestep_sampling="logit_normal",
                     logit_mean=0.3, logit_std=1.2, type="pseudo_huber", huber_schedule="snr", huber_delta=0.2)
    obj = DDPMObjective.from_config(sd_scheduler(), FrozenDict(scaling_factor=0.18215), cfg)
    assert (obj.debiased, obj.ip_noise_gamma, obj.ip_noise_random_strength, obj.multires_iterations,
            obj.multires_discount, obj.huber_schedule, obj.huber_delta) == (True, 0.1, True, 6, 0.4, "snr", 0.2)
    assert obj.timestep_draw == TimestepDraw("logit_normal", 0.3, 1.2, 1.29)
    plain = obj.plain()
    assert (plain.ip_noise_gamma, plain.multires_iterations, plain.noise_offset) == (0.0, 0, 0.0)
    assert plain.debiased and plain.timestep_draw == obj.timestep_draw  # the loss itself stays


def _interrupt_at(stop_step):
    def hook(step, loss):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return hook


def test_a_run_with_every_option_resumes_bit_identically(make_config, tmp_path):
    from sdlora.training.loop import train
    from sdlora.training.signals import TrainingInterrupted

    loss = {"debiased_estimation": True, "min_snr_gamma": 5.0, "ip_noise_gamma": 0.1, "ip_noise_random_strength": True,
            "multires_noise_iterations": 4, "timestep_sampling": "logit_normal", "logit_mean": 0.5,
            "type": "pseudo_huber", "huber_schedule": "snr", "noise_offset": 0.05, "noise_offset_random_strength": True,
            "adaptive_noise_scale": 0.01}
    extra = {"loss": loss, "train": {"max_steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": 2}}
    full = train(make_config(extra, output={"dir": str(tmp_path / "full")}), log=lambda *a: None)
    cfg = make_config(extra, output={"dir": str(tmp_path / "cut")})
    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=_interrupt_at(3), log=lambda *a: None)
    train(cfg, resume="latest", log=lambda *a: None)
    a, b = load_file(full.adapter_path), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # CPU fp32: the same operations
    assert all(math.isfinite(x) for x in full.losses)
    plain = train(make_config({"train": {"max_steps": 1}}, output={"dir": str(tmp_path / "plain")}), log=lambda *a: None)
    assert plain.losses[0] != full.losses[0]  # the options are in the step (same seed, same first batch)
