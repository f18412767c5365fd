"""`sdlora inspect`: per-module numbers against float64 dense references, intruder dimensions, layouts,
text-embedding drift, intruder mitigation, and the command line."""

import json
import math
import sys

import pytest
import torch

from sdlora.adapter.algebra import ZERO_TOLERANCE, factored_singular_values
from sdlora.analysis import maths as analysis
from sdlora.adapter.io import load_adapter, read_safetensors
from sdlora.adapter.weights import AdapterWeights, ModuleDelta, save_native
from sdlora.util.atomic import save_safetensors
from sdlora.cli import main
from sdlora.config import validate
from sdlora.reg.embedding_norm import base_embeddings
from sdlora.adapter.kohya import kohya_name, save_kohya
from sdlora.analysis.inspect import BaseModel, group_of, inspect_adapter
from sdlora.analysis.mitigate import mitigate_adapter
from sdlora.reg.probe import DEFAULT_PROBE_PROMPTS, drift_stats
from sdlora.model.text import content_mask, encode, tokenize
from sdlora.training.loop import train
from sdlora.model.families import SD1

REL = 1e-6  # float64 maths on the same fp32 factors: differences are rounding only


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tiny_model, shapes_data, tmp_path_factory):
    """A few steps of a text-encoder + UNet + conv LoRA with learnable alpha and an offset init (rank-2r export)."""
    cfg = validate({
        "model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
        "output": {"dir": str(tmp_path_factory.mktemp("inspect") / "run")},
        "train": {"max_steps": 4, "batch_size": 2, "seed": 0}, "optim": {"lr": 2e-2, "max_grad_norm": None},
        "lora": {"rank": 4, "alpha": 4, "conv": True, "learnable_alpha": True, "init": "compensated"},
        "log": {"tracker": "none"},
    })
    return train(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def base(tiny_model):
    return BaseModel(str(tiny_model))


def _random_base(out=48, inp=32, seed=0):
    """W0 = U diag(s) Vᵀ with well separated singular values; out > in leaves a 16-dim complement of W0's U."""
    g = torch.Generator().manual_seed(seed)
    q_out, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    s = torch.linspace(3.0, 0.1, inp, dtype=torch.float64)
    return q_out[:, :inp] @ torch.diag(s) @ q_in.T, q_out, q_in, s


def _intruder_delta(q_out, q_in, strength=10.0):
    """A rank-1 ΔW along a direction orthogonal to every left singular vector of W0."""
    u = q_out[:, -1]  # in the complement of W0's column space
    v = q_in[:, 5]
    return strength * u[:, None], v[None, :]


# -------------------------------------------------------------------------------- analysis (pure maths)
def test_a_new_direction_orthogonal_to_W0_is_an_intruder():
    w0, q_out, q_in, _ = _random_base()
    up, down = _intruder_delta(q_out, q_in)
    r = analysis.find_intruders(w0, up @ down, top_k=10, epsilon=0.5)
    assert r.count == 1 and r.indices == [0]  # the strongest direction of W0 + ΔW, and the only new one
    assert float(r.max_cosine[0]) < 0.5 and bool((r.max_cosine[1:] > 0.99).all())


def test_an_update_inside_W0s_top_subspace_is_not_an_intruder():
    w0, q_out, q_in, s = _random_base()
    delta = q_out[:, :3] @ torch.diag(0.5 * s[:3]) @ q_in[:, :3].T  # grows the top-3 singular values only
    r = analysis.find_intruders(w0, delta, top_k=10, epsilon=0.5)
    assert r.count == 0 and float(r.max_cosine.min()) > 1 - 1e-9


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40), (8, 3, 3, 3)])
@pytest.mark.parametrize("spectrum,route", [("spread 30", "gram"), ("spread 1e6", "svd"), ("one tiny", "gram")])
def test_left_singular_basis_gives_the_svds_cosines(shape, spectrum, route):
    """LeftSingularBasis (eigh of the smaller Gram matrix, or the SVD where that would lose accuracy) against the
    full SVD's U0, to 1e-8 on every |cos| (the class's own error budget).

    "spread 30": σ log-uniform over [1/30, 1], every u0_j defined to ~1e-13 either way. "spread 1e6": log-uniform
    over [1e-6, 1], the smallest σ_j² 1e-12 apart, which the Gram matrix's 2e-16 rounding cannot separate: the SVD.
    "one tiny": σ in [0.1, 1] and one σ = 1e-6, isolated, so the Gram route is still exact (tall: also, by the σ_max/σ_j
    factor, the SVD). Probes: random unit vectors and W0's own singular vectors (|cos| = 1)."""
    g = torch.Generator().manual_seed(len(shape) + len(spectrum))
    out, inp = shape[0], math.prod(shape[1:])
    n = min(out, inp)
    q_out, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    if spectrum == "one tiny":
        s = torch.cat([torch.linspace(1.0, 0.1, n - 1, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)])
        route = "svd" if out > inp else route
    else:
        s = torch.logspace(0, -math.log10(float(spectrum.split()[1])), n, dtype=torch.float64)
    w0 = (q_out[:, :n] * s) @ q_in[:, :n].T
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    probes = torch.cat([torch.randn(out, 6, generator=g, dtype=torch.float64), q_out[:, :3], q_out[:, n - 2:n]], dim=1)
    probes = probes / probes.norm(dim=0)
    basis = analysis.LeftSingularBasis(w0.reshape(shape))
    got = basis.max_abs_cosines(probes)
    ref = (probes.T @ u0).abs().amax(dim=1)
    assert basis.route == route
    assert torch.allclose(got, ref, rtol=0, atol=1e-8), (got - ref).abs().max()
    assert torch.allclose(got[6:], torch.ones(5, dtype=torch.float64), atol=1e-8)


