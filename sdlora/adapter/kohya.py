"""The kohya LoRA layout that AUTOMATIC1111, ComfyUI and model sites read, both ways.

Keys: `lora_unet_<diffusers module path, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
and `lora_te_text_model_<path>` for the CLIP text encoder (kohya names it as transformers 4 did).
SDXL: `lora_unet_<original (LDM) module path>` (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`: kohya's SDXL
scripts train the original UNet; the table is model/ldm_keys.py's, the one diffusers' converter inverts),
`lora_te1_text_model_<path>` (CLIP-L) and `lora_te2_text_model_<path>` (OpenCLIP bigG).
SD3 / SD3.5 (kohya's networks/lora_sd3.py): `lora_unet_<original MMDiT path>` (`joint_blocks_0_x_block_attn_qkv`:
q, k and v one module, their updates stacked exactly; `kohya_modules`, the family's `kohya_names`),
`lora_te1_` / `lora_te2_` (the CLIPs, as SDXL) and `lora_te3_<path>` (T5).

Writing: every scale is already folded into the tensors (see weights.py). Every module gets the same `.alpha`, the
file's network dim (`ss_network_dim`, its most common rank), and each module's r / alpha is folded into its tensors,
so that a loader's alpha / r gives back ΔW. One alpha per file is what every loader reads alike: diffusers
(0.42) keeps per-module ranks but per-module alphas only for UNet resnet/conv modules (the keys it builds for
attention and text-encoder alphas match no module, so they fall back to the most common alpha), so a file
whose alphas follow its per-module ranks loaded at the wrong strength there. LyCORIS kinds keep LyCORIS' key names
(`hada_w1_a`, `lokr_w1`, `dora_scale`; adapter/lycoris.py has their scale conventions).

Reading (files from kohya sd-scripts, LyCORIS and other trainers): the scale alpha / rank is folded into the
tensors (`up` for LoRA).
Kohya names lose the dots, so `to_out_0` must become `to_out.0` without the model at hand: the name
is split into diffusers' / transformers' identifiers, some of which contain underscores.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from sdlora.adapter.family import adapter_family as family_and_prediction
from sdlora.adapter.family import family_from_metadata
from sdlora.adapter.names import PARTS
from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import KINDS, AdapterWeights, kind_of, split_name
from sdlora.errors import UserError
from sdlora.model.families import FAMILIES, ModelFamily
from sdlora.model.ldm_keys import _rename, unet_pairs
from sdlora.model.parts import DENOISER
from sdlora.util.atomic import save_safetensors


def _prefix_table(families) -> dict[str, tuple[str, ...]]:
    """kohya prefix -> the part names it stands for in `families` (longest prefix first, so `lora_te1_` is not read
    as `lora_te_`). A prefix may stand for different parts in different families (`lora_unet_` is any denoiser)."""
    table: dict[str, tuple[str, ...]] = {}
    for family in families:
        for name, prefix in family.kohya_prefixes.items():
            table[prefix] = tuple(dict.fromkeys(table.get(prefix, ()) + (name,)))
    return dict(sorted(table.items(), key=lambda kv: -len(kv[0])))


# The families whose kohya names this module writes and reads.
KOHYA_FAMILIES = tuple(f for f in FAMILIES.values() if "kohya" not in f.formats_missing)
PREFIXES = _prefix_table(KOHYA_FAMILIES)
# The family whose kohya files name its UNet by original (LDM) block names (SDXL), for files read without a record.
LDM_FAMILY = next(f for f in FAMILIES.values() if f.kohya_unet_layout is not None)
# The denoiser namings that are not one kohya name per diffusers module (SD3's original MMDiT names, q/k/v fused:
# `ModelFamily.kohya_names`), for files read without a record or label.
FUSED_NAMES = {f.kohya_names: f.denoiser.name for f in KOHYA_FAMILIES if f.kohya_names is not None}

# The original UNet's module identifiers (SDXL's kohya names; model/parts.py `words` for diffusers' names).
LDM_IDENTIFIERS = LDM_FAMILY.denoiser.words | frozenset("""
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection op time_embed label_emb out
""".split())
LDM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


_PAIRS: dict[str, list] = {}


def _ldm_pairs(layout: dict) -> list:
    """The diffusers <-> original (LDM) UNet module pairs of a block layout (`RunRecord.unet_layout`)."""
    key = json.dumps(layout, sort_keys=True)
    if key not in _PAIRS:
        if not isinstance(layout.get("layers_per_block"), int):
            raise UserError(f"kohya names: a UNet with per-block layers_per_block {layout.get('layers_per_block')} "
                            "has no original (LDM) block numbering sdlora knows; export the diffusers layout")
        _PAIRS[key] = unet_pairs(layout)
    return _PAIRS[key]


def _layout_text(layout: dict) -> str:
    return f"layers_per_block {layout['layers_per_block']}, {len(layout['down_block_types'])} down blocks"

# Native resolutions, for files that carry no RunRecord (not trained by sdlora).


# ------------------------------------------------------------------------------------------- names
def kohya_name(name: str, family: ModelFamily, layout: dict | None = None) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in` (SD 1.x/2.x);
    SDXL: `lora_unet_input_blocks_1_1_proj_in`, `lora_te1_text_model_...`, `lora_te2_text_model_...`: the part's
    kohya prefix, its model level, the path with dots as underscores; SDXL's original blocks numbered by `layout`
    (the trained UNet's, `RunRecord.unet_layout`; default SDXL base's). A UserError when the module is not in that
    layout (an adapter of another UNet, whose layout no record gives)."""
    component, path = split_name(name)
    part = family.part(component)
    if part is family.denoiser and family.kohya_unet_layout is not None:
        layout = layout or family.kohya_unet_layout
        ldm = _rename(path, _ldm_pairs(layout), forward=True)
        if ldm is None:
            raise UserError(f"kohya names: {name} is not a module of {family.title}'s original UNet blocks "
                            f"({_layout_text(layout)}{'' if layout is not family.kohya_unet_layout else ', SDXL base'}); "
                            "an adapter without sdlora's run record is numbered as SDXL base")
        path = ldm
    return part.kohya_prefix + part.kohya_level + path.replace(".", "_")


