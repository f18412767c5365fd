"""Check sdlora's adapter files with ComfyUI's own LoRA loader (not run by CI: it needs a ComfyUI checkout).

usage: python benchmarks/comfyui_check.py /path/to/ComfyUI [--families sd15 sdxl] [--kinds lora dora loha lokr]
       [--layouts kohya diffusers] [--no-conv]

For each model family (SD 1.5's and SDXL base's architecture, from the configs bundled in sdlora/resources/configs),
adapter kind and file layout: sdlora's own layer classes are built on every module its default targets pick (and its
conv targets), on random base weights of the real shapes, their parameters moved off their initial values, and
exported as a run exports them (`training.export.adapter_from_layers`, then `save_native`, which is what a run
writes as adapter.safetensors, or `io.save_adapter(..., "kohya")`). ComfyUI then does what its LoraLoader node does
(`comfy.sd.load_lora_for_models`): its key maps for the real model (`comfy.lora.model_lora_keys_unet` on the model
ComfyUI builds for the architecture, on the meta device; `model_lora_keys_clip` on its CLIP model),
`comfy.lora_convert.convert_lora`, `comfy.lora.load_lora`; and for every weight it would patch,
`comfy.lora.calculate_weight` (which calls comfy/weight_adapter/*) on the base weight. The patched weight is compared
with sdlora's W0 + ΔW of the module ComfyUI's own UNet key table (`comfy.utils.unet_to_diffusers`) says the key is.

Columns: keys ComfyUI did not load ("lora key not loaded"), modules it patched, and the patched weights' error: the
largest |W_comfy - (W0 + ΔW)| over all modules relative to the largest |ΔW|, and the median over modules of
max|W_comfy - (W0 + ΔW)| / max|ΔW| of that module. Both sides compute in float64 from the file's tensors, so an exact
reading shows ~1e-15 (1e-8 where the kohya writer rescaled a module's fp32 factors for its one alpha); 1 is an update
lost.
Memory: one module's weights at a time (SDXL's largest are 1280 x 5120).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import statistics
import sys
import tempfile
import types
import zlib
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
RANK, ALPHA = 4, 2.0


def meta_models(version: str) -> dict[str, nn.Module]:
    """The diffusers UNet and the transformers text encoders of a bundled config, on the meta device (names and
    shapes only)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    root = ROOT / "sdlora" / "resources" / "configs" / version
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    models = {}
    with init_empty_weights():
        models["unet"] = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        for name in ("text_encoder", "text_encoder_2"):
            if (root / name / "config.json").is_file():
                cls = getattr(transformers, (index.get(name) or [None, "CLIPTextModel"])[1])
                config = transformers.CLIPTextConfig.from_pretrained(root / name)
                models[name] = cls(config)
    return models


def base_weight(name: str, shape) -> torch.Tensor:
    """The random base weight of module `name` (canonical), the same on every call."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=g) * 0.05


def make_adapter(models: dict[str, nn.Module], kind: str, conv: bool):
    """Every targeted module as sdlora's layer of `kind` on its base weight, parameters moved; exported records."""
    from sdlora.adapter.names import canonical_name
    from sdlora.adapter.weights import AdapterWeights
    from sdlora.config import LoraConfig
    from sdlora.lora.inject import layer_class, plan_denoiser, plan_text_encoder
    from sdlora.training.export import adapter_from_layers

    cfg = LoraConfig(type=kind, rank=RANK, alpha=ALPHA, conv=conv)
    modules = {}
    for component, model in models.items():
        plan = plan_denoiser(model, cfg) if component == "unet" else plan_text_encoder(model, cfg)
        for path, spec in plan.items():
            meta = model.get_submodule(path)
            name = canonical_name(component, path)
            if isinstance(meta, nn.Conv2d):
                base = nn.Conv2d(meta.in_channels, meta.out_channels, meta.kernel_size, meta.stride, meta.padding,
                                 bias=False, device="cpu")
            else:
                base = nn.Linear(meta.in_features, meta.out_features, bias=False, device="cpu")
            with torch.no_grad():
                base.weight.copy_(base_weight(name, base.weight.shape))
            layer = layer_class(kind, base)(base, spec.rank, spec.alpha, init="zero",
                                            generator=torch.Generator().manual_seed(1))
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
            with torch.no_grad():
                for p in layer.parameters_by_name().values():
                    if p.dim():
                        p.add_(0.3 * p.detach().abs().mean().clamp(min=0.02) * torch.randn(p.shape, generator=g))
                if hasattr(layer, "lora_B"):  # LoRA, DoRA: an update V - W0 of 20% of W0's size, as a run makes
                    a = layer.lora_A.detach()
                    size = 0.2 * float(base.weight.std()) / (layer.scale_value() * a.shape[0] ** 0.5 * float(a.pow(2).mean().sqrt()))
                    layer.lora_B.copy_(size * torch.randn(layer.lora_B.shape, generator=g))
            modules.update(adapter_from_layers({name: layer}).modules)
    return AdapterWeights(modules)


