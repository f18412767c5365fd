"""Fisher-weighted merge and resize (issue 19): the row Fisher, its storage, `merge --method fisher`, `resize --fisher`.

Float tolerances: the maths is float64 on fp32 factors, so a product differs from its float64 reference by fp32
rounding of the factors (~1e-7 relative, any x86 CPU): REL = 1e-6 relative to ‖ΔW‖_F. Model outputs through
diffusers are compared at 1e-5 absolute, as every export test of the project (outputs are O(1)).
"""

import shutil

import pytest
import torch

from outputs import load_pipeline, max_abs_diff, pipeline_outputs
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)
from test_toolbox import _adapter_file, _outputs_with_deltas

from sdlora.adapter.fisher import METADATA_KEY, RowFisher, with_fisher
from sdlora.adapter.io import load_adapter, save_adapter
from sdlora.cli import main
from sdlora.commands.merge import merge_adapters, run_merge
from sdlora.commands.resize import resize_adapter, run_resize

TOL = 1e-5
TE_TOL = 1e-4  # see test_fisher_merged_file_loads_in_diffusers_as_the_weighted_average
REL = 1e-6


def quiet(*_a, **_k):
    pass


def _random_fisher(adapter, seed, zero_rows=None):
    """A row Fisher with values spread over 4 orders of magnitude (as measured ones are), some rows zero."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, m in adapter.modules.items():
        f = torch.exp(3 * torch.randn(m.weight_shape[0], generator=g))
        if zero_rows is not None:
            f[zero_rows] = 0.0
        mods[name] = f.float()
    return RowFisher(mods, samples=4, data="synthetic")


@pytest.fixture(scope="module")
def fisher_adapters(tiny_model, tmp_path_factory):
    """A and B (B: UNet only, with conv modules) with stored synthetic Fishers; A's zero on rows 0-2, B's on 3-5."""
    root = tmp_path_factory.mktemp("fisher")
    paths = [_adapter_file(tiny_model, root, seed=1, init="compensated"),
             _adapter_file(tiny_model, root, seed=2, conv=True, rank=3, alpha=1.5, te=False)]
    for i, (p, rows) in enumerate(zip(paths, ([0, 1, 2], [3, 4, 5]))):
        a = load_adapter(p)
        a.metadata = with_fisher(a.metadata, _random_fisher(a, 10 + i, rows))
        save_adapter(a, p, "diffusers")
    return paths


def _dense(m):
    return m.delta_weight().double().flatten(1)


def _full_rank(paths):
    """The largest sum of ranks over modules: a merge at this rank truncates nothing."""
    adapters = [load_adapter(p) for p in paths]
    return max(sum(a.modules[n].rank for a in adapters if n in a.modules) for a in adapters for n in a.modules)


def test_fisher_merge_of_a_single_adapter_at_full_rank_is_exact(fisher_adapters):
    a = load_adapter(fisher_adapters[0])
    fisher = RowFisher.from_metadata(a.metadata)
    merged, rows = merge_adapters([a], [1.0], "fisher", rank=max(m.rank for m in a.modules.values()),
                                  fishers=[fisher])
    for name, m in a.modules.items():
        ref = _dense(m)
        assert float((_dense(merged.modules[name]) - ref).norm()) <= REL * float(ref.norm()), name
    assert max(r["relative_error"] for r in rows) < REL and max(r["fisher_error"] for r in rows) < REL


def test_rows_with_zero_fisher_in_one_adapter_keep_the_others_update(fisher_adapters, tmp_path):
    """Full rank (the sum of ranks): the Fisher-weighted average is exact; where F_B = 0 a row is A's update, where
    F_A = 0 it is B's, elsewhere c_A·ΔW_A + c_B·ΔW_B with c_i = λ_i F_i / Σ λ_k F_k."""
    out = tmp_path / "m.safetensors"
    weights = [1.0, 3.0]
    merged, rows = run_merge([str(p) for p in fisher_adapters], out, weights=weights, method="fisher",
                             rank=_full_rank(fisher_adapters),
                             report=quiet)
    a, b = (load_adapter(p) for p in fisher_adapters)
    fa, fb = (RowFisher.from_metadata(x.metadata) for x in (a, b))
    written = load_adapter(out)
    assert METADATA_KEY not in written.metadata  # measured with the old updates: not carried
    shared = sorted(set(a.modules) & set(b.modules))
    assert shared
    for name in shared:
        got, da, db = _dense(written.modules[name]), _dense(a.modules[name]), _dense(b.modules[name])
        scale = float(da.norm() + db.norm())
        assert float((got[3:6] - da[3:6]).norm()) <= REL * scale, name  # F_B = 0: A's rows
        assert float((got[0:3] - db[0:3]).norm()) <= REL * scale, name  # F_A = 0: B's rows
        wa, wb = weights[0] * fa.modules[name].double(), weights[1] * fb.modules[name].double()
        ref = (wa[:, None] * da + wb[:, None] * db) / (wa + wb)[:, None]
        assert float((got[6:] - ref[6:]).norm()) <= REL * scale, name
    for name in set(a.modules) - set(b.modules):  # one adapter only: its own update
        ref = _dense(a.modules[name])
        assert float((_dense(written.modules[name]) - ref).norm()) <= REL * float(ref.norm()), name


