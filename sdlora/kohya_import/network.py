"""kohya's network: `network_module`, `network_dim` / `network_alpha` and each `network_args` entry, as sdlora's
`lora.*` keys, LoRA+ (`optim.b_lr_ratio`) and block learning-rate weights (`optim.lr_rules`).

Which modules kohya adapts (networks/lora.py, read not copied): every Linear and 1x1 Conv2d inside the UNet's
Transformer2DModel blocks and the text encoder's CLIPAttention / CLIPMLP, at network_dim; with `conv_dim` also every
Conv2d (and Linear) inside ResnetBlock2D / Downsample2D / Upsample2D, the 3x3 ones at conv_dim. `finish` writes that
set as sdlora targets once every option has been read.

Block weights (networks/lora.py get_block_index): SD 1.x/2.x has 12 down, 1 mid, 12 up weights; down weight k is
`down_blocks.i.{attentions,resnets}.j` with k = 1 + 3i + j (j = 2: the block's downsampler; k = 0 is conv_in, never
adapted); up weight k is `up_blocks.i.{attentions,resnets}.j` with k = 3i + j (j = 2 also the upsampler). SDXL has 9
down / 3 mid / 9 up with the same formulas (its input_blocks_N is N = 1 + 3i + j) and mid = resnets.0, attentions.0,
resnets.1.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from sdlora.kohya_import.rules import (MAPPED, OFF, Builder, Invalid, Unmappable, as_bool, as_float, as_int, as_list,
                                       key_values)

UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TRANSFORMER_1X1 = ["proj_in", "proj_out"]  # 1x1 Conv2d in SD 1.x, Linear in SD 2.x / SDXL: sdlora's conv targets take both
RESNET_CONV = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
MODULES = {"networks.lora": "lora", "networks.lora_fa": "lora", "networks.loha": "loha", "networks.lokr": "lokr",
           "lycoris.kohya": None}  # None: LyCORIS' `algo` network arg decides
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}


def module(v, b: Builder):
    name = str(v).strip()
    if name not in MODULES:
        raise Unmappable(f"{name!r}: sdlora trains networks.lora, networks.lora_fa, networks.loha, networks.lokr and "
                         "lycoris.kohya with algo lora/locon/loha/lokr")
    b.state["module"] = name
    if name == "networks.lora_fa":
        b.set("lora.train_a", False)
        return MAPPED, "lora.type lora, lora.train_a false (LoRA-FA)"
    return MAPPED, "lora.type" + (" (from network_args algo)" if MODULES[name] is None else "")


def dim(v, b: Builder):
    b.state["dim"] = as_int(v)
    if b.state["dim"] < 1:
        raise Invalid(f"{v!r}: a rank of at least 1")
    return MAPPED, b.set("lora.rank", b.state["dim"])


def alpha(v, b: Builder):
    b.state["alpha"] = as_float(v)
    return MAPPED, "lora.alpha" + (" = network_dim (kohya reads alpha 0 as alpha = dim)" if b.state["alpha"] == 0 else "")


def text_encoder_only(v, b: Builder):
    if not as_bool(v):
        return OFF, "false"
    b.state["text_encoder_only"] = True
    return MAPPED, "lora.unet_targets [] and lora.conv false (only the text encoder trains)"


def _number_to_state(key: str, read):
    def convert(value, b: Builder):
        b.state[key] = read(value)
        return MAPPED, {"conv_dim": "lora.conv_rank (3x3 convs; kohya's 1x1 ones take network_dim, sdlora's conv_rank)",
                        "conv_alpha": "lora.conv_alpha", "factor": "lora.lokr_factor"}.get(key, key)
    return convert


def _algo(value, b: Builder):
    algo = str(value).strip().strip('"').lower()
    if algo not in LYCORIS_ALGOS:
        raise Unmappable(f"algo={algo}: sdlora trains LyCORIS lora/locon, loha and lokr")
    b.state["algo"] = algo
    return MAPPED, "lora.type " + LYCORIS_ALGOS[algo]


def _preset(value, b: Builder):
    preset = str(value).strip().lower()
    if preset in ("full", "attn-mlp", "attn-only"):
        b.state["preset"] = preset
        return MAPPED, "lora.unet_targets / lora.conv_targets (LyCORIS preset " + preset + ")"
    raise Unmappable(f"preset={preset}: sdlora maps LyCORIS presets full, attn-mlp and attn-only")


def _dora(value, b: Builder):
    if not as_bool(value):
        return OFF, "false"
    b.state["dora"] = True
    return MAPPED, "lora.type dora"


def _state(key: str, read=as_float):
    def convert(value, b: Builder):
        b.state[key] = read(value)
        return MAPPED, "optim.b_lr_ratio (LoRA+)" if key.startswith("loraplus") else "optim.lr_rules (block weights)"
    return convert


def _unsupported(why: str, off=("0", "false", "0.0", "none", "")):
    def convert(value, b: Builder):
        if str(value).strip().lower() in off:
            return OFF, "kohya's default"
        raise Unmappable(why)
    return convert


NETWORK_ARGS = {
    "conv_dim": _number_to_state("conv_dim", as_int), "conv_alpha": _number_to_state("conv_alpha", as_float),
    "algo": _algo, "preset": _preset, "dora_wd": _dora, "factor": _number_to_state("factor", as_int),
    "loraplus_lr_ratio": _state("loraplus_lr_ratio"), "loraplus_unet_lr_ratio": _state("loraplus_unet_lr_ratio"),
    "loraplus_text_encoder_lr_ratio": _state("loraplus_text_encoder_lr_ratio"),
    "down_lr_weight": _state("down_lr_weight", str), "mid_lr_weight": _state("mid_lr_weight", str),
    "up_lr_weight": _state("up_lr_weight", str), "block_lr_zero_threshold": _state("block_lr_zero_threshold"),
    "block_dims": _unsupported("sdlora has one rank for linear modules (lora.rank), one for convs (lora.conv_rank)"),
    "block_alphas": _unsupported("sdlora has one alpha for linear modules and one for convs"),
    "conv_block_dims": _unsupported("sdlora has one conv rank (lora.conv_rank)"),
    "conv_block_alphas": _unsupported("sdlora has one conv alpha (lora.conv_alpha)"),
    "rank_dropout": _unsupported("sdlora has no rank dropout"),
    "module_dropout": _unsupported("sdlora has no module dropout"),
    "dropout": _unsupported("sdlora has no LoRA dropout"),
    "rank_dropout_scale": _unsupported("sdlora has no rank dropout"),
    "use_tucker": _unsupported("sdlora's LyCORIS kinds have no Tucker decomposition"),
    "use_cp": _unsupported("sdlora's LyCORIS kinds have no CP/Tucker decomposition"),
    "use_scalar": _unsupported("sdlora has no LyCORIS trained scalar"),
    "decompose_both": _unsupported("sdlora's LoKr decomposes w2 only"),
    "bypass_mode": _unsupported("sdlora always adds the adapter to the base output"),
    "train_norm": _unsupported("sdlora does not train normalisation layers"),
    "constraint": _unsupported("OFT constraint: sdlora has no OFT"), "rescaled": _unsupported("OFT: sdlora has no OFT"),
    "block_size": _unsupported("DyLoRA: sdlora has no DyLoRA"), "train_on_input": _unsupported("IA3: sdlora has no IA3"),
    "unit": _unsupported("DyLoRA: sdlora has no DyLoRA"),
    "exclude_patterns": _unsupported("sdlora picks modules by lora.*_targets (edit them by hand)", off=("", "[]")),
    "include_patterns": _unsupported("sdlora picks modules by lora.*_targets (edit them by hand)", off=("", "[]")),
    "verbose": lambda value, b: (OFF, "log output only"),
}


def args(v, b: Builder):
    """The whole `network_args` list: each entry becomes its own row (convert.py expands it with `entries`)."""
    return MAPPED, "see the network_args.* rows"


def entries(v) -> list[tuple[str, str]]:
    return key_values(as_list(v), "network_args")


# --------------------------------------------------------------------------------------------- the end
def finish(b: Builder) -> None:
    """Write lora.* targets, LoRA+ and block rules from what the options left in `b.state`."""
    s = b.state
    module_name = s.get("module", "networks.lora")
    kind = MODULES.get(module_name) or LYCORIS_ALGOS.get(s.get("algo", "lora"), "lora")
    if s.get("dora"):
        kind = "dora"
    b.set("lora.type", kind)
    rank = s.get("dim", 4)
    b.set("lora.rank", rank)
    b.set("lora.alpha", s.get("alpha", 1.0) or float(rank))
    conv_dim = s.get("conv_dim")
    if kind == "lokr" and "factor" in s:
        b.set("lora.lokr_factor", s["factor"])
    preset = s.get("preset")
    with_conv = bool(conv_dim) and preset != "attn-mlp" and preset != "attn-only"
    unet = list(UNET_LINEAR[:4] if preset == "attn-only" else UNET_LINEAR)
    conv = [] if preset == "attn-only" else list(TRANSFORMER_1X1)
    if with_conv:
        unet.append("time_emb_proj")
        conv += RESNET_CONV
        b.set("lora.conv_rank", conv_dim)
        # kohya: conv_alpha defaults to 1 when conv_dim is set (0 reads as alpha = dim)
        b.set("lora.conv_alpha", s.get("conv_alpha", 1.0) or float(conv_dim))
    else:
        b.set("lora.conv_rank", rank)
        b.set("lora.conv_alpha", b.get("lora.alpha"))
    if s.get("text_encoder_only"):
        unet, conv = [], []
    b.set("lora.unet_targets", unet)
    b.set("lora.conv", bool(conv))
    b.set("lora.conv_targets", conv or list(TRANSFORMER_1X1))
    b.set("lora.text_encoder_targets", list(TEXT_ENCODER))
    _loraplus(b)
    rules = block_rules(s.get("down_lr_weight"), s.get("mid_lr_weight"), s.get("up_lr_weight"),
                        s.get("block_lr_zero_threshold", 0.0), sdxl=bool(s.get("sdxl")), conv=with_conv)
    if rules:
        b.set("optim.lr_rules", rules)


def _loraplus(b: Builder) -> None:
    s = b.state
    base = s.get("loraplus_lr_ratio")
    unet = s.get("loraplus_unet_lr_ratio", base)
    te = s.get("loraplus_text_encoder_lr_ratio", base)
    te_trained = b.get("text_encoder.train", True)
    if unet is None and te is None:
        return
    if te_trained and not s.get("text_encoder_only") and (unet or 1.0) != (te or 1.0):
        b.notes.append(f"LoRA+: kohya gives the UNet's B ratio {unet or 1.0:g} and the text encoder's {te or 1.0:g}; "
                       f"sdlora has one optim.b_lr_ratio for both: {unet or te:g} used")
    b.set("optim.b_lr_ratio", unet or te)


# --------------------------------------------------------------------------------------------- block weights
def _named_weights(spec: str, n: int) -> list[float]:
    """kohya's named curves (cosine, sine, linear, reverse_linear, zeros), with an optional `+base` offset."""
    name, _, base = spec.partition("+")
    offset = float(base) if base else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    curves = {"sine": [math.sin(math.pi * r / 2) for r in ramp], "linear": ramp, "zeros": [0.0] * n}
    curves["cosine"] = curves["sine"][::-1]
    curves["reverse_linear"] = ramp[::-1]
    if name not in curves:
        raise Unmappable(f"block weight {spec!r}: kohya's names are cosine, sine, linear, reverse_linear, zeros")
    return [w + offset for w in curves[name]]