class Comfy:
    """ComfyUI's model for an architecture (meta device) and its LoRA key maps, imported from a checkout."""

    def __init__(self, checkout: Path):
        import diffusers.loaders.peft  # noqa: F401  (transformers / diffusers first: the stubs below are ComfyUI's only)
        import transformers  # noqa: F401

        for n in ("torchvision", "torchvision.transforms", "torchaudio"):  # imported by models this check never builds
            if n not in sys.modules:
                m = _Stub(n)
                m.__spec__ = importlib.machinery.ModuleSpec(n, None)
                sys.modules[n] = m
        sys.path.insert(0, str(checkout))
        argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.lora
        import comfy.lora_convert
        import comfy.model_detection
        import comfy.utils

        sys.argv = argv
        self.lora, self.convert, self.detection, self.utils = comfy.lora, comfy.lora_convert, comfy.model_detection, comfy.utils

    def model(self, unet: nn.Module):
        unet_config = self.detection.unet_config_from_diffusers_unet(unet.state_dict())
        model_config = self.detection.model_config_from_unet_config(unet_config)
        model = model_config.get_model({}, device="meta")
        target = model_config.clip_target()
        clip = target.clip(device="meta", **getattr(target, "params", {}))
        key_map = self.lora.model_lora_keys_unet(model, {})
        key_map = self.lora.model_lora_keys_clip(clip, key_map)
        # ComfyUI's UNet key -> the diffusers module it is (ComfyUI's own table), and its CLIP keys (Hugging Face names)
        ldm = {f"diffusion_model.{v}": k.removesuffix(".weight")
               for k, v in self.utils.unet_to_diffusers(unet_config).items()}
        return type(model_config).__name__, key_map, ldm

    def sd3_model(self, weights: dict[str, torch.Tensor]):
        """ComfyUI's SD3 model for original-layout transformer weights (its own detection from the keys and shapes,
        on the meta device) and its CLIP (CLIP-L, CLIP-G, T5-XXL, as the text-encoder keys present say); their LoRA
        key maps."""
        sd = {k: v for k, v in weights.items() if k.startswith("diffusion_model.")}
        unet_config = self.detection.detect_unet_config(sd, "diffusion_model.")
        # ComfyUI tells the depth from the width (64 per joint block, as in every released SD3); the tiny models are
        # narrower, so the depth is the joint blocks the keys hold (module names, all the key maps use, follow it)
        unet_config["depth"] = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("diffusion_model.joint_blocks."))
        model_config = self.detection.model_config_from_unet_config(unet_config, sd)
        model = model_config.get_model(sd, "diffusion_model.", device="meta")
        present = {f"text_encoders.{k}": v for k, v in weights.items() if not k.startswith("diffusion_model.")}
        target = model_config.clip_target(present)
        clip = target.clip(device="meta", **getattr(target, "params", {}))
        key_map = self.lora.model_lora_keys_unet(model, {})
        key_map = self.lora.model_lora_keys_clip(clip, key_map)
        return type(model_config).__name__, key_map

    def load(self, path: Path, key_map: dict):
        from safetensors.torch import load_file

        lora = self.convert.convert_lora(load_file(str(path)))
        missed = []
        handler = _Collect(missed)
        logging.getLogger().addHandler(handler)
        try:
            patches = self.lora.load_lora(lora, key_map)
        finally:
            logging.getLogger().removeHandler(handler)
        return patches, missed, len(lora)

    def patched(self, patch, weight: torch.Tensor, key: str) -> torch.Tensor:
        """ComfyUI's patched weight, computed in float64 (its intermediate dtype is a parameter): any difference
        from sdlora's float64 W0 + ΔW is then the convention's, not rounding."""
        return self.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.double(), key,
                                          intermediate_dtype=torch.float64)


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        m = _Stub(f"{self.__name__}.{name}")
        setattr(self, name, m)
        return m

    def __call__(self, *a, **k):
        return self

    def __mro_entries__(self, bases):
        return (object,)