def test_fisher_merge_below_full_rank_reports_both_errors_and_minimises_the_weighted_one(fisher_adapters, tmp_path):
    paths = [str(p) for p in fisher_adapters]
    _, rows = run_merge(paths, tmp_path / "f.safetensors", method="fisher", rank=2, report=quiet)
    written = load_adapter(tmp_path / "f.safetensors")
    a, b = (load_adapter(p) for p in fisher_adapters)
    fa, fb = (RowFisher.from_metadata(x.metadata) for x in (a, b))
    for r in rows:
        name = r["name"]
        parts = [(x, f) for x, f in ((a, fa), (b, fb)) if name in x.modules]
        f = sum(fi.modules[name].double() for _, fi in parts)
        den = f[:, None] if len(parts) > 1 else torch.ones(f.shape[0], 1, dtype=torch.float64)
        target = sum((fi.modules[name].double()[:, None] if len(parts) > 1 else 1.0) * _dense(x.modules[name])
                     for x, fi in parts) / den
        got = _dense(written.modules[name])
        w = (f + 1e-6 * f.mean()).sqrt()[:, None]
        measured_w = float((w * (target - got)).norm() / (w * target).norm())
        measured = float((target - got).norm() / target.norm())
        assert abs(measured_w - r["fisher_error"]) <= 1e-5 and abs(measured - r["relative_error"]) <= 1e-5, name
        # the plain SVD at the same rank is no better in the weighted norm (FWSVD minimises it; 1e-6: rounding)
        u, sv, vh = torch.linalg.svd(target, full_matrices=False)
        plain = (u[:, :2] * sv[:2]) @ vh[:2]
        assert measured_w <= float((w * (target - plain)).norm() / (w * target).norm()) + 1e-6, name


def test_fisher_merged_file_loads_in_diffusers_as_the_weighted_average(fisher_adapters, tiny_model, tmp_path):
    """In the kohya layout (A1111, ComfyUI); the native layout is written by the same code as every merge's."""
    layout = "kohya"
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, fisher_adapters), "--out", str(out), "--method", "fisher", "--rank", "4",
                 "--layout", layout]) == 0
    merged = load_adapter(out)
    reference = _outputs_with_deltas(tiny_model, {n: m.delta_weight().double() for n, m in merged.modules.items()})
    pipe = load_pipeline(tiny_model)
    base = pipeline_outputs(pipe)
    pipe.load_lora_weights(str(out))
    diff = max_abs_diff(reference, pipeline_outputs(pipe))
    # 1e-4: fp32 rounding of (W0 + ΔW)·x against W0·x + up·(down·x), amplified by the tiny text encoder's randomised
    # layer norms, is measured at 2.7e-5 on these adapters for the exact concat merge too; the merge's own effect on
    # the outputs is three orders larger (asserted), so a wrong row weighting cannot hide below it.
    effect = max_abs_diff(reference, base)
    assert min(effect.values()) > 100 * TE_TOL, effect
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TE_TOL, diff