@lru_cache(maxsize=None)
def _split_words(flat: str, known: frozenset) -> tuple[str, ...] | None:
    """`flat` as the fewest identifiers of `known` and indices; None when it is not made of them."""
    words = flat.split("_")
    n = len(words)
    best: list[tuple[str, ...] | None] = [None] * (n + 1)
    best[n] = ()
    for i in range(n - 1, -1, -1):
        for j in range(n, i, -1):
            part = "_".join(words[i:j])
            if (part.isdigit() or part in known) and best[j] is not None:
                cand = (part,) + best[j]
                if best[i] is None or len(cand) < len(best[i]):
                    best[i] = cand
    return best[0]


def _is_ldm(flat: str) -> bool:
    """Whether a kohya UNet name (after `lora_unet_`) is an original (LDM) block name: SDXL's kohya names."""
    return flat.startswith(LDM_BLOCKS) or flat.startswith(("time_embed", "label_emb", "out_"))


def _spells(flat: str, part) -> bool:
    """Whether a kohya name (after its prefix) is a module path of `part` (a UNet's may be SDXL's LDM names)."""
    if part.role == DENOISER and part.name == LDM_FAMILY.denoiser.name and _is_ldm(flat):
        return True
    return _split_words(flat, part.words) is not None


def canonical_from_kohya(stem: str, module_names: frozenset[str] | None = None, layout: dict | None = None,
                         family: ModelFamily | None = None) -> str:
    """`lora_te_text_model_encoder_layers_0_self_attn_q_proj` -> `text_encoder.encoder.layers.0.self_attn.q_proj`.

    With `module_names` (canonical names of a model at hand) the name is looked up exactly instead. SDXL's original
    block names are numbered by `layout` (the file's `RunRecord.unet_layout`; default SDXL base's). `family` (what
    the file says) picks the part where a prefix stands for different parts in different families; a UserError
    when it would matter and nothing says it.
    """
    prefix = next((p for p in PREFIXES if stem.startswith(p)), None)
    if prefix is None:
        raise UserError(f"kohya key {stem!r}: expected a {', '.join(PREFIXES)} prefix")
    candidates = PREFIXES[prefix]
    if len(candidates) > 1 and family is not None:
        candidates = tuple(n for n in candidates if family.kohya_prefixes.get(n) == prefix) or candidates
    if len(candidates) > 1:  # nothing says the family: the part whose module words spell the name, if only one does
        spelled = tuple(n for n in candidates if _spells(stem[len(prefix):].removeprefix(PARTS[n].kohya_level), PARTS[n]))
        if not spelled:
            raise UserError(f"kohya key {stem!r}: {stem[len(prefix):]!r} is not a module path of a "
                            f"{' or '.join(candidates)} sdlora knows")
        candidates = spelled if len(spelled) == 1 else candidates
    if len(candidates) > 1:
        raise UserError(f"kohya key {stem!r}: {prefix} stands for {' or '.join(candidates)} depending on the model "
                        "family, and the file does not say its family (ss_base_model_version)")
    component = candidates[0]
    flat = stem[len(prefix):].removeprefix(PARTS[component].kohya_level)
    if PARTS[component].role == DENOISER and _is_ldm(flat):
        # SDXL's original block names: split them, then the LDM table gives diffusers' path
        parts = _split_words(flat, LDM_IDENTIFIERS)
        path = _rename(".".join(parts), _ldm_pairs(layout or LDM_FAMILY.kohya_unet_layout), forward=False) \
            if parts is not None else None
        if path is None:
            raise UserError(f"kohya key {stem!r}: {flat!r} is not a module path of an {LDM_FAMILY.title} UNet")
        return f"{component}.{path}"
    if module_names is not None:
        for name in module_names:
            if name.startswith(component + ".") and name[len(component) + 1:].replace(".", "_") == flat:
                return name
    parts = _split_words(flat, PARTS[component].words)  # `attn1_to_out_0` -> ('attn1', 'to_out', '0')
    if parts is None:
        raise UserError(f"kohya key {stem!r}: {flat!r} is not a module path of {component} sdlora knows")
    return f"{component}." + ".".join(parts)


