"""model.zero_terminal_snr (Lin et al. 2023): the training schedule is the paper's rescaled one, ending in pure noise;
sampling starts at the last timestep with guidance rescale; epsilon prediction is refused; every export says it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import deep_update
from sdlora.adapter.run_record import RunRecord
from sdlora.commands.export import run_export
from sdlora.config import validate
from sdlora.errors import UserError
from sdlora.model import ldm_keys as L
from sdlora.model.loading import load_components
from sdlora.model.schedule import GUIDANCE_RESCALE, guidance_rescale
from sdlora.model.tiny import make_tiny_sdxl
from sdlora.training.losses import diffusion_target, min_snr_weights
from sdlora.training.loop import train
from sdlora.training.sampling import inference_scheduler
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny_sdxl_v(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl-v") / "model", seed=0, v_prediction=True)


def paper_rescaled_alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed", in float64, on SD's
    scaled-linear betas: shift sqrt(alpha_bar) so the last is 0, scale so the first is unchanged."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def test_the_training_schedule_is_the_papers_and_its_last_step_is_pure_noise(tiny_sdxl_v):
    sched = load_components(str(tiny_sdxl_v), zero_terminal_snr=True).noise_scheduler
    plain = load_components(str(tiny_sdxl_v)).noise_scheduler
    ab = sched.alphas_cumprod.double()
    ref = paper_rescaled_alphas_cumprod()
    assert float((ab - ref).abs().max()) <= 1e-6 and float(ab[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 1e-3
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    assert torch.equal(sched.add_noise(x0, eps, t), eps)  # the input carries no trace of the image
    assert torch.allclose(diffusion_target(sched, x0, eps, t), -x0, atol=1e-6)  # v at SNR 0 is -x0: learnable
    weights = min_snr_weights(sched, torch.tensor([0, 500, 999]), 5.0)  # v-prediction's min(SNR, 5) / (SNR + 1)
    assert torch.isfinite(weights).all() and float(weights[-1]) == 0.0


def test_zero_terminal_snr_with_epsilon_prediction_is_a_one_line_error(tiny_sdxl, tmp_path):
    with pytest.raises(UserError, match="needs v-prediction") as e:
        validate({"model": {"path": "x", "prediction_type": "epsilon", "zero_terminal_snr": True},
                  "data": {"path": "d"}, "output": {"dir": "o"}})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"model.zero_terminal_snr: zero terminal SNR needs v-prediction.*epsilon") as e:
        load_components(str(tiny_sdxl), zero_terminal_snr=True)  # an epsilon model, no override
    assert "\n" not in str(e.value)
    assert load_components(str(tiny_sdxl), prediction_type="v_prediction", zero_terminal_snr=True).zero_terminal_snr


def test_sampling_starts_at_the_last_timestep_with_guidance_rescale(tiny_sdxl_v):
    comps = load_components(str(tiny_sdxl_v), zero_terminal_snr=True)
    sampler = inference_scheduler(comps.noise_scheduler)
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]  # "leading" would start at 751 and never see SNR 0
    plain = inference_scheduler(load_components(str(tiny_sdxl_v)).noise_scheduler)
    assert not plain.config.rescale_betas_zero_snr
    sample = validate({"model": {"path": "x"}, "data": {"path": "d"}, "output": {"dir": "o"}}).sample
    assert guidance_rescale(sample, True) == GUIDANCE_RESCALE == 0.7 and guidance_rescale(sample, False) == 0.0
    sample.guidance_rescale = 0.3
    assert guidance_rescale(sample, True) == 0.3


def _config(model_path, data, out, **extra):
    d = {"model": {"path": str(model_path)}, "data": {"path": str(data), "resolution": 64}, "output": {"dir": str(out)},
         "train": {"max_steps": 2, "batch_size": 2, "seed": 0}, "optim": {"lr": 1e-3}, "lora": {"rank": 4, "alpha": 4},
         "log": {"tracker": "none"}}
    return validate(deep_update(d, extra))


def test_a_zero_snr_run_samples_and_every_export_says_so(tiny_sdxl_v, shapes_data, tmp_path):
    cfg = _config(tiny_sdxl_v, shapes_data, tmp_path / "run", model={"zero_terminal_snr": True},
                  sample={"prompts": ["a red circle"], "every_steps": 2, "num_inference_steps": 2})
    result = train(cfg, log=QUIET)
    assert result.components.zero_terminal_snr and float(result.components.noise_scheduler.alphas_cumprod[-1]) == 0
    image = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000002" / "00.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0  # sampled from t=999 (v-prediction at SNR 0) without NaN
    record = RunRecord.from_metadata(_metadata(result.adapter_path))
    assert record.zero_terminal_snr and record.prediction_type == "v_prediction"
    kohya = _metadata(run_export(result.adapter_path, "kohya", tmp_path / "k.safetensors", report=QUIET))
    assert kohya["ss_zero_terminal_snr"] == "True" and kohya["ss_v_parameterization"] == "True"
    folder = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=str(tiny_sdxl_v),
                        report=QUIET)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["rescale_betas_zero_snr"], scheduler["timestep_spacing"], scheduler["prediction_type"]) == (
        True, "trailing", "v_prediction")
    merged = load_components(str(folder))
    assert merged.zero_terminal_snr and merged.prediction_type == "v_prediction"
    single = run_export(result.adapter_path, "merged-single-file", tmp_path / "m.safetensors",
                        base=str(tiny_sdxl_v), report=QUIET)
    with safe_open(str(single), "pt") as f:
        assert {L.V_PRED_KEY, L.ZTSNR_KEY} <= set(f.keys())  # ComfyUI's markers of a zero-SNR v-prediction SDXL
    configs = tmp_path / "configs"  # the model's configs without a scheduler: the file alone says v and zero SNR
    shutil.copytree(tiny_sdxl_v, configs, ignore=shutil.ignore_patterns("*.safetensors", "scheduler"))
    back = load_components(str(single), config_dir=str(configs))
    assert back.zero_terminal_snr and back.prediction_type == "v_prediction"


def test_an_ordinary_run_says_it_did_not_use_zero_snr(tiny_sdxl_v, shapes_data, tmp_path):
    result = train(_config(tiny_sdxl_v, shapes_data, tmp_path / "run", train={"max_steps": 1}), log=QUIET)
    assert not RunRecord.from_metadata(_metadata(result.adapter_path)).zero_terminal_snr
    kohya = _metadata(run_export(result.adapter_path, "kohya", tmp_path / "k.safetensors", report=QUIET))
    assert kohya["ss_zero_terminal_snr"] == "False"


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()
