"""The rectified-flow objective (model/flow_objective.py) on model/objective.py's interface: its draws come from the
step's Draws in the documented order, its noised batch is flow_matching's maths, its fixed validation times are the
training distribution's quantiles, and its configs come from the model's scheduler and VAE."""

import json

import pytest
import torch

from sdlora.errors import UserError
from sdlora.model import flow_matching as fm
from sdlora.model.flow_objective import FlowMatchingObjective
from sdlora.training.draws import GeneratorDraws


def _objective(**kw):
    draw = fm.SigmaDraw(**{"sampling": "logit_normal", "shift": 3.0, **kw.pop("draw", {})})
    return FlowMatchingObjective(draw, 1.5305, 0.0609, **kw)


def test_draw_takes_noise_then_one_number_per_example_from_the_draws():
    obj = _objective(draw={"logit_mean": 0.5, "logit_std": 0.8})
    x0 = torch.zeros(3, 16, 4, 4)
    noise, sigma = obj.draw(GeneratorDraws(torch.Generator().manual_seed(5), 3, "cpu"), x0)
    gen = torch.Generator().manual_seed(5)
    expected_noise = torch.randn((3, 16, 4, 4), generator=gen)
    expected_sigma = fm.shift_sigmas(fm.from_normal(torch.randn((3,), generator=gen), 0.5, 0.8), 3.0)
    assert torch.equal(noise, expected_noise) and torch.equal(sigma, expected_sigma)


def test_noised_batch_is_the_flow_matching_maths():
    obj = _objective(weighting="cosmap")
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.2, 0.9])
    n = obj.noised(x0, noise, sigma)
    assert torch.equal(n.noisy, fm.noisy_latents(x0, noise, sigma)) and torch.equal(n.target, noise - x0)
    assert torch.equal(n.timesteps, sigma * 1000) and torch.equal(n.weight, fm.loss_weight("cosmap", sigma))
    assert torch.equal(n.times, sigma) and n.x0 is x0 and obj.prediction(n.target, n) is n.target


def test_x0_preconditioning_turns_the_true_velocity_into_x0():
    obj = _objective(target="x0")
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    n = obj.noised(x0, noise, torch.tensor([0.3, 0.8]))
    assert torch.equal(n.target, x0)
    assert torch.allclose(obj.prediction(noise - x0, n), x0, atol=1e-6)  # float32 rounding of values ~1


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "cosmap"])
def test_fixed_times_are_the_training_distributions_quantiles(sampling):
    obj = _objective(draw={"sampling": sampling, "logit_mean": 0.3, "sigma_range": (0.0, 0.9)})
    fixed = obj.fixed_times(8)
    _, drawn = obj.draw(GeneratorDraws(torch.Generator().manual_seed(0), 20000, "cpu"), torch.zeros(20000, 1, 1, 1))
    below = (drawn[None, :] < fixed[:, None]).float().mean(1)
    levels = (torch.arange(8) + 0.5) / 8
    # 20000 draws: the fraction below a quantile has standard error <= 0.0036; 0.015 is four of them
    assert torch.allclose(below, levels, atol=0.015) and fixed.dtype == torch.float32
    assert torch.all(fixed[1:] > fixed[:-1]) and 0.0 <= fixed[0] and fixed[-1] <= 0.9


def test_configs_come_from_the_models_scheduler_and_vae(tiny_sd3):
    scheduler = json.loads((tiny_sd3 / "scheduler" / "scheduler_config.json").read_text())
    vae = json.loads((tiny_sd3 / "vae" / "config.json").read_text())
    obj = FlowMatchingObjective.from_configs(scheduler, vae)
    assert (obj.draw_spec.shift, obj.scaling_factor, obj.shift_factor) == (3.0, 1.5305, 0.0609)
    assert obj.time_range == (0.0, 1.0) and obj.plain() is obj
    sample = torch.randn(1, 16, 4, 4)
    assert torch.allclose(obj.latents(sample) / 1.5305 + 0.0609, sample, atol=1e-6)  # what the pipeline decodes
    assert FlowMatchingObjective.from_configs(scheduler, vae, fm.SigmaDraw(shift=1.0)).draw_spec.shift == 1.0


def test_bad_choices_are_refused_in_one_line():
    with pytest.raises(UserError, match="allowed velocity, x0"):
        _objective(target="epsilon")
    with pytest.raises(UserError, match="allowed none, sigma_sqrt, cosmap"):
        _objective(weighting="min_snr")
    with pytest.raises(UserError, match="allowed uniform, logit_normal, mode, cosmap"):
        _objective(draw={"sampling": "lognorm"})