# ------------------------------------------------------------------------------------ state dicts
def adapter_family(adapter: AdapterWeights, base_model_version: str | None = None) -> ModelFamily:
    """The family an adapter was trained on: its run record's, else its modules' names and shapes, else what
    `base_model_version` or the file's metadata says (adapter/family.py)."""
    return family_and_prediction(adapter, base_model_version)[0]


def network_dim(adapter: AdapterWeights) -> int:
    """kohya's `ss_network_dim`: the most common rank of the linear modules (of the conv ones if there are none);
    also the one `.alpha` a kohya file written by sdlora gives every module (see `to_kohya_state_dict`)."""
    ranks = Counter(m.rank for m in adapter.modules.values() if not m.is_conv)
    conv_ranks = Counter(m.rank for m in adapter.modules.values() if m.is_conv)
    return ranks.most_common(1)[0][0] if ranks else (conv_ranks.most_common(1)[0][0] if conv_ranks else 1)


def kohya_modules(adapter: AdapterWeights, family: ModelFamily, layout: dict | None = None) -> dict:
    """kohya module name (the key stem) -> the record written under it. One per module (`kohya_name`), except where
    the family's denoiser has fused kohya names (`ModelFamily.kohya_names`, SD3): q, k and v of one attention are
    one `qkv` record whose ΔW is theirs stacked on rows (`stack_rows`: for LoRA, downs stacked and ups
    block-diagonal, rank r_q + r_k + r_v; a part not adapted is zero rows), and an adaLN projection whose output
    halves the original orders the other way gets them swapped. A UserError naming a module kohya has no name for,
    or parts a kind cannot stack (LoKr)."""
    out, fused = {}, {}
    names, denoiser = family.kohya_names, family.denoiser
    for name, m in adapter.modules.items():
        component, path = split_name(name)
        if names is None or component != denoiser.name:
            out[kohya_name(name, family, layout)] = m
            continue
        pair = names.pair(path, m.weight_shape)
        if pair is None:
            raise UserError(f"kohya layout: {name} has no kohya {family.title} name (kohya names the transformer's "
                            "Linear modules); export the diffusers layout")
        stem = denoiser.kohya_prefix + pair.original.replace(".", "_")
        if pair.third is not None:
            fused.setdefault(stem, {})[pair.third] = (name, m)
        else:
            out[stem] = m.swapped_halves(name) if pair.swap_halves else m
    for stem, thirds in fused.items():
        parts = [thirds.get(i, (None, None))[1] for i in range(3)]
        rows = next(m for m in parts if m is not None).weight_shape[0]
        where = " / ".join(n for n, _ in thirds.values()) + f" ({stem})"
        out[stem] = type(next(m for m in parts if m is not None)).stack_rows(parts, [rows] * 3, where)
    return out