def _weights(spec, n: int) -> list[float] | None:
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip()
    if "," not in text and not text.replace(".", "", 1).lstrip("-").isdigit():
        values = _named_weights(text, n)
    else:
        try:
            values = [float(x) if x.strip() else 0.0 for x in text.split(",")]
        except ValueError:
            raise Invalid(f"block weights {text!r}: comma-separated numbers or a kohya curve name") from None
    return (values + [1.0] * n)[:n]  # kohya fills a short list with 1 and cuts a long one


def _down_pattern(k: int, sdxl: bool, conv: bool) -> str | None:
    i, j = divmod(k - 1, 3)
    if k == 0:
        return None  # conv_in: never adapted
    if j == 2:
        return rf"down_blocks\.{i}\.downsamplers\." if conv else None
    has_attention = i > 0 if sdxl else i < 3
    if not conv and not has_attention:
        return None
    return rf"down_blocks\.{i}\.{'(?:attentions|resnets)' if conv else 'attentions'}\.{j}\."


def _up_pattern(k: int, sdxl: bool, conv: bool) -> str | None:
    i, j = divmod(k, 3)
    has_attention = i < 2 if sdxl else i > 0
    if not conv and not has_attention:
        return None
    kinds = "(?:attentions|resnets)" if conv else "attentions"
    if j == 2 and conv:
        return rf"up_blocks\.{i}\.(?:{kinds}\.2|upsamplers)\."
    return rf"up_blocks\.{i}\.{kinds}\.{j}\."


