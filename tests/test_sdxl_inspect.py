"""`sdlora inspect` on SDXL adapters: both encoders' modules in their own block groups, and the drift of each text
output (CLIP-L tokens, bigG tokens, pooled embedding) with the adapter merged, against the trained model itself."""

import pytest
import torch

from sdlora.adapter.io import load_adapter, save_adapter
from sdlora.analysis.inspect import BaseModel, inspect_adapter
from sdlora.cli import main
from sdlora.lora.layers import adapters_disabled
from sdlora.model.families import SDXL
from sdlora.model.text import content_mask, tokenize
from sdlora.reg.probe import DEFAULT_PROBE_PROMPTS, drift_stats
from sdlora.training.loop import train
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

OUTPUTS = ("text_encoder", "text_encoder_2", "pooled")


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return BaseModel(str(tiny_sdxl))


def reference_drift(components) -> dict[str, dict]:
    """The trained encoders (adapters on) against the same encoders with their adapters disabled, on the probe's
    prompts: each encoder's content tokens, and the pooled embedding as one vector per prompt."""
    encoders = [te.eval() for te in components.text_encoders.values()]
    ids = [tokenize(t, DEFAULT_PROBE_PROMPTS) for t in components.tokenizers]
    with torch.no_grad():
        now = SDXL.encode(encoders, ids)
        with adapters_disabled(encoders[0]), adapters_disabled(encoders[1]):
            before = SDXL.encode(encoders, ids)
    masks = [content_mask(i, t.eos_token_id) for i, t in zip(ids, components.tokenizers)]
    pairs = {"text_encoder": (now.per_encoder[0], before.per_encoder[0], masks[0]),
             "text_encoder_2": (now.per_encoder[1], before.per_encoder[1], masks[1]),
             "pooled": (now.pooled[:, None], before.pooled[:, None], torch.ones(len(DEFAULT_PROBE_PROMPTS), 1, dtype=torch.bool))}
    return {name: {k.removeprefix("probe/"): v for k, v in drift_stats(e.float(), e0.float(), m).items()}
            for name, (e, e0, m) in pairs.items()}


def test_inspect_reports_both_encoders_and_the_pooled_embedding_as_the_trained_model_has_them(
        sdxl_config, base, tmp_path, capsys):
    result = train(sdxl_config(optim={"lr": 2e-2}, train={"max_steps": 3}, lora={"init": "orthogonal"}),
                   log=lambda *a: None)
    report = inspect_adapter(result.adapter_path, base)
    groups = {g["group"] for g in report["groups"]}
    assert {"text_encoder.layers.0", "text_encoder_2.layers.2", "unet.down.1", "unet.mid", "unet.up.0"} <= groups
    assert all(e["relative_norm"] is not None for e in report["modules"])  # W0 found for every module
    drift = report["text_encoder_drift"]
    assert tuple(drift["outputs"]) == OUTPUTS and drift["drift"] == drift["outputs"]["text_encoder"]["drift"]
    expected = reference_drift(result.components)
    for name in OUTPUTS:  # ΔW merged into W0 (inspect) vs the live LoRA layers (reference): fp32 rounding apart
        got = drift["outputs"][name]
        assert got["drift"] > 1e-4 and got["cosine"] < 1.0, name  # the adapter did move this output
        for key in ("drift", "cosine", "norm", "base_norm"):
            assert got[key] == pytest.approx(expected[name][key], abs=1e-5), (name, key)
    # the kohya file of the same adapter (lora_te1_ / lora_te2_ names) gives the same drift
    kohya = tmp_path / "kohya.safetensors"
    save_adapter(load_adapter(result.adapter_path), kohya, "kohya")
    again = inspect_adapter(kohya, base)["text_encoder_drift"]["outputs"]
    for name in OUTPUTS:
        assert again[name]["drift"] == pytest.approx(drift["outputs"][name]["drift"], abs=1e-6)
    # and the command prints one line per output
    assert main(["inspect", str(result.adapter_path), "--base", str(base.path)]) == 0
    printed = capsys.readouterr().out
    assert all(f"text-embedding drift ({label})" in printed
               for label in ("text_encoder", "text_encoder_2", "pooled embedding"))


def test_an_adapter_on_the_first_encoder_only_reports_that_encoders_drift(sdxl_config, base):
    result = train(sdxl_config(optim={"lr": 2e-2, "text_encoder_2_lr": 0.0}, train={"max_steps": 2},
                               lora={"text_encoder_targets": ["q_proj"]}), log=lambda *a: None)
    adapter = load_adapter(result.adapter_path)
    first_only = result.adapter_path.parent / "te1.safetensors"
    adapter.modules = {n: m for n, m in adapter.modules.items() if not n.startswith("text_encoder_2.")}
    save_adapter(adapter, first_only, "diffusers")
    drift = inspect_adapter(first_only, base)["text_encoder_drift"]
    assert tuple(drift["outputs"]) == ("text_encoder",)
