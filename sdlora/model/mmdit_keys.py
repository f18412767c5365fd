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
`KOHYA_NAMES` tells each diffusers module's kohya name from its path and shape and back; the records' row
operations (adapter/records.py `stack_rows`, `row_blocks`, `swapped_halves`) fuse q/k/v and swap adaLN halves.
"""

from __future__ import annotations

import re
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


def _block_pairs(n: int, *, last: bool, dual: bool, qk_norm: bool) -> list[MMDiTPair]:
    """Joint block n's pairs: `last` (its text stream is pre-only: no attention output, no MLP, and the adaLN
    halves swapped), `dual` (SD3.5 Medium's second image attention), `qk_norm` (SD3.5's QK-norm)."""
    d, o = f"transformer_blocks.{n}", f"joint_blocks.{n}"
    pairs = _qkv(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{o}.x_block.attn.qkv")
    pairs += _qkv(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{o}.context_block.attn.qkv")
    pairs.append(MMDiTPair(f"{d}.attn.to_out.0", f"{o}.x_block.attn.proj"))
    if not last:
        pairs.append(MMDiTPair(f"{d}.attn.to_add_out", f"{o}.context_block.attn.proj"))
    if qk_norm:
        pairs += [MMDiTPair(f"{d}.attn.norm_q", f"{o}.x_block.attn.ln_q"),
                  MMDiTPair(f"{d}.attn.norm_k", f"{o}.x_block.attn.ln_k"),
                  MMDiTPair(f"{d}.attn.norm_added_q", f"{o}.context_block.attn.ln_q"),
                  MMDiTPair(f"{d}.attn.norm_added_k", f"{o}.context_block.attn.ln_k")]
    if dual:
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
    return pairs


_EMBEDDERS = (MMDiTPair("pos_embed.proj", "x_embedder.proj"),
              MMDiTPair("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
              MMDiTPair("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
              MMDiTPair("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
              MMDiTPair("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
              MMDiTPair("context_embedder", "context_embedder"))
_FINAL = (MMDiTPair("proj_out", "final_layer.linear"),
          MMDiTPair("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True))


def mmdit_pairs(config) -> list[MMDiTPair]:
    """Every parameterised module of an `SD3Transformer2DModel` with `config` (its config mapping: `num_layers`,
    `dual_attention_layers`, `qk_norm`) and its original MMDiT counterpart (see the module docstring)."""
    layers = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    qk_norm = config.get("qk_norm") is not None
    pairs = list(_EMBEDDERS)
    for n in range(layers):
        pairs += _block_pairs(n, last=n == layers - 1, dual=n in dual, qk_norm=qk_norm)
    return pairs + list(_FINAL)


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


def _kohya_nameable(pair: MMDiTPair) -> bool:
    """Whether kohya's SD3 LoRA can name the pair's module: a Linear, or x_embedder's patch convolution (its
    `emb_dims` option adapts it); not a QK-norm weight."""
    return ".ln_" not in pair.original


def kohya_targets(config) -> dict[str, MMDiTPair]:
    """diffusers module path -> its pair, for every module a kohya SD3 LoRA can name (`_kohya_nameable`);
    `kohya_name(pair.original)` is the LoRA name, `pair.third` the rows of a fused qkv it takes."""
    return {p.diffusers: p for p in mmdit_pairs(config) if _kohya_nameable(p)}


_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_KOHYA_BLOCK = re.compile(r"^joint_blocks_(\d+)_")


def _pre_only(weight_shape) -> bool:
    """Whether a text-stream adaLN projection of this (out, in) shape is the last block's: it makes (shift, scale),
    2 x width outputs, where every other block's makes six (diffusers' `AdaLayerNormContinuous` against
    `AdaLayerNormZero`; the original's pre-only `context_block`)."""
    return len(weight_shape) == 2 and weight_shape[0] == 2 * weight_shape[1]


def _pairs_near(block: int | None, weight_shape) -> list[MMDiTPair]:
    """The kohya-nameable pairs of joint block `block` (None: outside the blocks) with every optional module, the
    text-stream adaLN's halves swapped when `weight_shape` is the last block's (`_pre_only`)."""
    if block is None:
        pairs = list(_EMBEDDERS + _FINAL)
    else:
        pairs = _block_pairs(block, last=_pre_only(weight_shape), dual=True, qk_norm=False)
    return [p for p in pairs if _kohya_nameable(p)]


@dataclass(frozen=True)
class MMDiTKohyaNames:
    """kohya's names of SD3's transformer modules (`networks/lora_sd3.py`: the original MMDiT path after
    `lora_unet_`, q/k/v one `qkv` module), told from a module's path and (out, in) shape alone: files carry no
    transformer config, and the only name that depends on more than the path, the last block's text-stream adaLN
    (its halves swapped), shows in its shape (`_pre_only`). The SD3 families' `kohya_names` (model/sd3.py); the
    kohya writer and reader (adapter/kohya.py) fuse and split rows with the adapter records' `stack_rows` /
    `row_blocks`."""

    prefix: str = KOHYA_PREFIX

    def pair(self, path: str, weight_shape) -> MMDiTPair | None:
        """The pair of a diffusers module path (`transformer_blocks.3.attn.to_k`), None when kohya has no name
        for it (a QK-norm, a module SD3 does not have)."""
        m = _BLOCK.match(path)
        return next((p for p in _pairs_near(int(m[1]) if m else None, weight_shape) if p.diffusers == path), None)

    def pairs(self, flat: str, weight_shape) -> list[MMDiTPair]:
        """The pairs a kohya name (after `lora_unet_`, `joint_blocks_3_x_block_attn_qkv`) stands for: three, q, k
        and v in order, for a fused qkv; [] when it is no kohya SD3 name."""
        m = _KOHYA_BLOCK.match(flat)
        found = [p for p in _pairs_near(int(m[1]) if m else None, weight_shape) if p.original.replace(".", "_") == flat]
        return sorted(found, key=lambda p: p.third or 0)


KOHYA_NAMES = MMDiTKohyaNames()


def is_kohya_default_target(original_module: str) -> bool:
    """kohya's default SD3 LoRA (`networks/lora_sd3.py`, target `SingleDiTBlock`): every Linear inside a joint
    block's x_block or context_block (attention qkv and proj, attn2, MLP fc1/fc2, adaLN modulation); the embedders
    and the final layer only with its `emb_dims` option."""
    return original_module.startswith("joint_blocks.") and ".ln_" not in original_module