class _Collect(logging.Handler):
    def __init__(self, out):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded"):
            self.out.append(msg.split(": ", 1)[1])


def canonical_of(key: str, ldm: dict) -> str | None:
    """The canonical module name of a ComfyUI weight key."""
    if key in ldm:
        return "unet." + ldm[key]
    for prefix, component in (("clip_l.transformer.text_model.", "text_encoder"),
                              ("clip_g.transformer.text_model.", "text_encoder_2")):
        if key.startswith(prefix):
            return f"{component}.{key[len(prefix):].removesuffix('.weight')}"
    return None


def check(comfy: Comfy, family: str, kinds, layouts, conv: bool, report=print) -> list[list]:
    from sdlora.adapter.io import save_adapter
    from sdlora.adapter.weights import save_native

    models = meta_models(FAMILIES[family])
    if family == "sd15":  # ComfyUI's SD 1.5 CLIP is CLIP-L alone
        models.pop("text_encoder_2", None)
    arch, key_map, ldm = comfy.model(models["unet"])
    rows = []
    for kind in kinds:
        adapter = make_adapter(models, kind, conv)
        for layout in layouts:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "adapter.safetensors"
                save_native(adapter, path) if layout == "diffusers" else save_adapter(adapter, path, layout)
                patches, missed, n_keys = comfy.load(path, key_map)
            errors, biggest_update, biggest_error, wrong = [], 0.0, 0.0, 0
            for key, patch in patches.items():
                name = canonical_of(key, ldm)
                m = adapter.modules.get(name)
                if m is None:
                    wrong += 1  # patched a module the adapter does not hold
                    continue
                w0 = base_weight(name, m.weight_shape)
                want = w0.double() + m.delta_weight(w0).double()
                got = comfy.patched(patch, w0.clone(), key).double()
                update = float((want - w0.double()).abs().max())
                error = float((got - want).abs().max())
                biggest_update, biggest_error = max(biggest_update, update), max(biggest_error, error)
                errors.append(error / update if update else error)
            row = [family, arch, kind, layout, f"{len(missed)} / {n_keys}", f"{len(patches) - wrong} / {len(adapter.modules)}",
                   f"{biggest_error / biggest_update:.1e}" if biggest_update else "-",
                   f"{statistics.median(errors):.1e}" if errors else "-"]
            if wrong:
                row[5] += f" ({wrong} wrong)"
            rows.append(row)
            report(" | ".join(row) + (f"   e.g. not loaded: {missed[0]}" if missed else ""), flush=True)
    return rows


# ------------------------------------------------------------------------------------------- SD3 / SD3.5
SD3_VARIANTS = ("sd3", "sd35m", "sd35l")  # make_tiny_sd3's: SD3 Medium, SD3.5 Medium (dual attention), SD3.5 Large
# kinds and their denoiser targets: LoKr on q/k/v is refused by the kohya writer (a stack of Kronecker products is
# none), so it is checked on the modules kohya names one to one, an adaLN with swapped halves among them.
SD3_TARGETS = {"lora": ["preset:kohya"], "dora": ["preset:kohya"], "loha": ["preset:kohya"],
               "lokr": ["to_out.0", "to_add_out", "ff.net.0.proj", "re:norm1_context\\.linear$"]}
COMFY_CLIP = (("text_encoder", "clip_l.transformer."), ("text_encoder_2", "clip_g.transformer."),
              ("text_encoder_3", "t5xxl.transformer."))


def sd3_run(variant: str, kind: str, folder: Path):
    """A tiny SD3-family model trained 3 steps at a high rate with all three text encoders (T5 included, for
    `lora_te3_`), every Linear of each joint block (`preset:kohya`); returns (model folder, diffusers adapter file)."""
    from sdlora.config import validate
    from sdlora.model.tiny_sd3 import make_tiny_sd3
    from sdlora.training.loop import train

    model = make_tiny_sd3(folder / "model", seed=0, variant=variant)
    data = folder / "data"
    data.mkdir()
    from PIL import Image

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} square")
    cfg = validate({"model": {"path": str(model)}, "data": {"path": str(data), "resolution": 64},
                    "output": {"dir": str(folder / "run")}, "train": {"max_steps": 3, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 2e-2}, "lora": {"type": kind, "rank": RANK, "alpha": ALPHA,
                                                    "unet_targets": SD3_TARGETS[kind]},
                    "text_encoder": {"train": True, "t5_max_length": 8,
                                     "train_parts": ["text_encoder", "text_encoder_2", "text_encoder_3"]},
                    "log": {"tracker": "none"}})
    return model, train(cfg, log=lambda *a, **k: None).adapter_path


