"""SD3's kohya layout for every adapter kind (adapter/kohya.py `kohya_modules` with model/mmdit_keys.KOHYA_NAMES): a
fused qkv module applied by the kohya / LyCORIS / ComfyUI formula of its kind (written out here, not sdlora's) equals
q, k and v each applied; the file reads back to the same per-module updates; LoKr on q/k/v is refused in one line.
The run-level tests (a trained tiny SD3.5 Medium, its merged folder) are in tests/test_sd3_exports.py."""

import pytest
import torch

from sdlora.adapter.kohya import from_kohya_state_dict, to_kohya_state_dict
from sdlora.adapter.lycoris import LoHaDelta, LoKrDelta
from sdlora.adapter.records import DoRADelta, ModuleDelta
from sdlora.adapter.weights import AdapterWeights
from sdlora.errors import UserError

WIDTH, RANK = 32, 3
QKV = [f"transformer.transformer_blocks.0.attn.{x}" for x in ("to_q", "to_k", "to_v")]
# the last block's text-stream adaLN (2 x width: (shift, scale) halves swapped) and the final one (swapped too)
SWAPPED = {"transformer.transformer_blocks.1.norm1_context.linear": "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
           "transformer.norm_out.linear": "lora_unet_final_layer_adaLN_modulation_1"}


