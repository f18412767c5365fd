"""The key mapping between diffusers' models and the original (LDM / CompVis) single-file layout.

One table of module-prefix pairs per model drives both directions, so they cannot drift apart:
`to_ldm` maps a diffusers state dict to LDM keys, `from_ldm` inverts the same table. Tensors change
in three places only: the VAE's mid-block attention (Linear in diffusers, 1x1 conv in LDM), the
OpenCLIP text encoders (q/k/v in diffusers, one fused `in_proj` in LDM) and OpenCLIP's `text_projection`
(a matrix applied as `x @ P` in LDM, a Linear of weight `P.T` in diffusers; SDXL's bigG).

LDM prefixes: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE); text encoders by family
(`families.ModelFamily.ldm_text_encoders`): `cond_stage_model.transformer.text_model.` (SD 1.x CLIP-L),
`cond_stage_model.model.` (SD 2.x OpenCLIP-H), `conditioner.embedders.0.transformer.text_model.` (SDXL CLIP-L)
and `conditioner.embedders.1.model.` (SDXL OpenCLIP bigG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
# Empty tensors that mark a v-prediction (and zero-terminal-SNR) SDXL single file: the keys ComfyUI reads
# (its SDXL model_type(): "v_pred" in the state dict -> v-prediction, "ztsnr" -> zero terminal SNR).
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclass(frozen=True)
class Pair:
    diffusers: str  # module prefix in the diffusers model
    ldm: str  # module prefix in the single file
    inner: dict | None = None  # renames of the first part(s) of the rest of the key


def unet_pairs(config) -> list[Pair]:
    layers = config["layers_per_block"]
    pairs = [Pair("time_embedding.linear_1", "time_embed.0"), Pair("time_embedding.linear_2", "time_embed.2"),
             Pair("conv_in", "input_blocks.0.0"), Pair("conv_norm_out", "out.0"), Pair("conv_out", "out.2")]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + micro-conditioning embedding
        pairs += [Pair("add_embedding.linear_1", "label_emb.0.0"), Pair("add_embedding.linear_2", "label_emb.0.2")]
    downs = config["down_block_types"]
    for i, kind in enumerate(downs):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            pairs.append(Pair(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _UNET_RESNET))
            if "CrossAttn" in kind:
                pairs.append(Pair(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
        if i < len(downs) - 1:
            pairs.append(Pair(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op"))
    pairs += [Pair("mid_block.resnets.0", "middle_block.0", _UNET_RESNET), Pair("mid_block.attentions.0", "middle_block.1"),
              Pair("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    ups = config["up_block_types"]
    for i, kind in enumerate(ups):
        attn = "CrossAttn" in kind
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            pairs.append(Pair(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _UNET_RESNET))
            if attn:
                pairs.append(Pair(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1"))
        if i < len(ups) - 1:
            last = i * (layers + 1) + layers
            pairs.append(Pair(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if attn else 1}.conv"))
    return pairs


def vae_pairs(config) -> list[Pair]:
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [Pair("quant_conv", "quant_conv"), Pair("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [Pair(f"{part}.conv_in", f"{part}.conv_in"), Pair(f"{part}.conv_out", f"{part}.conv_out"),
                  Pair(f"{part}.conv_norm_out", f"{part}.norm_out"),
                  Pair(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                  Pair(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                  Pair(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)]
    for i in range(blocks):
        for j in range(layers):
            pairs.append(Pair(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < blocks - 1:
            pairs.append(Pair(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    for i in range(blocks):  # the decoder's LDM blocks are numbered from the bottom
        k = blocks - 1 - i
        for j in range(layers + 1):
            pairs.append(Pair(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{k}.block.{j}", _VAE_RESNET))
        if i < blocks - 1:
            pairs.append(Pair(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{k}.upsample.conv"))
    return pairs


def open_clip_pairs(num_layers: int) -> list[Pair]:
    pairs = [Pair("embeddings.token_embedding", "token_embedding"), Pair("final_layer_norm", "ln_final")]
    for i in range(num_layers):
        pairs.append(Pair(f"encoder.layers.{i}", f"transformer.resblocks.{i}", _OPEN_CLIP_LAYER))
    return pairs


def _rename(key: str, pairs: list[Pair], *, forward: bool) -> str | None:
    """Map one key through the longest matching module prefix; None when no pair covers it."""
    best = None
    for p in pairs:
        src = p.diffusers if forward else p.ldm
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, p)
    if best is None:
        return None
    src, p = best
    rest = key[len(src) + 1:]
    dst = p.ldm if forward else p.diffusers
    for a, b in (p.inner or {}).items():
        a, b = (a, b) if forward else (b, a)
        if rest == a or rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return f"{dst}.{rest}" if rest else dst


def key_map(keys, pairs: list[Pair]) -> dict[str, str]:
    """diffusers key -> LDM key (without the model prefix); a key no pair covers is an error."""
    out = {}
    for k in keys:
        ldm = _rename(k, pairs, forward=True)
        if ldm is None:
            raise KeyError(f"no LDM name for diffusers key {k}")
        out[k] = ldm
    return out


# ------------------------------------------------------------------------------------------ models
def _is_vae_attention_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(".weight") and "group_norm" not in diffusers_key


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return {UNET + ldm: sd[k] for k, ldm in key_map(sd, unet_pairs(config)).items()}


def unet_from_ldm(ldm_sd: dict[str, torch.Tensor], config, diffusers_keys) -> dict[str, torch.Tensor]:
    return {k: ldm_sd[UNET + ldm] for k, ldm in key_map(diffusers_keys, unet_pairs(config)).items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = {}
    for k, ldm in key_map(sd, vae_pairs(config)).items():
        t = sd[k]
        out[VAE + ldm] = t.reshape(*t.shape, 1, 1) if _is_vae_attention_weight(k) and t.dim() == 2 else t
    return out


def vae_from_ldm(ldm_sd: dict[str, torch.Tensor], config, diffusers_keys, prefix: str = VAE) -> dict[str, torch.Tensor]:
    out = {}
    for k, ldm in key_map(diffusers_keys, vae_pairs(config)).items():
        t = ldm_sd[prefix + ldm]
        out[k] = t.reshape(t.shape[:2]) if _is_vae_attention_weight(k) and t.dim() == 4 else t
    return out


def _flat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict without the `text_model.` level (transformers 4, CLIPTextModelWithProjection)."""
    return {k.removeprefix("text_model."): t for k, t in sd.items()}