def sd3_weights(model: Path, adapter=None) -> dict[str, torch.Tensor]:
    """ComfyUI's weight keys -> the model's weights (the adapter merged by sdlora when given): the transformer in
    the original MMDiT layout under `diffusion_model.`, the text encoders under ComfyUI's CLIP prefixes."""
    from sdlora.adapter.algebra import merge_adapter
    from sdlora.model.loading import load_components
    from sdlora.model.mmdit_keys import to_original

    comps = load_components(str(model))
    if adapter is not None:
        merge_adapter(adapter, comps.adaptable())
    out = {f"diffusion_model.{k}": v for k, v in to_original(comps.denoiser.state_dict(), comps.denoiser.config).items()}
    for part, prefix in COMFY_CLIP:
        out.update({prefix + k: v for k, v in comps.text_encoders[part].state_dict().items()})
    return out


def check_sd3(comfy: Comfy, variant: str, kinds, report=print) -> list[list]:
    """sdlora's SD3 kohya file loaded by ComfyUI's LoRA loader on the tiny model's original-layout weights: every
    patched weight against sdlora's merge of the run's diffusers-layout adapter (float64 both sides)."""
    from sdlora.adapter.io import load_adapter, save_adapter
    from sdlora.errors import UserError

    rows = []
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            model, adapter_path = sd3_run(variant, kind, Path(tmp))
            adapter = load_adapter(adapter_path)
            path = Path(tmp) / "adapter_kohya.safetensors"
            try:
                save_adapter(adapter, path, "kohya")
            except UserError as e:
                rows.append([variant, "SD3", kind, "kohya", "refused", "-", "-", "-"])
                report(f"{variant} {kind}: refused: {e}", flush=True)
                continue
            base, merged = sd3_weights(model), sd3_weights(model, adapter)
            arch, key_map = comfy.sd3_model(base)
            patches, missed, n_keys = comfy.load(path, key_map)
            stems = {k.split(".")[0] for k in load_file_keys(path)}
        errors, biggest_update, biggest_error = [], 0.0, 0.0
        for key, patch in patches.items():
            w0, want = base[key], merged[key].double()
            got = comfy.patched(patch, w0.clone(), key).double()
            update, error = float((want - w0.double()).abs().max()), float((got - want).abs().max())
            biggest_update, biggest_error = max(biggest_update, update), max(biggest_error, error)
            errors.append(error / update if update else error)
        row = [variant, arch, kind, "kohya", f"{len(missed)} / {n_keys}", f"{len(patches)} / {len(stems)}",
               f"{biggest_error / biggest_update:.1e}" if biggest_update else "-",
               f"{statistics.median(errors):.1e}" if errors else "-"]
        rows.append(row)
        report(" | ".join(row) + (f"   e.g. not loaded: {missed[0]}" if missed else ""), flush=True)
    return rows


def load_file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("comfyui", type=Path, help="a ComfyUI checkout (the folder holding comfy/)")
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--kinds", nargs="+", default=["lora", "loha", "lokr", "dora"])
    p.add_argument("--layouts", nargs="+", default=["kohya", "diffusers"])
    p.add_argument("--no-conv", action="store_true", help="attention modules only (no resnet convolutions)")
    p.add_argument("--sd3", nargs="*", default=[], choices=SD3_VARIANTS,
                   help="also tiny SD3-family models trained briefly (kohya layout): e.g. --sd3 sd3 sd35m sd35l")
    args = p.parse_args(argv)
    comfy = Comfy(args.comfyui.resolve())
    root = logging.getLogger()  # ComfyUI warns per key it does not load: collected (_Collect), not printed
    root.setLevel(logging.WARNING)
    for h in root.handlers:
        h.setLevel(logging.ERROR)
    header = ["family", "ComfyUI model", "kind", "layout", "keys not loaded", "modules patched", "max error",
              "median module error"]
    print(" | ".join(header), flush=True)
    rows = []
    for family in args.families:
        rows += check(comfy, family, args.kinds, args.layouts, not args.no_conv)
    for variant in args.sd3:
        rows += check_sd3(comfy, variant, args.kinds)
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