def split_kohya_module(stem: str, record, names) -> list[tuple[str, object]] | None:
    """The inverse of `kohya_modules` for one module of a denoiser named by `names` (a family's `kohya_names`):
    [(module path, record)] (a fused qkv cut into its thirds by `row_blocks`, a third with no update left out;
    swapped adaLN halves swapped back); None when `stem` is no name of that naming."""
    flat = stem.removeprefix(names.prefix)
    pairs = names.pairs(flat, record.weight_shape) if stem.startswith(names.prefix) else []
    if not pairs:
        return None
    if pairs[0].third is None:
        pair = pairs[0]
        return [(pair.diffusers, record.swapped_halves(stem) if pair.swap_halves else record)]
    rows = record.weight_shape[0]
    if rows % 3:
        raise UserError(f"kohya key {stem}: a qkv module of {rows} rows is not three equal parts")
    blocks = record.row_blocks([rows // 3] * 3, stem)
    return [(pair.diffusers, block) for pair, block in zip(pairs, blocks) if block is not None]


def to_kohya_state_dict(adapter: AdapterWeights, base_model_version: str | None = None) -> dict[str, torch.Tensor]:
    """Kohya/LyCORIS keys (each kind's KOHYA_KEYS). Every module's `.alpha` is the file's `network_dim` and its
    r / alpha is folded into its tensors (`scaled`), so kohya's forward (alpha / r, r = the module's `alpha_rank`)
    gives ΔW back in every loader, diffusers included (it reads one alpha per file; see the module docstring).
    A module whose rank is the network dim is written unchanged; another's factors are rescaled, so they read back
    to within rounding of their dtype (bit for bit only where r / alpha is a power of 2). A kind that applies no
    alpha (LoKr with both factors full) is never rescaled. Names follow the adapter's family (`adapter_family`)."""
    sd = {}
    family = adapter_family(adapter, base_model_version)
    if "kohya" in family.formats_missing:
        raise UserError(f"kohya layout: not written for {family.title} adapters yet; use the diffusers layout")
    record = RunRecord.from_metadata(adapter.metadata)
    layout = record.unet_layout if record is not None else None
    alpha = float(network_dim(adapter))
    for k, m in kohya_modules(adapter, family, layout).items():
        rank = m.alpha_rank()
        if rank and rank != alpha:
            m = m.scaled(rank / alpha)
        tensors = m.tensors()
        for role in tensors:
            sd[f"{k}.{m.KOHYA_KEYS[role]}"] = m.file_tensor(role, "kohya")
        sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=next(iter(tensors.values())).dtype)
    return sd


_SUFFIXES = sorted({s for cls in KINDS.values() for s in cls.KOHYA_KEYS.values()} | {"alpha"}, key=len, reverse=True)
_KOHYA_KEY = re.compile(r"^(?P<stem>(?:" + "|".join(map(re.escape, PREFIXES)) + r").+?)\.(?P<kind>" +
                        "|".join(re.escape(x) for x in _SUFFIXES) + ")$")


def _fused_naming(stem: str, family: ModelFamily | None):
    """(kohya naming, denoiser part name) when `stem` names a module of a denoiser with fused kohya names
    (`ModelFamily.kohya_names`): the family's, or for a file that says no family, the naming whose names it is
    (SD3's `lora_unet_joint_blocks_...` are no UNet's); None otherwise."""
    if family is not None:
        names = family.kohya_names
        return (names, family.denoiser.name) if names is not None and stem.startswith(names.prefix) else None
    for names, denoiser in FUSED_NAMES.items():
        flat = stem.removeprefix(names.prefix)
        if stem.startswith(names.prefix) and any(names.pairs(flat, shape) for shape in ((2, 1), (6, 1))):
            return names, denoiser
    return None


def from_kohya_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None, *,
                          module_names: frozenset[str] | None = None) -> AdapterWeights:
    """Read a kohya LoRA or a LyCORIS DoRA / LoHa / LoKr file (ours or another trainer's): alpha / rank folded into
    the tensors (where the kind applies an alpha), canonical names."""
    meta = dict(meta or {})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise UserError(f"kohya key {key!r} is not a LoRA or LyCORIS key sdlora reads (allowed endings: "
                            f"{', '.join('.' + x for x in _SUFFIXES[::-1])}; Tucker (hada_t1, lokr_t2) and other "
                            "LyCORIS kinds are not supported)")
        parts.setdefault(m["stem"], {})[m["kind"]] = t
    info = json.loads(meta.get("sdlora.modules", "{}"))
    record = RunRecord.from_metadata(meta)
    layout = record.unet_layout if record is not None else None
    labelled = meta.get("ss_base_model_version", "").startswith(LDM_FAMILY.name)
    unet = LDM_FAMILY.denoiser.kohya_prefix
    if record is None and not labelled and any(s.startswith(unet) and _is_ldm(s[len(unet):]) for s in parts):
        # kohya names the UNet by its original (LDM) blocks for SDXL alone: the keys say SDXL whatever a label says
        # (adapter/family.py reads it: the canonical names no longer show it)
        meta["ss_base_model_version"] = LDM_FAMILY.base_model_version("epsilon")
    family = record.family if record is not None else (family_from_metadata(meta) or (None,))[0]
    modules = {}
    for stem, p in sorted(parts.items()):
        if ("lora_down.weight" in p) != ("lora_up.weight" in p):
            raise UserError(f"kohya module {stem} has only one of lora_down / lora_up")
        cls = kind_of(set(p) - {"alpha"}, "kohya", stem)
        fused = _fused_naming(stem, family)  # (naming, denoiser part) where one kohya module may be several
        name = None if fused else canonical_from_kohya(stem, module_names, layout, family)
        own = info.get(name, {})
        record = cls.from_file_tensors({role: p.get(suffix) for role, suffix in cls.KOHYA_KEYS.items()}, "kohya", stem,
                                       shape=tuple(own["shape"]) if own.get("shape") else None)
        rank = record.alpha_rank()  # None: this kind applies no alpha here (LoKr with both factors full)
        alpha = float(p["alpha"]) if "alpha" in p and rank else (float(rank) if rank else None)
        scale = alpha / rank if rank else 1.0
        if scale != 1.0:
            record = record.scaled(scale)
        split = [(name, record)]
        if fused:
            naming, denoiser = fused
            split = split_kohya_module(stem, record, naming)
            if split is None:
                raise UserError(f"kohya key {stem!r}: not a kohya name of {family.title if family else 'an SD3'} "
                                f"transformer module ({naming.prefix}joint_blocks_N_x_block_attn_qkv, ...)")
            split = [(f"{denoiser}.{path}", part) for path, part in split]
        for name, part in split:
            own, part_rank = info.get(name, {}), part.alpha_rank()
            part_alpha = alpha if part is record or not part_rank else scale * part_rank  # alpha / rank kept
            modules[name] = replace(part, scale=own.get("scale", scale), alpha=own.get("alpha", part_alpha),
                                    trained_rank=own.get("rank", part_rank))
    return AdapterWeights(modules, meta)