def test_singular_values_and_effective_rank_match_a_dense_reference():
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(6, 5, 3, 3, generator=g), torch.randn(7, 6, 1, 1, generator=g)  # a conv adapter
    dense = up.flatten(1).double() @ down.flatten(1).double()
    ref = torch.linalg.svdvals(dense)[:6]
    got = factored_singular_values(down, up)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    p = ref / ref.sum()
    assert analysis.effective_rank(got) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-10)
    assert analysis.effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert analysis.effective_rank(torch.zeros(3)) == 0.0


def test_mitigation_with_lambda_1_keeps_the_factors_bit_for_bit():
    w0, q_out, q_in, _ = _random_base()
    up, down = _intruder_delta(q_out, q_in)
    r = analysis.mitigate_intruders(w0, down.float(), up.float(), 1.0)
    assert r.intruders_before == 1 and torch.equal(r.down, down.float()) and torch.equal(r.up, up.float())


@pytest.mark.parametrize("lam", [0.5, 0.1])
def test_mitigation_scales_the_intruder_singular_value_by_lambda(lam):
    w0, q_out, q_in, _ = _random_base()
    up, down = _intruder_delta(q_out, q_in)
    r = analysis.mitigate_intruders(w0, down, up, lam)
    assert r.intruders_before == 1 and r.down.shape == down.shape and r.up.shape == up.shape
    # Before truncation u_iᵀ W' v_i = λ σ_i exactly; the rank-r truncation moves it by at most ‖ΔW' − ΔW''‖_F.
    (sigma,), (after,) = r.singular_values_before, r.singular_values_after
    top = analysis.find_intruders(w0, up @ down)
    new_delta = up @ down - (1 - lam) * sigma * torch.outer(top.u[:, 0], top.v[:, 0])
    assert abs(after - lam * sigma) <= r.truncation_error * float(torch.linalg.vector_norm(new_delta)) + 1e-9
    assert after < sigma


def test_mitigation_with_lambda_0_removes_the_intruder():
    w0, q_out, q_in, _ = _random_base()
    up, down = _intruder_delta(q_out, q_in)
    r = analysis.mitigate_intruders(w0, down, up, 0.0)
    assert (r.intruders_before, r.intruders_after) == (1, 0)


def test_group_names_follow_the_lr_rule_groups():
    assert group_of("text_encoder.encoder.layers.2.self_attn.q_proj") == "text_encoder.layers.2"
    assert group_of("unet.down_blocks.1.attentions.0.proj_in") == "unet.down.1"
    assert group_of("unet.mid_block.attentions.0.proj_out") == "unet.mid"
    assert group_of("unet.up_blocks.3.resnets.0.conv1") == "unet.up.3"


# ---------------------------------------------------------------------------- reports on a real adapter
def _dense_reference(name, m, comps, top_k=10, eps=0.5):
    """Everything the report says about one module, recomputed densely in float64."""
    component, path = name.split(".", 1)
    model = comps.unet if component == "unet" else comps.text_encoder
    w0 = model.get_submodule(path).weight.detach().double().flatten(1)
    dw = (m.up.double().flatten(1) @ m.down.double().flatten(1))
    s = torch.linalg.svdvals(dw)[: m.rank]
    s = s[s > ZERO_TOLERANCE * m.up.double().norm() * m.down.double().norm()]  # rounding is not rank
    p = s / s.sum()
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    u = torch.linalg.svd(w0 + dw, full_matrices=False)[0][:, :top_k]
    intruders = int(((u.T @ u0).abs().max(dim=1).values < eps).sum())
    return {"dw_norm": float(dw.norm()), "relative_norm": float(dw.norm() / w0.norm()),
            "effective_rank": math.exp(float(-(p * p.log()).sum())) if len(s) else 0.0, "intruders": intruders}