def test_fisher_resize_with_uniform_fisher_equals_plain_resize(fisher_adapters):
    a = load_adapter(fisher_adapters[0])
    uniform = RowFisher({n: torch.full((m.weight_shape[0],), 0.37) for n, m in a.modules.items()})
    for rule, value in (("rank", 2), ("sv_fro", 0.8)):
        plain, plain_rows = resize_adapter(a, rule, value)
        weighted, rows = resize_adapter(a, rule, value, fisher=uniform)
        for p, w in zip(plain_rows, rows):
            assert p["rank"] == w["rank"] and abs(p["retained"] - w["retained"]) <= 1e-6, (rule, p, w)
            assert abs(w["retained_fisher"] - p["retained"]) <= 1e-6  # uniform weight: the same share
        for name in a.modules:
            ref = _dense(plain.modules[name])
            assert float((_dense(weighted.modules[name]) - ref).norm()) <= REL * float(ref.norm()), (rule, name)


def test_fisher_resize_at_full_rank_is_exact_and_keeps_more_weighted_energy_below_it(fisher_adapters, tmp_path):
    full, rows = run_resize(fisher_adapters[0], tmp_path / "r.safetensors", "rank", _full_rank(fisher_adapters[:1]),
                            fisher=True, report=quiet)
    a = load_adapter(fisher_adapters[0])
    written = load_adapter(tmp_path / "r.safetensors")
    for name, m in a.modules.items():
        assert torch.equal(written.modules[name].down, m.down) and torch.equal(written.modules[name].up, m.up)
    assert all(r["retained"] == 1.0 and r["retained_fisher"] == 1.0 for r in rows)
    plain, plain_rows = run_resize(fisher_adapters[0], tmp_path / "p.safetensors", "rank", 1, report=quiet)
    weighted, rows = run_resize(fisher_adapters[0], tmp_path / "w.safetensors", "rank", 1, fisher=True, report=quiet)
    fisher = RowFisher.from_metadata(a.metadata)
    better = 0
    for p, w in zip(plain_rows, rows):
        # Eckart-Young both ways: FWSVD's plain error is no smaller, its weighted error no larger (1e-9: rounding)
        assert w["retained"] <= p["retained"] + 1e-9, (p, w)
        name, x = p["name"], _dense(a.modules[p["name"]])
        f = fisher.modules[name].double()
        d = (f + 1e-6 * f.mean()).sqrt()[:, None]  # FWSVD's weights, with algebra.FISHER_FLOOR
        err_plain = float((d * (x - _dense(plain.modules[name]))).norm())
        err_fw = float((d * (x - _dense(weighted.modules[name]))).norm())
        assert err_fw <= err_plain * (1 + 1e-6), name
        better += err_fw < 0.99 * err_plain
    assert better >= len(rows) // 2  # with weights over 4 orders of magnitude, the weighting changes the answer


def test_stored_fisher_round_trips_through_both_layouts(fisher_adapters, tmp_path):
    a = load_adapter(fisher_adapters[0])
    fisher = _random_fisher(a, 99)  # in memory, never written: the file must give back these float32 values
    a.metadata = with_fisher(a.metadata, fisher)
    for layout in ("diffusers", "kohya"):
        out = tmp_path / f"{layout}.safetensors"
        save_adapter(a, out, layout)
        back = RowFisher.from_metadata(load_adapter(out).metadata)
        assert set(back.modules) == set(fisher.modules) and back.samples == 4 and back.data == "synthetic"
        for name, f in fisher.modules.items():
            assert torch.equal(back.modules[name], f), (layout, name)  # float32 bytes: bit for bit


