"""The files a user loads into ComfyUI / AUTOMATIC1111, pinned without those tools (CI cannot have them;
benchmarks/comfyui_check.py runs ComfyUI's own loader, docs/formats.md records its result).

- A run leaves `adapter_kohya.safetensors` beside `adapter.safetensors`: ComfyUI leaves the diffusers layout's UNet
  attention modules unloaded (it maps them only as `...attn1.processor.to_q`), and reads the kohya layout whole.
  Its keys follow the naming ComfyUI's and A1111's key tables build: `lora_unet_` + diffusers' module path with `_`
  (SD 1.x/2.x), `lora_te_text_model_` + the CLIP path; its tensors hold the run's update.
- DoRA: sdlora trains and writes the output-axis (peft, LyCORIS `wd_on_out`) magnitude. The dense references below
  are the formulas ComfyUI (comfy/weight_adapter/base.py `weight_decompose`) and AUTOMATIC1111 (network.py
  `apply_weight_decompose`) apply to a `dora_scale`, in our own words: neither gives the trained weight, so no DoRA
  kohya file is offered to them (none beside a DoRA run), and `export --format kohya` says so and the file records it.
  When sdlora writes a convention they compute, these tests fail: drop the note then.
Tolerances: float64 maths on fp32 tensors: 1e-6 relative to the update is rounding; "wrong" means > 5% of it.
"""

import pytest
import torch

from sdlora.adapter.io import detect_layout, load_adapter, save_adapter
from sdlora.adapter.weights import DoRADelta
from sdlora.training.export import UI_FILE, export_for_uis
from sdlora.training.loop import train


def quiet(*_a, **_k):
    pass


def test_a_run_leaves_a_kohya_file_that_holds_its_update_under_the_names_comfyui_maps(make_config, tmp_path):
    said = []
    result = train(make_config(train={"max_steps": 2}, lora={"conv": True, "alpha": 3}), log=said.append)
    run = result.out_dir
    ui = run / UI_FILE
    assert ui.is_file() and any(str(ui) in line for line in said)
    from safetensors import safe_open

    with safe_open(str(ui), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert detect_layout(keys) == "kohya" and meta["ss_network_module"] == "networks.lora"
    native, kohya = load_adapter(result.adapter_path), load_adapter(ui)
    stems = {k.split(".")[0] for k in keys}
    expected = set()
    for name in native.modules:
        component, _, path = name.partition(".")
        expected.add(("lora_unet_" if component == "unet" else "lora_te_text_model_") + path.replace(".", "_"))
    assert stems == expected
    for name, m in native.modules.items():
        dw = m.delta_weight().double()
        assert float((kohya.modules[name].delta_weight().double() - dw).abs().max()) <= 1e-6 * float(dw.abs().max())


def _comfyui_weight(w0, dv, scale):
    """ComfyUI's patched weight for a dora_scale (its rule in our words): the axis from the scale's shape; the output
    axis divides by the norm of W0, the input axis by that of W0 + ΔV."""
    v = w0 + dv
    if scale.shape[0] == w0.shape[0]:
        return v * scale.reshape(-1, 1) / w0.norm(dim=1, keepdim=True)
    return v * scale.reshape(1, -1) / v.norm(dim=0, keepdim=True)


def _a1111_weight(w0, dv, scale):
    """AUTOMATIC1111's: always the input axis (the norm of each column of W0 + ΔV), the scale broadcast against it."""
    v = w0 + dv
    return v * (scale.reshape(*scale.shape[:2]) / v.norm(dim=0, keepdim=True))


def _lycoris_wd_on_out_weight(w0, dv, scale):
    """LyCORIS' own with wd_on_out (what the file declares): the norm of each row of W0 + ΔV."""
    v = w0 + dv
    return v * scale.reshape(-1, 1) / v.norm(dim=1, keepdim=True)


def test_the_dora_kohya_file_is_lycoris_output_axis_which_comfyui_and_a1111_do_not_compute(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(20, 24, generator=g, dtype=torch.float64) * 0.1
    down, up = torch.randn(4, 24, generator=g) * 0.3, torch.randn(20, 4, generator=g) * 0.3
    magnitude = (w0.norm(dim=1) * (1 + 0.3 * torch.rand(20, generator=g, dtype=torch.float64))).float()
    from sdlora.adapter.weights import AdapterWeights

    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = AdapterWeights({name: DoRADelta(down, up, magnitude=magnitude)})
    path = tmp_path / "dora.safetensors"
    save_adapter(adapter, path, "kohya")
    sd = load_file(str(path))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    alpha, rank = float(sd[f"{stem}.alpha"]), sd[f"{stem}.lora_down.weight"].shape[0]
    dv = (alpha / rank) * sd[f"{stem}.lora_up.weight"].double() @ sd[f"{stem}.lora_down.weight"].double()
    scale = sd[f"{stem}.dora_scale"].double()
    assert scale.shape == (20, 1)  # the output axis
    ours = w0 + adapter.modules[name].delta_weight(w0)
    update = float((ours - w0).abs().max())

    def off(weight):
        return float((weight - ours).abs().max()) / update

    assert off(_lycoris_wd_on_out_weight(w0, dv, scale)) <= 1e-6
    assert off(_comfyui_weight(w0, dv, scale)) > 0.05
    assert off(_a1111_weight(w0, dv, scale)) > 0.05


def test_export_and_merge_say_that_the_dora_kohya_file_is_not_for_comfyui_and_record_it(tmp_path):
    from safetensors import safe_open

    from sdlora.adapter.weights import AdapterWeights
    from sdlora.commands.export import run_export
    from sdlora.commands.resize import run_resize

    g = torch.Generator().manual_seed(1)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = AdapterWeights({name: DoRADelta(torch.randn(4, 24, generator=g), torch.randn(20, 4, generator=g),
                                              magnitude=torch.rand(20, generator=g) + 0.5)})
    native = tmp_path / "dora.safetensors"
    save_adapter(adapter, native, "diffusers")
    for command in ("export", "resize"):
        said, out = [], tmp_path / f"{command}.safetensors"
        if command == "export":
            run_export(native, "kohya", out, report=said.append)
        else:
            run_resize(native, out, "rank", 4, layout="kohya", report=said.append)
        warnings = [line for line in said if "warning" in line]
        assert len(warnings) == 1 and "ComfyUI" in warnings[0] and "AUTOMATIC1111" in warnings[0], said
        with safe_open(str(out), framework="pt") as f:
            assert "ComfyUI" in f.metadata()["sdlora.readers"]
    said = []
    run_export(native, "diffusers", tmp_path / "d.safetensors", report=said.append)  # diffusers reads it exactly
    assert not [line for line in said if "warning" in line]
    # a DoRA run leaves no file for those tools, and its end message says why
    line = export_for_uis(native, tmp_path / UI_FILE)
    assert not (tmp_path / UI_FILE).exists() and "ComfyUI" in line and "merged-single-file" in line


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_kinds_get_no_warning(kind, tmp_path):
    from sdlora.adapter.io import reader_notes
    from sdlora.adapter.lycoris import LoHaDelta, LoKrDelta
    from sdlora.adapter.weights import AdapterWeights

    m = LoHaDelta(*(torch.ones(s) for s in ((4, 2), (2, 6), (4, 2), (2, 6)))) if kind == "loha" else \
        LoKrDelta(w1=torch.ones(2, 2), w2=torch.ones(2, 3))
    assert reader_notes(AdapterWeights({"unet.x.to_q": m}), "kohya") == []