def test_report_numbers_match_a_dense_reference(trained, base):
    report = inspect_adapter(trained.adapter_path, base)
    adapter = load_adapter(trained.adapter_path)
    assert [e["name"] for e in report["modules"]] == list(adapter.modules)
    assert any(e["kind"] == "conv" for e in report["modules"]) and any(e["name"].startswith("text_encoder.")
                                                                        for e in report["modules"])
    for e in report["modules"]:
        m = adapter.modules[e["name"]]
        ref = _dense_reference(e["name"], m, base.comps)
        for key in ("dw_norm", "relative_norm", "effective_rank"):
            assert e[key] == pytest.approx(ref[key], rel=REL), (e["name"], key)
        assert e["intruders"] == ref["intruders"], e["name"]
        assert e["rank"] == 8 and e["trained_rank"] == 4  # compensated init exports [s·B | -s0·B0]·[A; A0]
        layer = trained.layers[e["name"]]  # the learned alpha and scale, not the configured ones
        assert e["alpha"] == pytest.approx(float(layer.alpha.detach()), rel=1e-6)
        assert e["scale"] == pytest.approx(layer.scale_value(), rel=1e-6)
    assert any(abs(e["alpha"] - 4.0) > 1e-3 for e in report["modules"])
    total = report["groups"][-1]
    assert total["group"] == "all" and total["intruders"] == sum(e["intruders"] for e in report["modules"])
    assert total["dw_norm"] == pytest.approx(math.sqrt(sum(e["dw_norm"] ** 2 for e in report["modules"])), rel=REL)


def test_text_embedding_drift_matches_the_trained_encoder(trained, base):
    """The report merges ΔW into W0; the reference is the trained LoRA encoder itself against adapters disabled."""
    drift = inspect_adapter(trained.adapter_path, base)["text_encoder_drift"]
    te, tok = trained.components.text_encoder, trained.components.tokenizer
    ids = tokenize(tok, DEFAULT_PROBE_PROMPTS)
    with torch.no_grad():
        ref = drift_stats(encode(te.eval(), ids).float(), base_embeddings(te, ids, 1), content_mask(ids, tok.eos_token_id))
    assert drift["drift"] > 1e-4 and drift["cosine"] < 1.0  # the adapter did move the embeddings
    assert drift["drift"] == pytest.approx(ref["probe/drift"], abs=1e-5)
    assert drift["cosine"] == pytest.approx(ref["probe/cosine"], abs=1e-5)
    # and the base model's weights are restored afterwards
    assert inspect_adapter(trained.adapter_path, base)["text_encoder_drift"] == drift


def _same_numbers(a, b):
    assert [e["name"] for e in a["modules"]] == [e["name"] for e in b["modules"]]
    for x, y in zip(a["modules"], b["modules"]):
        assert x["intruders"] == y["intruders"] and x["rank"] == y["rank"], x["name"]
        for key in ("dw_norm", "relative_norm", "effective_rank"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), (x["name"], key)
    for key in ("drift", "cosine"):
        assert a["text_encoder_drift"][key] == pytest.approx(b["text_encoder_drift"][key], abs=1e-6)


def test_kohya_file_and_native_adapter_give_the_same_report(trained, base, tmp_path):
    adapter = load_adapter(trained.adapter_path)
    kohya_path = tmp_path / "kohya.safetensors"
    save_kohya(adapter, kohya_path, base_model_version="sd_v1")
    native, kohya = inspect_adapter(trained.adapter_path, base), inspect_adapter(kohya_path, base)
    assert (native["layout"], kohya["layout"]) == ("diffusers", "kohya")
    _same_numbers(native, kohya)


def test_another_trainers_kohya_file_with_alpha_not_rank_gives_the_same_report(trained, base, tmp_path):
    """Other trainers store alpha != rank and an unscaled up; the update (alpha/rank)·up·down is the same."""
    adapter = load_adapter(trained.adapter_path)
    sd = {}
    for name, m in adapter.modules.items():
        k, alpha = kohya_name(name, SD1), 1.0  # scale 1/rank, so up is stored rank times larger
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = m.down, m.up * m.rank / alpha
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "other.safetensors"
    save_safetensors(path, sd, metadata={"ss_network_module": "networks.lora"})
    _same_numbers(inspect_adapter(trained.adapter_path, base), inspect_adapter(path, base))


