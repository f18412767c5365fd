"""reg.preservation: weight · MSE(adapted prediction, base prediction) on preservation prompts, with the step's noisy
latents and timesteps; the base prediction is the same UNet and text encoder with every adapter disabled."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.model.text import encode, tokenize
from sdlora.training.preservation import Preservation, preservation_prompts, remove_trigger_words
from sdlora.training.loop import train

PROMPTS = ["a dog on a sofa", "a mountain lake at sunrise", "a red car"]
INITS = ["zero", "orthogonal", "compensated", "principal"]


def quiet(*a, **k):
    pass


def adapted_model(cfg, seed=0):
    """The tiny model with adapters whose B is randomised: the adapted model is far from the base."""
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    return comps, layers


def step_inputs(comps, n=2):
    gen = torch.Generator().manual_seed(1)
    c = comps.unet.config
    noisy = torch.randn(n, c.in_channels, 8, 8, generator=gen)
    return noisy, torch.tensor([20, 700, 400][:n])


def fresh_base_prediction(path, prompts, noisy, timesteps):
    """The untouched model, loaded again from disk: what the base prediction must be."""
    base = load_components(path)
    with torch.no_grad():
        cond = encode(base.text_encoder, tokenize(base.tokenizer, prompts))
        return base.unet(noisy, timesteps, encoder_hidden_states=cond).sample


def preservation_config(make_config, **kw):
    return make_config(reg={"preservation": {"weight": 1.0, "source": "prompts", "prompts": PROMPTS, **kw}})


@pytest.mark.parametrize("init", INITS)
def test_the_target_is_the_base_models_prediction(make_config, init):
    cfg = make_config(lora={"init": init}, reg={"preservation": {"weight": 1.0, "source": "prompts", "prompts": PROMPTS}})
    comps, _ = adapted_model(cfg)
    pres = Preservation(cfg, comps, PROMPTS)
    noisy, t = step_inputs(comps, 3)
    target, _ = pres.base_prediction(noisy, t, pres.token_ids(PROMPTS, "cpu"), {"captions": PROMPTS})
    reference = fresh_base_prediction(cfg.model.path, PROMPTS, noisy, t)
    with torch.no_grad():
        adapted = comps.unet(noisy, t,
                             encoder_hidden_states=encode(comps.text_encoder, tokenize(comps.tokenizer, PROMPTS))).sample
    scale = float(reference.abs().max())
    assert float((adapted - reference).abs().max()) > 1e-2 * scale  # the adapters really change the prediction
    if init in ("zero", "orthogonal"):
        assert torch.equal(target, reference)  # W0 untouched: the disabled forward is the base forward, bit for bit
    else:
        # W' = W0 - s0·B0·A0 is stored rounded to fp32 and W' x + s0·B0·A0 x re-adds it in another order: fp32
        # rounding through the tiny UNet's layers, ~1e-7 of the output's scale; the adapters move it ~1e-1.
        assert float((target - reference).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_the_term_equals_a_reference_and_trains_the_adapters(make_config, train_text_encoder):
    cfg = preservation_config(make_config)
    cfg.text_encoder.train = train_text_encoder
    comps, layers = adapted_model(cfg)
    pres = Preservation(cfg, comps, PROMPTS)
    noisy, t = step_inputs(comps)
    step = 7
    got = pres(comps.unet, [comps.text_encoder], noisy, t, {"captions": ["x", "y"]}, step)

    prompts = pres.prompts_for(step, 2)
    with torch.no_grad():
        adapted = comps.unet(noisy, t, encoder_hidden_states=encode(comps.text_encoder,
                                                                    tokenize(comps.tokenizer, prompts))).sample
    reference = float(((adapted.double() - fresh_base_prediction(cfg.model.path, prompts, noisy, t).double()) ** 2).mean())
    assert reference > 1e-4  # the adapters moved the prediction
    # fp32 differences of fp32 predictions, squared and averaged: ~1e-6 relative.
    assert float(got.detach()) == pytest.approx(reference, rel=1e-5)
    got.backward()
    for component in ("unet", "text_encoder"):
        grads = [float(l.lora_B.grad.abs().sum()) for n, l in layers.items()
                 if n.startswith(component + ".") and l.lora_B.grad is not None]
        if component == "text_encoder" and not train_text_encoder:
            assert not grads  # a frozen text encoder has no adapters
        else:
            assert grads and max(grads) > 0


def test_prompts_of_a_step_depend_only_on_seed_and_step(make_config):
    cfg = preservation_config(make_config)
    comps = load_components(cfg.model.path)
    a, b = Preservation(cfg, comps, PROMPTS), Preservation(cfg, comps, PROMPTS)
    torch.manual_seed(123)
    assert a.prompts_for(5, 4) == b.prompts_for(5, 4)  # resume draws what the uninterrupted run drew
    assert len({tuple(a.prompts_for(s, 4)) for s in range(1, 20)}) > 1
    state = torch.random.get_rng_state()
    a.prompts_for(6, 4)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG touched


def test_training_adds_the_weighted_term_on_due_steps(make_config, tmp_path):
    out = tmp_path / "run"
    weight = 0.5
    cfg = make_config(output={"dir": str(out)}, train={"max_steps": 4},
                      reg={"preservation": {"weight": weight, "source": "captions", "trigger_words": ["red"],
                                            "every_steps": 2}})
    train(cfg, log=quiet)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("preservation/loss" in r) for r in rows] == [False, True, False, True]
    for r in rows[1::2]:
        assert r["preservation/loss"] > 0  # step 2 onwards: the adapters have moved
        # The loss is the fp32 sum of the two terms: equal to ~1e-7 relative.
        assert r["loss"] == pytest.approx(r["diffusion_loss"] + weight * r["preservation/loss"], rel=1e-6)


def test_first_step_term_is_zero_for_an_output_preserving_init(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(output={"dir": str(out)}, train={"max_steps": 1}, lora={"init": "orthogonal"},
                      reg={"preservation": {"weight": 1.0}}), log=quiet)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Orthogonal init: B·A = 0, the adapted and base predictions differ only by fp32 rounding of + s·B·A x
    # (predictions are ~1, squared differences ~1e-14).
    assert row["preservation/loss"] < 1e-10


def test_weight_zero_trains_bit_identically(make_config, tmp_path):
    plain = train(make_config(output={"dir": str(tmp_path / "a")}, train={"max_steps": 3}), log=quiet)
    off = train(make_config(output={"dir": str(tmp_path / "b")}, train={"max_steps": 3},
                            reg={"preservation": {"weight": 0.0, "source": "prompts", "prompts": PROMPTS}}), log=quiet)
    a, b = load_file(plain.adapter_path), load_file(off.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trigger_words_are_removed_as_whole_words():
    assert remove_trigger_words("sks dog, sks, sitting on grass", ["sks"]) == "dog, sitting on grass"
    assert remove_trigger_words("asks sks, tasks", ["sks"]) == "asks, tasks"
    assert remove_trigger_words("ohwx woman, ohwx", ["ohwx", "woman"]) == ""
    assert remove_trigger_words("c++ style, photo", ["c++"]) == "style, photo"


def test_captions_source_is_the_datasets_captions_without_triggers(make_config):
    from sdlora.data.pipeline import scan
    from sdlora.data.sources import discover

    cfg = make_config(data={"prefix": "zkz "}, reg={"preservation": {"weight": 1.0, "source": "captions",
                                                                      "trigger_words": ["zkz", "photo"]}})
    samples, _ = scan(discover(cfg.data_subsets(), 1.0), cfg.data)
    prompts = preservation_prompts(cfg, samples)
    assert prompts and len(prompts) == len(set(prompts)) <= len(samples)
    assert all(p.startswith("a of a ") for p in prompts)  # the prefix's trigger and "photo" are gone


def test_config_errors_name_the_missing_key(make_config, tmp_path):
    with pytest.raises(UserError, match="reg.preservation.source=prompts needs reg.preservation.prompts"):
        make_config(reg={"preservation": {"weight": 1.0, "source": "prompts"}})
    with pytest.raises(UserError, match="reg.preservation.trigger_words is set but reg.preservation.source is empty"):
        make_config(reg={"preservation": {"weight": 1.0, "trigger_words": ["sks"]}})
    cfg = make_config(output={"dir": str(tmp_path / "run")},
                      reg={"preservation": {"weight": 1.0, "source": "file", "prompts_file": str(tmp_path / "none.txt")}})
    with pytest.raises(UserError, match="reg.preservation.prompts_file: cannot read"):
        train(cfg, log=quiet)
    assert not (tmp_path / "run").exists()  # stopped before anything was loaded or written
    (tmp_path / "blank.txt").write_text("\n  \n")
    cfg.reg.preservation.prompts_file = str(tmp_path / "blank.txt")
    with pytest.raises(UserError, match="has no prompts"):
        train(cfg, log=quiet)


def test_file_source_reads_one_prompt_per_line(make_config, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a red car  \n")
    cfg = make_config(reg={"preservation": {"weight": 1.0, "source": "file", "prompts_file": str(tmp_path / "p.txt")}})
    assert preservation_prompts(cfg, []) == ["a cat", "a red car"]


def test_sdxl_target_is_the_base_models_prediction_and_training_logs_it(tmp_path, shapes_data):
    """SDXL: both text encoders and the UNet disabled together; the step's size conditioning is kept."""
    from sdlora.config import validate
    from sdlora.model.tiny import make_tiny_sdxl

    path = make_tiny_sdxl(tmp_path / "sdxl", seed=0)
    cfg = validate({"model": {"path": str(path)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-3, "max_grad_norm": None}, "lora": {"rank": 4, "alpha": 4, "init": "principal"},
                    "log": {"tracker": "none"},
                    "reg": {"preservation": {"weight": 1.0, "source": "prompts", "prompts": PROMPTS}}})
    comps, _ = adapted_model(cfg)
    pres = Preservation(cfg, comps, PROMPTS)
    noisy, t = step_inputs(comps, 2)
    batch = {"captions": PROMPTS[:2], "original_size": torch.tensor([[64, 64], [80, 64]]),
             "crop_top_left": torch.tensor([[0, 0], [8, 0]]), "target_size": torch.tensor([[64, 64], [64, 64]])}
    target, _ = pres.base_prediction(noisy, t, pres.token_ids(PROMPTS[:2], "cpu"), batch)
    fresh = load_components(str(path))
    with torch.no_grad():
        ids = [tokenize(tok, PROMPTS[:2]) for tok in fresh.tokenizers]
        cond = fresh.family.encode(list(fresh.text_encoders.values()), ids)
        reference = fresh.unet(noisy, t, **fresh.family.unet_kwargs(cond, batch)).sample
    # principal init: the disabled path re-adds the fp32-rounded offset (see the SD test): ~1e-7 of the scale.
    assert float((target - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    out = train(cfg, log=quiet)
    rows = [json.loads(line) for line in (out.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["preservation/loss"] >= 0 for r in rows) and rows[1]["preservation/loss"] > 0
