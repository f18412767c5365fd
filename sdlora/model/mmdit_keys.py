"""The name map between diffusers' `SD3Transformer2DModel` and the original MMDiT layout (Stability's reference code,
SD3 / SD3.5 single files under `model.diffusion_model.`, kohya-ss/sd-scripts `library/sd3_models.py`, ComfyUI), and
the kohya LoRA names built on it.

One table (`mmdit_pairs`) drives both directions, tested against diffusers' own single-file converter
(`loaders/single_file_utils.py`, `convert_sd3_transformer_checkpoint_to_diffusers`). Per joint block N (`N` = the
diffusers `transformer_blocks.N`):

  diffusers (transformer_blocks.N.)          original (joint_blocks.N.)
  attn.to_q / to_k / to_v                    x_block.attn.qkv          (rows: q, k, v thirds of one Linear)
  attn.to_out.0                              x_block.attn.proj
  attn.norm_q / norm_k                       x_block.attn.ln_q / ln_k  (QK-norm: SD3.5)
  attn.add_q_proj / add_k_proj / add_v_proj  context_block.attn.qkv
  attn.to_add_out                            context_block.attn.proj   (not in the last block)
  attn.norm_added_q / norm_added_k           context_block.attn.ln_q / ln_k
  attn2.to_q / to_k / to_v, attn2.to_out.0   x_block.attn2.qkv, x_block.attn2.proj  (dual attention: SD3.5 Medium)
  attn2.norm_q / norm_k                      x_block.attn2.ln_q / ln_k
  norm1.linear                               x_block.adaLN_modulation.1
  norm1_context.linear                       context_block.adaLN_modulation.1  (last block: halves swapped)
  ff.net.0.proj / ff.net.2                   x_block.mlp.fc1 / fc2
  ff_context.net.0.proj / ff_context.net.2   context_block.mlp.fc1 / fc2  (not in the last block)

and outside the blocks: pos_embed.proj <-> x_embedder.proj, pos_embed.pos_embed <-> pos_embed (a tensor),
time_text_embed.timestep_embedder.linear_1/2 <-> t_embedder.mlp.0/2, time_text_embed.text_embedder.linear_1/2 <->
y_embedder.mlp.0/2, context_embedder <-> context_embedder, proj_out <-> final_layer.linear, norm_out.linear <->
final_layer.adaLN_modulation.1 (halves swapped). "Halves swapped": the original AdaLayerNormContinuous splits its
projection into (shift, scale), diffusers' into (scale, shift), so the output rows' two halves trade places.

kohya LoRA names (`networks/lora_sd3.py`, prefix `lora_unet`, "make ComfyUI compatible"): the original module path with
dots as underscores, e.g. `lora_unet_joint_blocks_0_x_block_attn_qkv`; q, k and v are one fused LoRA on `qkv`.
ComfyUI (`comfy/lora.py`, `model_lora_keys_unet`) maps `lora_unet_<original key with _>` to every weight of the
model, so it reads these names, and also `transformer.<diffusers module>` (diffusers' LoRA layout).
`lora_to_kohya` / `lora_from_kohya` convert LoRA factors between the two namings (q/k/v fused block-diagonally and
split back to each part's rank; adaLN halves swapped on up's rows), exactly in the deltas they apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINGLE_FILE_PREFIX = "model.diffusion_model."
KOHYA_PREFIX = "lora_unet_"
_POS_EMBED = ("pos_embed.pos_embed", "pos_embed")  # a tensor, not a module: (diffusers key, original key)


@dataclass(frozen=True)
class MMDiTPair:
    diffusers: str  # module path in SD3Transformer2DModel
    original: str  # module path in the original MMDiT
    third: int | None = None  # 0, 1, 2: this module is the q, k or v rows of the fused original `qkv`
    swap_halves: bool = False  # original output rows (shift, scale) are diffusers' (scale, shift)


def _qkv(diffusers_prefix: str, names: tuple[str, str, str], original: str) -> list[MMDiTPair]:
    return [MMDiTPair(f"{diffusers_prefix}.{n}", original, third=i) for i, n in enumerate(names)]


def mmdit_pairs(config) -> list[MMDiTPair]:
    """Every parameterised module of an `SD3Transformer2DModel` with `config` (its config mapping: `num_layers`,
    `dual_attention_layers`, `qk_norm`) and its original MMDiT counterpart (see the module docstring)."""
    layers = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    qk_norm = config.get("qk_norm") is not None
    pairs = [MMDiTPair("pos_embed.proj", "x_embedder.proj"),
             MMDiTPair("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
             MMDiTPair("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
             MMDiTPair("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
             MMDiTPair("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
             MMDiTPair("context_embedder", "context_embedder")]
    for n in range(layers):
        d, o = f"transformer_blocks.{n}", f"joint_blocks.{n}"
        last = n == layers - 1
        pairs += _qkv(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{o}.x_block.attn.qkv")
        pairs += _qkv(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{o}.context_block.attn.qkv")
        pairs.append(MMDiTPair(f"{d}.attn.to_out.0", f"{o}.x_block.attn.proj"))
        if not last:
            pairs.append(MMDiTPair(f"{d}.attn.to_add_out", f"{o}.context_block.attn.proj"))
        if qk_norm:
            pairs += [MMDiTPair(f"{d}.attn.norm_q", f"{o}.x_block.attn.ln_q"),
                      MMDiTPair(f"{d}.attn.norm_k", f"{o}.x_block.attn.ln_k"),
                      MMDiTPair(f"{d}.attn.norm_added_q", f"{o}.context_block.attn.ln_q"),
                      MMDiTPair(f"{d}.attn.norm_added_k", f"{o}.context_block.attn.ln_k")]
        if n in dual:
            pairs += _qkv(f"{d}.attn2", ("to_q", "to_k", "to_v"), f"{o}.x_block.attn2.qkv")
            pairs.append(MMDiTPair(f"{d}.attn2.to_out.0", f"{o}.x_block.attn2.proj"))
            if qk_norm:
                pairs += [MMDiTPair(f"{d}.attn2.norm_q", f"{o}.x_block.attn2.ln_q"),
                          MMDiTPair(f"{d}.attn2.norm_k", f"{o}.x_block.attn2.ln_k")]
        pairs += [MMDiTPair(f"{d}.norm1.linear", f"{o}.x_block.adaLN_modulation.1"),
                  MMDiTPair(f"{d}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1", swap_halves=last),
                  MMDiTPair(f"{d}.ff.net.0.proj", f"{o}.x_block.mlp.fc1"),
                  MMDiTPair(f"{d}.ff.net.2", f"{o}.x_block.mlp.fc2")]
        if not last:
            pairs += [MMDiTPair(f"{d}.ff_context.net.0.proj", f"{o}.context_block.mlp.fc1"),
                      MMDiTPair(f"{d}.ff_context.net.2", f"{o}.context_block.mlp.fc2")]
    pairs += [MMDiTPair("proj_out", "final_layer.linear"),
              MMDiTPair("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True)]
    return pairs


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of dim 0 exchanged: (shift, scale) <-> (scale, shift). Its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(sd: dict[str, torch.Tensor], config, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in the original MMDiT layout (keys prefixed with `prefix`, e.g.
    SINGLE_FILE_PREFIX): q/k/v concatenated into `qkv`, adaLN halves swapped where the layouts differ.
    Raises ValueError naming any key the table does not place (a config that does not match the weights)."""
    out, fused, used = {}, {}, set()
    for pair in mmdit_pairs(config):
        for suffix in ("weight", "bias"):
            key = f"{pair.diffusers}.{suffix}"
            if key not in sd:
                continue
            used.add(key)
            target = f"{prefix}{pair.original}.{suffix}"
            if pair.third is not None:
                fused.setdefault(target, [None, None, None])[pair.third] = sd[key]
            else:
                out[target] = swap_halves(sd[key]) if pair.swap_halves else sd[key]
    for target, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"{target}: q, k and v are not all in the state dict")
        out[target] = torch.cat(parts, dim=0)
    if _POS_EMBED[0] in sd:
        out[prefix + _POS_EMBED[1]] = sd[_POS_EMBED[0]]
        used.add(_POS_EMBED[0])
    if left := sorted(set(sd) - used):
        raise ValueError(f"diffusers SD3 transformer keys with no original name: {', '.join(left[:5])}")
    return out


