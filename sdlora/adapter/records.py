"""The exported record of one adapted module, one class per adapter kind (LoRA and DoRA here, LoHa and LoKr in
adapter/lycoris.py): its tensors as dataclass fields, their file keys, and the few questions export, inspect, merging
and the file readers ask of every kind (`delta_weight`, `rank`, `cast`, `scaled`, ...), so none of them asks which
kind a module is. Every scale (alpha / r, a learned alpha, rank-stabilised scaling) is folded into the tensors: any
loader reads scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from sdlora.adapter.algebra import as_matrix, balance_factors, factor_to_rank, factored_singular_values
from sdlora.errors import UserError
from sdlora.util.dtypes import HALF_DTYPES


@dataclass
class AdapterDelta:
    """What every kind's record answers. A kind adds its tensors as fields (so `replace` carries them wherever a
    record is rebuilt), names them in TENSORS (roles), maps roles to file key suffixes in NATIVE_KEYS and KOHYA_KEYS,
    lists in KEY_SETS the sets of roles a file may hold (one set, unless the kind has alternatives), and answers
    `delta_weight`, `rank` and `weight_shape`. Registered by name in `weights.KINDS`."""

    scale: float = field(default=1.0, kw_only=True)  # the effective scale contained in the tensors (for reports)
    alpha: float | None = field(default=None, kw_only=True)  # the module's alpha at export (learned or fixed)
    trained_rank: int | None = field(default=None, kw_only=True)  # the adapter's rank during training
    # The base weight's shape where the tensors do not show it (a conv weight LyCORIS stores flattened); None: derived.
    shape: tuple[int, ...] | None = field(default=None, kw_only=True)

    kind: ClassVar[str] = "abstract"
    TITLE: ClassVar[str] = "adapter"  # the kind's name in messages
    UPDATE: ClassVar[str] = ""  # what ΔW is, for messages: "whose update {UPDATE}"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    NATIVE_KEYS: ClassVar[dict[str, str]] = {}
    NATIVE_ALIASES: ClassVar[dict[str, str]] = {}  # other native suffixes a file may hold -> the NATIVE_KEYS one
    KOHYA_KEYS: ClassVar[dict[str, str]] = {}
    KEY_SETS: ClassVar[tuple[frozenset[str], ...] | None] = None  # None: exactly TENSORS
    NEEDS_BASE: ClassVar[bool] = False  # whether ΔW depends on the base weight (then `delta_weight(base)` needs it)
    FACTORED: ClassVar[bool] = False  # whether ΔW = up @ down exactly (fields down, up): merge/resize cut the factors
    NETWORK_ARGS: ClassVar[dict[str, str]] = {}  # LyCORIS' ss_network_args for a kohya file ({}: kohya's networks.lora)
    DIFFUSERS_READS: ClassVar[bool] = True  # whether StableDiffusionPipeline.load_lora_weights reads the native layout
    # Which kohya-layout readers do not compute this kind's file as sdlora does ("": ComfyUI, AUTOMATIC1111 and
    # diffusers all do): said at export and kept in the file's metadata (`io.reader_notes`).
    KOHYA_NOTE: ClassVar[str] = ""

    # -- per kind ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape: (out, in) or (out, in, kh, kw) (a flattened conv: (out, in·kh·kw))."""
        raise NotImplementedError

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW = W_adapted - W0 in the base weight's shape. A kind whose update depends on W0 (NEEDS_BASE) needs
        `base`; given, the result has its shape."""
        raise NotImplementedError

    def scaled(self, factor: float) -> "AdapterDelta":
        """The same record with ΔW multiplied by `factor` (how a file's alpha / rank is folded in)."""
        raise NotImplementedError

    def alpha_rank(self) -> int | None:
        """The rank loaders divide a kohya/LyCORIS file's `.alpha` by; None where the kind applies no alpha."""
        return self.rank

    def balanced(self) -> "AdapterDelta":
        """The same ΔW with the magnitude spread evenly over the tensors, for 16-bit files (see `balance_factors`)."""
        return self

    # -- rows of ΔW (kohya's SD3 names: q/k/v fused into one qkv, adaLN halves in the other order) --------------
    def row_blocks(self, sizes: list[int], where: str) -> list["AdapterDelta | None"]:
        """Records of consecutive row blocks of ΔW (`sizes` rows each, summing to its output size), each exactly
        its rows' update; None for a block whose update the factors show to be zero. A UserError naming `where`
        where the kind cannot be cut there."""
        raise UserError(f"{self.TITLE} module {where}: its update cannot be cut into row blocks")

    @classmethod
    def stack_rows(cls, parts: list["AdapterDelta | None"], sizes: list[int], where: str) -> "AdapterDelta":
        """One record whose ΔW is the parts' updates stacked on rows (a None part: `sizes[i]` zero rows), the
        inverse of `row_blocks`. A UserError naming `where` where the kind cannot hold them as one record."""
        raise UserError(f"{cls.TITLE} modules {where}: cannot be stacked into one module")

    def swapped_halves(self, where: str) -> "AdapterDelta":
        """The record whose ΔW has its two row halves exchanged (an adaLN projection's (shift, scale) <-> (scale,
        shift), model/mmdit_keys.py)."""
        half = self.weight_shape[0] // 2
        first, second = self.row_blocks([half, half], where)
        return type(self).stack_rows([second, first], [half, half], where)

    @staticmethod
    def _halves_swapped(t: torch.Tensor) -> torch.Tensor:
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first])

    def _rows_fields(self, rows: int) -> dict:
        """The report fields of a record cut or stacked to `rows` output rows (its own rank and alpha unknown)."""
        return {"alpha": None, "trained_rank": None, "shape": (rows, *self.shape[1:]) if self.shape is not None else None}

    # -- shared -----------------------------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the record holds, by role (a kind with alternatives leaves the absent roles out)."""
        return {role: t for role in self.TENSORS if (t := getattr(self, role)) is not None}

    @classmethod
    def accepts(cls, suffixes: set[str], layout: str) -> bool:
        """Whether a module whose keys end in `suffixes` (`layout`: diffusers or kohya) is one of this kind."""
        keys = cls.NATIVE_KEYS if layout == "diffusers" else cls.KOHYA_KEYS
        return any({keys[r] for r in roles} == suffixes for roles in (cls.KEY_SETS or (frozenset(cls.TENSORS),)))

    def cast(self, dtype: torch.dtype) -> "AdapterDelta":
        """Every tensor in `dtype`; for a 16-bit dtype balanced first (`balanced`)."""
        m = self.balanced() if dtype in HALF_DTYPES else self
        return replace(m, **{r: t.to(dtype) for r, t in m.tensors().items()})

    def spectrum(self, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔW as an (out, in·kh·kw) float64 matrix, its singular values): the dense SVD, for any kind."""
        delta = as_matrix(self.delta_weight(base))
        return delta, torch.linalg.svdvals(delta)

    def truncated(self, rank: int) -> tuple["AdapterDelta", float | None]:
        """(record at most `rank`, relative error) where a kind can be cut back (LoRA's rank-2r offset exports)."""
        return self, None

    def info(self) -> dict:
        """The report fields written beside the tensors (`sdlora.modules`)."""
        out = {"scale": self.scale, "alpha": self.alpha, "rank": self.trained_rank or self.rank}
        return out | ({"shape": list(self.shape)} if self.shape is not None else {})

    # File shapes: the in-memory tensors are written as they are unless a kind says otherwise.
    def file_tensor(self, role: str, layout: str) -> torch.Tensor:
        return getattr(self, role)

    def native_key(self, role: str, component: str) -> str:
        """The native-layout key suffix of `role` in `component` (unet, text_encoder, text_encoder_2)."""
        return self.NATIVE_KEYS[role]

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, torch.Tensor | None], layout: str, where: str, **info) -> "AdapterDelta":
        """The record from its tensors by role as a file of `layout` holds them (None for an absent alternative);
        `where` names the module for errors."""
        return cls(**tensors, **info)

    def in_shape_of(self, delta: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """`delta` reshaped to the base weight (if given, else `weight_shape`); a UserError if the sizes differ."""
        shape = tuple(base.shape) if base is not None else self.weight_shape
        if delta.numel() != torch.Size(shape).numel():
            raise UserError(f"{self.kind} update of shape {tuple(self.weight_shape)} does not fit the base weight "
                            f"{shape} (wrong --base?)")
        return delta.reshape(shape)


@dataclass
class ModuleDelta(AdapterDelta):
    """One module's LoRA update ΔW = up @ down. down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor

    kind: ClassVar[str] = "lora"
    TITLE: ClassVar[str] = "LoRA"
    UPDATE: ClassVar[str] = "is up @ down"
    FACTORED: ClassVar[bool] = True
    TENSORS: ClassVar[tuple[str, ...]] = ("down", "up")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {"down": "lora_A.weight", "up": "lora_B.weight"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = {"down": "lora_down.weight", "up": "lora_up.weight"}

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def low_rank_delta(self) -> torch.Tensor:
        """up @ down in the base weight's shape."""
        down, up = self.down, self.up
        if not self.is_conv:
            return up @ down
        r, cin, kh, kw = down.shape
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], cin, kh, kw)

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """up @ down: LoRA's update does not depend on the base weight."""
        return self.low_rank_delta()

    def scaled(self, factor: float) -> "ModuleDelta":
        return replace(self, up=(self.up.float() * factor).to(self.up.dtype))

    def balanced(self) -> "ModuleDelta":
        down, up = balance_factors(self.down, self.up)
        return replace(self, down=down, up=up)

    def spectrum(self, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """From the factors: the SVD of up @ down without forming it (QR of both, SVD of the r x r core)."""
        return as_matrix(self.up) @ as_matrix(self.down), factored_singular_values(self.down, self.up)

    def row_blocks(self, sizes, where):
        """up's rows cut; each block keeps only the rank components its rows use (a block-diagonal up, as
        `stack_rows` writes, gives back each part's own rank); None for a block of zero rows."""
        out, start = [], 0
        for n in sizes:
            up = self.up[start:start + n]
            start += n
            used = up.reshape(n, up.shape[1], -1).abs().sum((0, 2)) != 0
            out.append(replace(self, down=self.down[used], up=up[:, used], **self._rows_fields(n))
                       if bool(used.any()) else None)
        return out

    def swapped_halves(self, where):
        """up's row halves exchanged (the rank kept)."""
        return replace(self, up=self._halves_swapped(self.up))

    @classmethod
    def stack_rows(cls, parts, sizes, where):
        """down = the parts' downs stacked (rank R = the sum of theirs), up = their ups block-diagonal (out = the sum
        of `sizes`, R): up @ down = the parts' up_i @ down_i stacked, the zero blocks adding nothing."""
        present = [p for p in parts if p is not None]
        if len({type(p) for p in present}) != 1:
            raise UserError(f"modules {where}: {' and '.join(sorted({p.TITLE for p in present}))} in one fused module")
        first = present[0]
        up = first.up.new_zeros((sum(sizes), sum(p.rank for p in present), *first.up.shape[2:]))
        row = col = 0
        for p, n in zip(parts, sizes):
            if p is not None:
                up[row:row + n, col:col + p.rank] = p.up
                col += p.rank
            row += n
        return replace(first, down=torch.cat([p.down for p in present]), up=up, **first._rows_fields(sum(sizes)))

    def truncated(self, rank: int) -> tuple["ModuleDelta", float | None]:
        if self.rank <= rank:
            return self, None
        down, up, err = factor_to_rank(self.down, self.up, rank)
        return replace(self, down=down, up=up), err


@dataclass
class DoRADelta(ModuleDelta):
    """DoRA (Liu et al. 2024): W = m ⊙ V / ‖V‖_row with V = W0 + up @ down, the norm taken per output feature (each
    row of the (out, in·kh·kw) weight: the paper's column norm of its (in, out) matrix, peft's `weight_norm`).
    magnitude: (out,). Native layout: peft's `lora_magnitude_vector`, (out,) for Linear and (1, out, 1, 1) for conv;
    kohya/LyCORIS: `dora_scale`, (out, 1) or (out, 1, 1, 1), LyCORIS' output-axis (`wd_on_out`) layout."""

    magnitude: torch.Tensor | None = None

    kind: ClassVar[str] = "dora"
    TITLE: ClassVar[str] = "DoRA"
    UPDATE: ClassVar[str] = "depends on W0 and is not low-rank"
    TENSORS: ClassVar[tuple[str, ...]] = ("down", "up", "magnitude")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {**ModuleDelta.NATIVE_KEYS, "magnitude": "lora_magnitude_vector"}
    NATIVE_ALIASES: ClassVar[dict[str, str]] = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = {**ModuleDelta.KOHYA_KEYS, "magnitude": "dora_scale"}
    NEEDS_BASE: ClassVar[bool] = True
    FACTORED: ClassVar[bool] = False  # down, up are V's update; ΔW itself is dense
    NETWORK_ARGS: ClassVar[dict[str, str]] = {"algo": "lora", "dora_wd": "True", "wd_on_out": "True"}
    # ComfyUI (comfy/weight_adapter/base.py weight_decompose) divides an output-axis dora_scale by the norm of W0, not
    # of W0 + ΔV (measured: up to 49% of the largest update off, benchmarks/comfyui_check.py); AUTOMATIC1111
    # (network.py apply_weight_decompose) takes dora_scale on the input axis only; diffusers drops dora_scale.
    KOHYA_NOTE: ClassVar[str] = (
        "DoRA in the kohya layout is read exactly by LyCORIS and sdlora only: ComfyUI divides the output-axis "
        "dora_scale by the base weight's norm instead of ‖W0 + ΔV‖, AUTOMATIC1111 reads dora_scale on the input axis, "
        "diffusers drops it; for those, export merged-single-file (or the diffusers layout for diffusers)")

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise UserError("a DoRA update depends on the base weight; give the base model (--base)")
        from sdlora.adapter.functional import dora_weight

        w0 = base.detach().to(torch.float64).reshape(self.weight_shape)
        return dora_weight(w0, self.low_rank_delta().double(), self.magnitude.double()) - w0

    spectrum = AdapterDelta.spectrum  # ΔW is dense and depends on W0: no factored shortcut

    def row_blocks(self, sizes, where):
        """V's update and the magnitude cut by rows (the norm is per row, so each block is that block's DoRA);
        never None: a block with no update of V still rescales its rows."""
        out, start = [], 0
        for n in sizes:
            up = self.up[start:start + n]
            used = up.reshape(n, up.shape[1], -1).abs().sum((0, 2)) != 0
            used = used if bool(used.any()) else torch.ones_like(used)
            out.append(replace(self, down=self.down[used], up=up[:, used], magnitude=self.magnitude[start:start + n],
                               **self._rows_fields(n)))
            start += n
        return out

    def swapped_halves(self, where):
        return replace(self, up=self._halves_swapped(self.up), magnitude=self._halves_swapped(self.magnitude))

    @classmethod
    def stack_rows(cls, parts, sizes, where):
        """LoRA's stacking of V's updates, magnitudes concatenated: each row's norm is its own, so the stack is
        exactly the parts' DoRA. Every part must be there (rows without one would need ‖W0‖ as their magnitude)."""
        if any(p is None for p in parts):
            raise UserError(f"DoRA modules {where}: only some of the parts of one fused module are adapted; its other "
                            "rows would need the base weight's norms as their magnitude (adapt all, or export the "
                            "diffusers layout or a merged model)")
        m = super().stack_rows(parts, sizes, where)
        return replace(m, magnitude=torch.cat([p.magnitude for p in parts]))

    def native_key(self, role: str, component: str) -> str:
        """A text encoder's magnitude is `lora_magnitude_vector.weight` (the parameter's own name): transformers 5's
        `load_adapter`, which diffusers' `load_lora_weights` calls for text encoders, drops peft's saved form
        `lora_magnitude_vector` in silence (the UNet's goes through peft's loader, which reads both; measured with
        diffusers 0.42, peft 0.21, transformers 5: tests/test_dora.py)."""
        key = self.NATIVE_KEYS[role]
        return key + ".weight" if role == "magnitude" and component != "unet" else key

    def file_tensor(self, role: str, layout: str) -> torch.Tensor:
        if role != "magnitude":
            return getattr(self, role)
        lead = 1 if self.is_conv else 0
        if layout == "kohya":
            return self.magnitude.reshape(-1, 1, *([1] * 2 * lead))
        return self.magnitude.reshape(*([1] * lead), -1, *([1] * 2 * lead))

    @classmethod
    def from_file_tensors(cls, tensors, layout, where, **info):
        m, out = tensors["magnitude"], tensors["up"].shape[0]
        if m.numel() != out or (layout == "kohya" and m.shape[0] != out):
            raise UserError(f"DoRA module {where}: magnitude of shape {tuple(m.shape)} is not one value per output "
                            f"({out}); input-axis DoRA (LyCORIS' default without wd_on_out) is not supported")
        return cls(**{**tensors, "magnitude": m.reshape(out)}, **info)