def clip_l_to_ldm(sd: dict[str, torch.Tensor], prefix: str = CLIP_L) -> dict[str, torch.Tensor]:
    sd = _flat(sd)
    out = {prefix + k: t for k, t in sd.items()}
    n = sd["embeddings.position_embedding.weight"].shape[0] if "embeddings.position_embedding.weight" in sd else 77
    out[prefix + "embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]  # every SD 1.x / SDXL file has it
    return out


def clip_l_from_ldm(ldm_sd: dict[str, torch.Tensor], diffusers_keys, prefix: str = CLIP_L) -> dict[str, torch.Tensor]:
    # Very old SD 1.x files lack the `text_model.` level (transformers < 4.2 layout).
    if prefix == CLIP_L and not any(k.startswith(CLIP_L) for k in ldm_sd):
        prefix = "cond_stage_model.transformer."
    return {k: ldm_sd[prefix + k.removeprefix("text_model.")] for k in diffusers_keys}


def open_clip_to_ldm(sd: dict[str, torch.Tensor], num_layers: int, prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    sd = _flat(sd)
    pairs = open_clip_pairs(num_layers)
    out = {prefix + "positional_embedding": sd["embeddings.position_embedding.weight"]}
    if "text_projection.weight" in sd:  # CLIPTextModelWithProjection (SDXL's bigG): LDM applies x @ P, P = W.T
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(num_layers):
        base = f"encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{base}{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv, 0)
    special = ("embeddings.position_embedding.weight", "text_projection.weight")
    rest = [k for k in sd if k not in special and not _is_qkv(k)]
    out.update({prefix + ldm: sd[k] for k, ldm in key_map(rest, pairs).items()})
    return out


def open_clip_from_ldm(ldm_sd: dict[str, torch.Tensor], diffusers_keys, num_layers: int,
                       prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    out = {}
    pairs = open_clip_pairs(num_layers)
    for key in diffusers_keys:
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_embedding.weight":
            out[key] = ldm_sd[prefix + "positional_embedding"]
        elif k == "text_projection.weight":
            out[key] = ldm_sd[prefix + "text_projection"].T.contiguous()
        elif _is_qkv(k):
            layer, proj, kind = k.split(".")[2], k.split(".")[4][0], k.rsplit(".", 1)[1]
            fused = ldm_sd[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"]
            out[key] = fused.chunk(3, 0)["qkv".index(proj)]
        else:
            out[key] = ldm_sd[prefix + key_map([k], pairs)[k]]
    return out


TEXT_ENCODER_LAYOUTS = ("clip_l", "open_clip")


def text_encoder_to_ldm(layout: str, sd: dict[str, torch.Tensor], num_layers: int, prefix: str) -> dict[str, torch.Tensor]:
    """One text encoder's LDM keys: `clip_l` keeps Hugging Face names under `prefix`; `open_clip` is OpenCLIP's own."""
    return clip_l_to_ldm(sd, prefix) if layout == "clip_l" else open_clip_to_ldm(sd, num_layers, prefix)


def text_encoder_from_ldm(layout: str, ldm_sd: dict[str, torch.Tensor], diffusers_keys, num_layers: int,
                          prefix: str) -> dict[str, torch.Tensor]:
    if layout == "clip_l":
        return clip_l_from_ldm(ldm_sd, diffusers_keys, prefix)
    return open_clip_from_ldm(ldm_sd, diffusers_keys, num_layers, prefix)


def _is_qkv(key: str) -> bool:
    return ".self_attn." in key and any(f".{p}_proj." in key for p in "qkv")