def test_fisher_inputs_are_refused_in_one_line_exit_2(fisher_adapters, two_plain, tmp_path, capsys):
    a, b = map(str, fisher_adapters)
    plain = str(two_plain)
    out = str(tmp_path / "m.safetensors")
    broken = tmp_path / "broken.safetensors"
    x = load_adapter(a)
    x.metadata[METADATA_KEY] = '{"modules": {"unet.x": "%%%"}}'
    save_adapter(x, broken, "diffusers")
    short = tmp_path / "short.safetensors"
    y = load_adapter(a)
    f = RowFisher.from_metadata(y.metadata)
    name = next(iter(f.modules))
    f.modules[name] = f.modules[name][:-1]
    y.metadata = with_fisher(y.metadata, f)
    save_adapter(y, short, "diffusers")
    cases = [(["merge", a, b, "--out", out, "--method", "fisher"], "needs --rank"),
             (["merge", a, plain, "--out", out, "--method", "fisher", "--rank", "2"], "has no stored Fisher"),
             (["merge", a, b, "--out", out, "--method", "fisher", "--rank", "2", "--weights", "1", "-1"], "must be > 0"),
             (["merge", a, b, "--out", out, "--method", "svd", "--rank", "2", "--fisher-data", "x"], "--method fisher only"),
             (["merge", a, b, "--out", out, "--method", "fisher", "--rank", "2", "--fisher-data", "x"], "needs --base"),
             (["merge", a, str(broken), "--out", out, "--method", "fisher", "--rank", "2"], "is not a stored row Fisher"),
             (["merge", a, str(short), "--out", out, "--method", "fisher", "--rank", "2"], "output features"),
             (["resize", plain, "--out", out, "--rank", "1", "--fisher"], "has no stored Fisher"),
             (["resize", a, "--out", out, "--rank", "1", "--fisher-data", "x"], "with --fisher only")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)


@pytest.fixture(scope="module")
def two_plain(fisher_adapters, tmp_path_factory):
    """An adapter without a stored Fisher (another trainer's, say): A's file with the Fisher left out."""
    a = load_adapter(fisher_adapters[0])
    del a.metadata[METADATA_KEY]
    path = tmp_path_factory.mktemp("plain") / "plain.safetensors"
    save_adapter(a, path, "diffusers")
    return path


# ------------------------------------------------------------------------------------------- the estimate
@pytest.fixture(scope="module")
def fisher_run(tiny_model, shapes_data, tmp_path_factory):
    """A 3-step LoRA run (UNet and text encoder) that stores its row Fisher over 3 samples of its own data."""
    from sdlora.config import validate
    from sdlora.training.loop import train

    out = tmp_path_factory.mktemp("fisher_run")
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out / "run")}, "train": {"max_steps": 3, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-2, "max_grad_norm": None}, "lora": {"rank": 4, "alpha": 4},
                    "export": {"fisher_samples": 3}, "log": {"tracker": "none"}})
    lines = []
    return cfg, train(cfg, log=lines.append), lines


def test_train_stores_the_row_fisher_the_training_layers_give(fisher_run):
    """Reference computed another way: for LoRA, y = W0 x + s·B A x, so ∂L/∂W at W = W0 + ΔW is the gradient of each
    injected layer's frozen base weight in the training model (no merge). The estimate merges ΔW into W0 instead:
    the two differ by fp32 rounding of the forward (~1e-6 relative), squared gradients by twice that; 1e-3 relative
    per module leaves room and still catches a missing square, a wrong axis or other draws."""
    from sdlora.adapter.names import split_name
    from sdlora.model.text import tokenize
    from sdlora.training.fisher import folder_examples
    from sdlora.training.losses import diffusion_loss, diffusion_target

    cfg, result, lines = fisher_run
    adapter = load_adapter(result.adapter_path)
    fisher = RowFisher.from_metadata(adapter.metadata)
    assert fisher is not None and fisher.samples == 3
    fisher.check_covers(adapter, "the run's adapter")
    assert {split_name(n)[0] for n in fisher.modules} == {"unet", "text_encoder"}
    assert any("row Fisher of" in line for line in lines)

    comps, layers = result.components, result.layers
    comps.unet.eval(), comps.text_encoder.eval()
    examples = folder_examples(comps, cfg.data_subsets(), cfg.data)
    weights = {n: layer.base.weight for n, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    sched = comps.noise_scheduler
    ref = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    for i in range(3):
        latent, caption = examples[i % len(examples)][:2]
        latents = latent[None]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=gen)
        emb = comps.family.encode(comps.text_encoder, tokenize(comps.tokenizer, [caption]), 1)
        pred = comps.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        loss = diffusion_loss(pred, diffusion_target(sched, latents, noise, t), t, sched, cfg.loss)
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            ref[n] += g.double().pow(2).flatten(1).sum(1)
    for w in weights.values():
        w.requires_grad_(False)
    ref = {n: r / 3 for n, r in ref.items()}
    largest = max(float(r.norm()) for r in ref.values())
    checked = 0
    for n, r in ref.items():
        # A module whose gradient is analytically zero (self-attention q/k at the tiny UNet's 1x1 middle: softmax over
        # one token) holds rounding noise, ~1e-20 against the largest module's norm: compared on that scale.
        floor = 1e-9 * largest
        assert float((fisher.modules[n].double() - r).norm()) <= 1e-3 * float(r.norm()) + floor, n
        checked += float(r.norm()) > 1e3 * floor
    assert checked >= 0.8 * len(ref)  # most modules are checked at 1e-3 relative