def from_original(sd: dict[str, torch.Tensor], config, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `to_original`: an original-layout MMDiT state dict (keys under `prefix`) as diffusers keys.
    Keys outside `prefix` are ignored; raises ValueError naming any key under it the table does not place."""
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out, used = {}, set()
    for pair in mmdit_pairs(config):
        for suffix in ("weight", "bias"):
            key = f"{pair.original}.{suffix}"
            if key not in own:
                continue
            used.add(key)
            t = own[key].chunk(3, dim=0)[pair.third] if pair.third is not None else own[key]
            out[f"{pair.diffusers}.{suffix}"] = swap_halves(t) if pair.swap_halves else t
    if _POS_EMBED[1] in own:
        out[_POS_EMBED[0]] = own[_POS_EMBED[1]]
        used.add(_POS_EMBED[1])
    if left := sorted(set(own) - used):
        raise ValueError(f"original MMDiT keys with no diffusers name: {', '.join(prefix + k for k in left[:5])}")
    return out


def kohya_model_type(config) -> str:
    """kohya's SD3 model type from the transformer config, as `library/sd3_utils.py` tells it from the weights:
    QK-norm with dual attention "5-medium", QK-norm alone "5-large", neither "medium" (SD3 Medium). kohya writes it as
    `ss_base_model_version` and in `modelspec.architecture` = "stable-diffusion-3-<type>/lora"."""
    if config.get("qk_norm") is None:
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def kohya_name(original_module: str) -> str:
    """kohya's LoRA name of an original MMDiT module: `lora_unet_` + the path with dots as underscores."""
    return KOHYA_PREFIX + original_module.replace(".", "_")


def kohya_targets(config) -> dict[str, MMDiTPair]:
    """diffusers module path -> its pair, for every Linear a kohya SD3 LoRA can name (not the QK-norm weights nor
    x_embedder's patch convolution);
    `kohya_name(pair.original)` is the LoRA name, `pair.third` the rows of a fused qkv it takes."""
    return {p.diffusers: p for p in mmdit_pairs(config) if ".ln_" not in p.original and "x_embedder" not in p.original}


def is_kohya_default_target(original_module: str) -> bool:
    """kohya's default SD3 LoRA (`networks/lora_sd3.py`, target `SingleDiTBlock`): every Linear inside a joint
    block's x_block or context_block (attention qkv and proj, attn2, MLP fc1/fc2, adaLN modulation); the embedders
    and the final layer only with its `emb_dims` option."""
    return original_module.startswith("joint_blocks.") and ".ln_" not in original_module


def fuse_qkv_lora(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None]):
    """Three LoRAs on q, k and v (None for one not adapted), each (down (r_i, in), up (out_i, r_i), alpha_i) with
    delta_i = alpha_i / r_i * up_i @ down_i, as one LoRA on the fused `qkv` whose delta is the three stacked on rows
    (zeros for a missing one): down = the downs stacked (R = sum r_i, in), up = block-diagonal (3 out, R). Returns
    (down, up, alpha) with alpha / R the common scale when all alpha_i / r_i agree (alpha = scale * R), otherwise
    alpha = R and each scale folded into its up block. (kohya's `split_qkv` save keeps alpha unchanged while the rank
    triples, `networks/lora_sd3.py` state_dict; a reader computing alpha / rank then applies a third of the trained
    delta.) Raises ValueError when none is given."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("fuse_qkv_lora: none of q, k, v has a LoRA")
    rows, like = present[0][1].shape[0], present[0][1]
    scales = [a / d.shape[0] for d, _, a in present]
    rank = sum(d.shape[0] for d, _, _ in present)
    same = all(abs(s - scales[0]) <= 1e-6 * abs(scales[0]) for s in scales)
    up = torch.zeros(3 * rows, rank, dtype=like.dtype, device=like.device)
    col, scale = 0, iter(scales)
    for third, part in enumerate(parts):
        if part is None:
            continue
        d, u, _ = part
        s = next(scale)
        up[third * rows:(third + 1) * rows, col:col + d.shape[0]] = u if same else u * s
        col += d.shape[0]
    return torch.cat([d for d, _, _ in present], dim=0), up, (scales[0] * rank if same else float(rank))


def split_qkv_lora(down: torch.Tensor, up: torch.Tensor, alpha: float):
    """A LoRA on the fused `qkv` (down (R, in), up (3 out, R), alpha) as exact LoRAs on q, k and v: each takes its
    third of up's rows and only the rank columns those rows use (all of them for a dense up; its own block for
    `fuse_qkv_lora`'s block-diagonal one, which gives back the parts' ranks), alpha scaled to keep alpha / rank.
    Returns three (down, up_i, alpha_i), None for a third whose rows are all zero."""
    rank = down.shape[0]
    out = []
    for u in up.chunk(3, dim=0):
        used = u.abs().sum(0) != 0
        if not bool(used.any()):
            out.append(None)
            continue
        out.append((down[used], u[:, used], alpha * int(used.sum()) / rank))
    return out


def lora_to_kohya(loras: dict, config) -> dict:
    """LoRAs on diffusers modules ({module path: (down, up, alpha)}) as kohya's ({kohya name: (down, up, alpha)}):
    q/k/v fused (`fuse_qkv_lora`), up's halves swapped where the layouts order the adaLN output differently.
    Raises ValueError naming a module kohya has no name for."""
    targets = kohya_targets(config)
    fused: dict[str, list] = {}
    out = {}
    for path, (down, up, alpha) in loras.items():
        pair = targets.get(path)
        if pair is None:
            raise ValueError(f"{path}: no kohya SD3 LoRA name (kohya names the transformer's Linear modules)")
        name = kohya_name(pair.original)
        if pair.third is not None:
            fused.setdefault(name, [None, None, None])[pair.third] = (down, up, alpha)
        else:
            out[name] = (down, swap_halves(up) if pair.swap_halves else up, alpha)
    for name, parts in fused.items():
        out[name] = fuse_qkv_lora(parts)
    return out


def lora_from_kohya(loras: dict, config) -> dict:
    """The inverse of `lora_to_kohya`: kohya LoRAs ({kohya name: (down, up, alpha)}) on diffusers modules, a fused
    qkv split by `split_qkv_lora`. Raises ValueError naming a kohya name this transformer has no module for."""
    by_name: dict[str, list[MMDiTPair]] = {}
    for pair in kohya_targets(config).values():
        by_name.setdefault(kohya_name(pair.original), []).append(pair)
    out = {}
    for name, (down, up, alpha) in loras.items():
        pairs = by_name.get(name)
        if pairs is None:
            raise ValueError(f"{name}: not a kohya SD3 LoRA name of this transformer")
        if pairs[0].third is not None:
            for pair, part in zip(sorted(pairs, key=lambda p: p.third), split_qkv_lora(down, up, alpha)):
                if part is not None:
                    out[pair.diffusers] = part
        else:
            out[pairs[0].diffusers] = (down, swap_halves(up) if pairs[0].swap_halves else up, alpha)
    return out