def record(kind: str, out: int, gen, rank: int = RANK):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind == "lora":
        return ModuleDelta(down=r(rank, WIDTH), up=r(out, rank))
    if kind == "dora":
        return DoRADelta(down=r(rank, WIDTH), up=r(out, rank), magnitude=r(out).abs() + 1)
    if kind == "loha":
        return LoHaDelta(w1a=r(out, rank), w1b=r(rank, WIDTH), w2a=r(out, rank), w2b=r(rank, WIDTH))
    return LoKrDelta(w1=r(4, 2), w2a=r(out // 4, rank), w2b=r(rank, WIDTH // 2))  # out = 4 · out/4, in = 2 · 16


def kohya_delta(sd: dict, stem: str, w0: torch.Tensor) -> torch.Tensor:
    """W - W0 of one kohya module as LyCORIS, kohya and ComfyUI compute it (comfy/weight_adapter/lora.py, loha.py,
    base.py weight_decompose with wd_on_out): alpha / rank with rank = lora_down's (hada_w1_b's) rows."""
    t = {k[len(stem) + 1:]: v.double() for k, v in sd.items() if k.startswith(stem + ".")}
    if "lora_down.weight" in t:
        delta = float(t["alpha"]) / t["lora_down.weight"].shape[0] * t["lora_up.weight"] @ t["lora_down.weight"]
        if "dora_scale" not in t:
            return delta
        v = w0 + delta
        return t["dora_scale"] * v / v.norm(dim=1, keepdim=True) - w0
    scale = float(t["alpha"]) / t["hada_w1_b"].shape[0]
    return scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


@pytest.mark.parametrize("kind", ["lora", "dora", "loha"])
def test_fused_qkv_and_swapped_adaln_apply_as_the_per_module_updates(kind):
    gen = torch.Generator().manual_seed(0)
    modules = {name: record(kind, WIDTH, gen, rank=RANK + i) for i, name in enumerate(QKV)}  # ranks 3, 4, 5
    modules |= {name: record(kind, 2 * WIDTH, gen) for name in SWAPPED}
    adapter = AdapterWeights(modules, {"ss_base_model_version": "5-medium"})
    base = {name: torch.randn(m.weight_shape, generator=gen, dtype=torch.float64) for name, m in modules.items()}
    sd = to_kohya_state_dict(adapter)
    stem = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {float(RANK)}  # one alpha: ss_network_dim
    # the fused module on the stacked base weight = each part's W0 + ΔW stacked (1e-6 of the update: `scaled` rescales in float32)
    w0 = torch.cat([base[n] for n in QKV])
    want = torch.cat([modules[n].delta_weight(base[n]).double() for n in QKV])
    got = kohya_delta(sd, stem, w0)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    for name, kohya_stem in SWAPPED.items():  # the original's rows are (shift, scale): diffusers' halves swapped
        first, second = base[name].chunk(2)
        w0 = torch.cat([second, first])
        want = modules[name].delta_weight(base[name]).double().chunk(2)
        got = kohya_delta(sd, kohya_stem, w0)
        assert torch.allclose(got, torch.cat([want[1], want[0]]), rtol=0, atol=1e-6 * float(got.abs().max()))
    back = from_kohya_state_dict(sd, {})  # unlabelled: the names say SD3
    assert set(back.modules) == set(modules)
    for name, m in modules.items():
        assert type(back.modules[name]) is type(m) and back.modules[name].rank == m.rank  # each part's rank back
        want = m.delta_weight(base[name]).double()
        assert torch.allclose(back.modules[name].delta_weight(base[name]).double(), want, rtol=0,
                              atol=1e-6 * float(want.abs().max()))


def test_lokr_on_q_k_v_is_refused_in_one_line_and_swaps_its_adaln_halves():
    gen = torch.Generator().manual_seed(1)
    qkv = AdapterWeights({name: record("lokr", WIDTH, gen) for name in QKV}, {"ss_base_model_version": "5-large"})
    with pytest.raises(UserError, match=r"^LoKr modules transformer.transformer_blocks.0.attn.to_q / .*to_v "
                                        r"\(lora_unet_joint_blocks_0_x_block_attn_qkv\): .* one Kronecker product "
                                        r"only when every w2_i is the same; export a merged model"):
        to_kohya_state_dict(qkv)
    final = {name: record("lokr", 2 * WIDTH, gen) for name in SWAPPED}
    sd = to_kohya_state_dict(AdapterWeights(final, {"ss_base_model_version": "5-large"}))
    back = from_kohya_state_dict(sd, {"ss_base_model_version": "5-large"})
    for name, m in final.items():
        theirs = sd[f"{SWAPPED[name]}.lokr_w1"].double()  # w1's halves swapped: the Kronecker rows' halves swapped
        assert torch.equal(theirs, torch.cat(m.w1.chunk(2)[::-1]))
        assert torch.allclose(back.modules[name].delta_weight(), m.delta_weight(), rtol=0, atol=1e-12)


def test_a_dense_kohya_qkv_lora_reads_as_three_exact_parts():
    """kohya's own SD3 LoRA (split_qkv off) trains one dense rank-r LoRA on qkv: read as q, k and v of rank r each,
    alpha / rank kept, whose updates are the thirds of the file's."""
    gen = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, WIDTH, generator=gen), torch.randn(3 * WIDTH, 4, generator=gen)
    stem = "lora_unet_joint_blocks_2_context_block_attn_qkv"
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    back = from_kohya_state_dict(sd, {"ss_base_model_version": "medium", "modelspec.architecture":
                                      "stable-diffusion-3-medium/lora"})
    thirds = (0.5 * up @ down).chunk(3)
    for x, want in zip(("add_q_proj", "add_k_proj", "add_v_proj"), thirds):
        m = back.modules[f"transformer.transformer_blocks.2.attn.{x}"]
        assert m.rank == 4 and m.alpha == 2.0 and m.scale == 0.5
        assert torch.allclose(m.delta_weight(), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_a_run_whose_lokr_covers_q_k_v_writes_no_ui_file_and_says_why(tmp_path):
    """The end of a training run (training/export.export_for_uis): the kohya writer's refusal becomes the run's
    message, not a crash after training."""
    from sdlora.adapter.weights import save_native
    from sdlora.training.export import export_for_uis

    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "adapter.safetensors"
    save_native(AdapterWeights({name: record("lokr", WIDTH, gen) for name in QKV}), path)
    message = export_for_uis(path, tmp_path / "adapter_kohya.safetensors")
    assert message.startswith("no file for ComfyUI / AUTOMATIC1111: LoKr modules transformer.transformer_blocks.0")
    assert not (tmp_path / "adapter_kohya.safetensors").exists()