def test_fisher_data_folder_gives_the_same_estimate_and_feeds_resize(fisher_run, tiny_model, shapes_data, tmp_path,
                                                                     capsys):
    """--fisher-data on the run's own folder, with the run's seed, loss and sample count, is the stored estimate
    (the same draws and examples: equal up to float summation order, 1e-5 relative)."""
    cfg, result, _ = fisher_run
    stored = RowFisher.from_metadata(load_adapter(result.adapter_path).metadata)
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(result.adapter_path), "--out", str(out), "--rank", "2", "--fisher", "--fisher-data",
                 str(shapes_data), "--base", str(tiny_model), "--fisher-samples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "kept Fisher-weighted" in printed and f"estimating the row Fisher of {result.adapter_path} on" in printed
    twin = tmp_path / "b" / result.adapter_path.name  # two inputs with one file name: each line says which it is
    twin.parent.mkdir()
    shutil.copy(result.adapter_path, twin)
    assert main(["merge", str(result.adapter_path), str(twin), "--out", str(tmp_path / "m.safetensors"), "--method",
                 "fisher", "--rank", "2", "--fisher-data", str(shapes_data), "--base", str(tiny_model),
                 "--fisher-samples", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "estimating the row Fisher" in line]
    assert len(lines) == 2 and len(set(lines)) == 2, lines
    assert f"of {twin} (adapter 2 of 2) on" in lines[1], lines
    from sdlora.training.fisher import fisher_from_data

    again = fisher_from_data(load_adapter(result.adapter_path), str(tiny_model), str(shapes_data), samples=3)
    # A module whose true gradient is zero (the mid block's self-attention q/k see one token at 8x8 latents) holds
    # rounding noise (~1e-20) that changes with the thread count: its floor is a millionth of the largest module's.
    floor = 1e-6 * max(float(f.double().norm()) for f in stored.modules.values())
    for n, f in stored.modules.items():
        assert float((again.modules[n].double() - f.double()).norm()) <= 1e-5 * max(float(f.double().norm()), floor), n
    # a prompts file: latents the adapted model samples itself, then the same estimate
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nsks person on a blue background\n")
    from_prompts = fisher_from_data(load_adapter(result.adapter_path), str(tiny_model), str(prompts), samples=2)
    assert set(from_prompts.modules) == set(stored.modules) and from_prompts.data == "prompts.txt"
    assert all(bool(torch.isfinite(f).all()) for f in from_prompts.modules.values())
    assert sum(float(f.sum()) for f in from_prompts.modules.values()) > 0


def test_dense_fwsvd_for_dora_merges_equals_the_factored_one():
    """The dense path (DoRA modules in a merge) and the factored path give the same rank-k update and errors
    (1e-9 relative: float64 SVDs of the same matrix; shapes small enough for the full SVD in `top_svd`)."""
    from sdlora.adapter.algebra import fisher_dense_to_rank, fisher_to_rank

    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    f = torch.exp(3 * torch.randn(30, generator=g, dtype=torch.float64))
    f[:4] = 0
    d1, u1, ew1, e1 = fisher_to_rank(down, up, f, 3)
    d2, u2, ew2, e2 = fisher_dense_to_rank(up @ down, f, 3)
    ref = (u2 @ d2).double()
    assert float((u1.double() @ d1.double() - ref).norm()) <= 1e-6 * float(ref.norm())  # d1, u1: fp32 factors
    assert abs(ew1 - ew2) <= 1e-9 and abs(e1 - e2) <= 1e-9


# ------------------------------------------------------------------------------------------------- SDXL
def test_sdxl_run_stores_the_row_fisher_of_both_encoders_with_its_micro_conditioning(tiny_sdxl, shapes_data, tmp_path):
    """The SDXL estimate against the training layers' base-weight gradients (as the SD test above), its conditioning
    built here by hand: both encoders side by side, the pooled embedding, and time_ids = (original h, w, crop top,
    left, target h, w) of the centre-cropped square images. Same 1e-3 relative tolerance and reasoning as above;
    estimated with zero (or otherwise wrong) time_ids, most modules' Fisher moves by far more. Then merge --method
    fisher and a prompts-file estimate run on SDXL adapters (the family's pipeline samples the latents)."""
    from PIL import Image

    from sdlora.adapter.names import split_name
    from sdlora.config import validate
    from sdlora.model.text import tokenize
    from sdlora.training.fisher import fisher_from_data, folder_examples
    from sdlora.training.losses import diffusion_loss, diffusion_target
    from sdlora.training.loop import train

    cfg = validate({"model": {"path": str(tiny_sdxl)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-2, "max_grad_norm": None}, "lora": {"rank": 4, "alpha": 4},
                    "export": {"fisher_samples": 2}, "log": {"tracker": "none"}})
    result = train(cfg, log=quiet)
    adapter = load_adapter(result.adapter_path)
    fisher = RowFisher.from_metadata(adapter.metadata)
    assert fisher is not None and fisher.samples == 2
    fisher.check_covers(adapter, "the run's adapter")
    assert {split_name(n)[0] for n in fisher.modules} == {"unet", "text_encoder", "text_encoder_2"}

    comps, layers = result.components, result.layers
    encoders = [m.eval() for m in comps.text_encoders.values()]
    comps.unet.eval()
    examples = folder_examples(comps, cfg.data_subsets(), cfg.data)
    height, width = Image.open(next(shapes_data.glob("*.png"))).size[::-1]
    weights = {n: layer.base.weight for n, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    sched = comps.noise_scheduler
    ref = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    for i in range(2):
        latent, caption = examples[i % len(examples)][:2]
        latents = latent[None]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=gen)
        emb = comps.family.encode(encoders, [tokenize(tok, [caption]) for tok in comps.tokenizers], 1)
        time_ids = torch.tensor([[height, width, 0, 0, 8 * latent.shape[1], 8 * latent.shape[2]]], dtype=torch.float32)
        pred = comps.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb.hidden,
                          added_cond_kwargs={"text_embeds": emb.pooled, "time_ids": time_ids}).sample
        loss = diffusion_loss(pred, diffusion_target(sched, latents, noise, t), t, sched, cfg.loss)
        # CLIP-L's last layer feeds nothing SDXL reads (the penultimate states are its output): no gradient, F = 0
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()), allow_unused=True)):
            if g is not None:
                ref[n] += g.double().pow(2).flatten(1).sum(1)
    for w in weights.values():
        w.requires_grad_(False)
    largest = max(float((r / 2).norm()) for r in ref.values())
    checked = 0
    for n, r in ref.items():
        r = r / 2
        floor = 1e-9 * largest  # analytically zero gradients hold rounding noise (see the SD test above)
        assert float((fisher.modules[n].double() - r).norm()) <= 1e-3 * float(r.norm()) + floor, n
        checked += float(r.norm()) > 1e3 * floor
    assert checked >= 0.8 * len(ref)

    # The Fisher average of an adapter with itself is that adapter (c_ij = 1/2 each); at full rank (4 + 4) FWSVD
    # truncates nothing: equal to REL of its own norm, through the kohya layout's te1/te2 names.
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(result.adapter_path), str(result.adapter_path), "--out", str(merged), "--method", "fisher",
                 "--rank", "8", "--layout", "kohya"]) == 0
    back = load_adapter(merged)
    assert set(back.modules) == set(adapter.modules)
    for n, m in adapter.modules.items():
        assert float((_dense(back.modules[n]) - _dense(m)).norm()) <= REL * float(_dense(m).norm()), n
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    from_prompts = fisher_from_data(adapter, str(tiny_sdxl), str(prompts), samples=1)
    assert set(from_prompts.modules) == set(fisher.modules)
    assert all(bool(torch.isfinite(f).all()) for f in from_prompts.modules.values())
    assert sum(float(f.sum()) for f in from_prompts.modules.values()) > 0