# ------------------------------------------------------------------------------------------ files
def addnet_hashes(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them.

    Only the `ss_*` metadata takes part (they describe training and never change afterwards): the
    model hash is the SHA-256 of the tensor bytes after the header, the legacy hash the first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB of the serialised file.
    """
    from safetensors.torch import save

    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save({k: v.detach().contiguous().cpu() for k, v in sd.items()}, metadata=ss_meta or None)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def kohya_metadata(adapter: AdapterWeights, *, output_name: str, base_model_version: str | None = None,
                   tag_frequencies: dict[str, dict[str, int]] | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` keys that A1111, ComfyUI and model sites read, plus sdlora's own.

    What describes the run comes from its `RunRecord` (sdlora's adapters carry one); a file without one
    (another trainer's, `sdlora extract`'s) gets the defaults of its family (`adapter_family`: its modules, else
    `base_model_version`, else its own metadata)."""
    record = RunRecord.from_metadata(adapter.metadata)
    family, prediction = family_and_prediction(adapter, base_model_version)
    dim = network_dim(adapter)  # also every module's .alpha (to_kohya_state_dict)
    conv_ranks = Counter(m.rank for m in adapter.modules.values() if m.is_conv)
    network_args = {}
    if conv_ranks:
        network_args = {"conv_dim": str(conv_ranks.most_common(1)[0][0]), "conv_alpha": str(dim)}
    lycoris = {}  # LyCORIS' description of its kinds (kohya's own networks.lora has only LoRA)
    for m in adapter.modules.values():
        lycoris.update(m.NETWORK_ARGS)
    network_args.update(lycoris)
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith("sdlora.")}
    meta.update({
        "ss_network_module": "lycoris.kohya" if lycoris else family.kohya_network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),  # every module's .alpha; r / alpha is in the factors (to_kohya_state_dict)
        "ss_network_args": json.dumps(network_args) if network_args else "null",
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequencies or {}),
        "ss_training_comment": "trained with sdlora; per-module scales in lora_up / lora_down (one alpha = ss_network_dim)",
    })
    if record is not None:
        meta.update(record.kohya_fields())
        meta.update(record.modelspec_fields(title=output_name, lora=True))
    else:
        meta.update(family.kohya_base_fields(prediction))
        meta.update(family.modelspec(prediction, title=output_name, lora=True))
    meta = {k: v for k, v in meta.items() if v != ""}
    meta["sdlora.format"] = "kohya"
    return meta


def save_kohya(adapter: AdapterWeights, path: str | Path, *, base_model_version: str | None = None,
               output_name: str | None = None, tag_frequencies: dict[str, dict[str, int]] | None = None) -> dict[str, str]:
    """Write `adapter` as a kohya LoRA file, atomically; returns the metadata written. The output name is the
    run's `output.name` (from its record), else `output_name`, else the file's stem."""
    path = Path(path)
    record = RunRecord.from_metadata(adapter.metadata)
    name = output_name or (record.output_name if record is not None and record.output_name else path.stem)
    sd = to_kohya_state_dict(adapter, base_model_version)
    meta = kohya_metadata(adapter, base_model_version=base_model_version, output_name=name,
                          tag_frequencies=tag_frequencies)
    notes = sorted({m.KOHYA_NOTE for m in adapter.modules.values() if m.KOHYA_NOTE})  # see io.reader_notes
    if notes:
        meta["sdlora.readers"] = " ".join(notes)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(sd, meta)
    save_safetensors(path, sd, metadata=meta)
    return meta