def _mid_patterns(sdxl: bool, conv: bool) -> list[str | None]:
    if not sdxl:
        return [r"mid_block\." if conv else r"mid_block\.attentions\."]
    return [r"mid_block\.resnets\.0\." if conv else None, r"mid_block\.attentions\.0\.",
            r"mid_block\.resnets\.1\." if conv else None]


def block_rules(down, mid, up, threshold: float = 0.0, *, sdxl: bool = False, conv: bool = False) -> list[dict]:
    """kohya's down/mid/up learning-rate weights as `optim.lr_rules` (regular expressions over sdlora's canonical
    module names, one rule per distinct weight other than 1; a weight at or below `threshold` is 0, as kohya)."""
    n, n_mid = (9, 3) if sdxl else (12, 1)
    down_w, mid_w, up_w = _weights(down, n), _weights(mid, n_mid), _weights(up, n)
    if down_w is None and mid_w is None and up_w is None:
        return []
    pairs = []
    for k, w in enumerate(down_w or []):
        pairs.append((w, _down_pattern(k, sdxl, conv)))
    for pattern, w in zip(_mid_patterns(sdxl, conv), mid_w or []):
        pairs.append((w, pattern))
    for k, w in enumerate(up_w or []):
        pairs.append((w, _up_pattern(k, sdxl, conv)))
    groups: "OrderedDict[float, list[str]]" = OrderedDict()
    for w, pattern in pairs:
        w = w if w > threshold else 0.0
        if pattern is not None and w != 1.0:
            groups.setdefault(w, []).append(pattern)
    return [{"match": r"^unet\.(?:" + "|".join(patterns) + ")", "lr_scale": w} for w, patterns in groups.items()]