def test_report_without_base_has_norms_but_no_intruders(trained):
    report = inspect_adapter(trained.adapter_path)
    assert all(e["intruders"] is None and e["relative_norm"] is None and e["dw_norm"] > 0 for e in report["modules"])
    assert report["text_encoder_drift"] is None


# ----------------------------------------------------------------------------------- mitigation, files
def _kept(meta):
    """Metadata a mitigated copy must keep: all but its own record and the tensor hashes (sdlora.modules parsed:
    the same JSON may come in another key order)."""
    return {k: json.loads(v) if k == "sdlora.modules" else v for k, v in meta.items()
            if k != "sdlora.mitigate_intruders" and not k.startswith("sshs_")}


def test_mitigating_with_lambda_1_writes_the_same_adapter(trained, base, tmp_path):
    out = tmp_path / "same.safetensors"
    mitigate_adapter(trained.adapter_path, base, 1.0, out)
    (sd_in, meta_in), (sd_out, meta_out) = read_safetensors(trained.adapter_path), read_safetensors(out)
    assert sd_in.keys() == sd_out.keys() and all(torch.equal(sd_in[k], sd_out[k]) for k in sd_in)
    assert _kept(meta_out) == _kept(meta_in)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_mitigation_lowers_intruders_and_keeps_layout_and_metadata(trained, base, tmp_path, layout):
    src = trained.adapter_path
    if layout == "kohya":
        src = tmp_path / "in.safetensors"
        save_kohya(load_adapter(trained.adapter_path), src, base_model_version="sd_v1")
    out = tmp_path / "mitigated.safetensors"
    report = mitigate_adapter(src, base, 0.2, out)
    changed = [c for c in report["modules"] if c["intruders_before"]]
    assert changed, "the trained adapter should have intruders to mitigate"
    for c in changed:  # every intruder direction is weaker (a module's count may still rise: shrinking one
        # direction can let another, already misaligned one into the top k)
        assert all(a < b for a, b in zip(c["singular_values_after"], c["singular_values_before"])), c["name"]
    assert sum(c["intruders_after"] for c in report["modules"]) < sum(c["intruders_before"] for c in report["modules"])
    after = inspect_adapter(out, base)
    assert after["layout"] == layout
    assert sum(e["intruders"] for e in after["modules"]) == sum(c["intruders_after"] for c in report["modules"])
    (_, meta_in), (_, meta_out) = read_safetensors(src), read_safetensors(out)
    assert _kept(meta_out) == _kept(meta_in)
    assert json.loads(meta_out["sdlora.mitigate_intruders"])["lambda"] == 0.2
    untouched = {c["name"] for c in report["modules"] if not c["intruders_before"]}
    a, b = load_adapter(src), load_adapter(out)
    assert all(torch.equal(a.modules[n].up, b.modules[n].up) for n in untouched)


def test_mitigation_refuses_to_overwrite_the_input(trained, base):
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="input adapter"):
        mitigate_adapter(trained.adapter_path, base, 0.5, trained.adapter_path)


# -------------------------------------------------------------------------------------------- the CLI
def test_cli_json_report_parses_and_has_intruders(trained, tiny_model, capsys):
    assert main(["inspect", str(trained.adapter_path), "--base", str(tiny_model), "--json", "--top-k", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top_k"] == 5 and all(isinstance(e["intruders"], int) for e in report["modules"])
    assert {g["group"] for g in report["groups"]} >= {"text_encoder.layers.0", "unet.mid", "all"}


def test_cli_compare_table_and_plots(trained, tmp_path, capsys):
    other = tmp_path / "half.safetensors"
    a = load_adapter(trained.adapter_path)
    save_native(AdapterWeights({n: ModuleDelta(m.down, m.up / 2, scale=m.scale, alpha=m.alpha,
                                                       trained_rank=m.trained_rank)
                                for n, m in a.modules.items()}, a.metadata), other)
    out = tmp_path / "plots"
    assert main(["inspect", str(trained.adapter_path), "--compare", str(other), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "|dW| A" in text and "|dW| B" in text
    assert (out / "dw_norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "inspect.json").read_text())
    assert saved["compare"]["groups"][-1]["dw_norm"] == pytest.approx(saved["groups"][-1]["dw_norm"] / 2, rel=1e-6)


def test_cli_missing_adapter_is_exit_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.safetensors" in err


def test_cli_plots_without_matplotlib_is_a_user_error(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(["inspect", str(trained.adapter_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sdlora[plots]" in err
    assert (tmp_path / "p" / "inspect.json").is_file()  # the report itself was still written
