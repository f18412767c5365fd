"""Periodic merging (`lora.merge_every: N`), as ReLoRA does (Lialin et al. 2023, "ReLoRA: high-rank training
through low-rank updates"): every N optimiser steps each adapter's update s·B·A is added into its frozen base
weight and the adapter restarts (its init scheme drawn again, its factors' optimiser state dropped, so AdamW's
moments and step count start from zero for them), so the total update is a sum of rank-r pieces and can exceed r.

What is kept, and why:
- The merged pieces as fp32 factors beside the layer (`layer.merged_down` = [A_1; ...; A_k], `layer.merged_up` =
  [s_1·B_1 | ... | s_k·B_k], each scale as it was at its merge, a learnable alpha's included), not read back from
  the base weight, which may be stored in bf16/fp16. The export is the total update, exactly: the live adapter's
  factors concatenated with the pieces (rank (k+1)·r; `export.reduce_rank` cuts it back to r with the existing
  algebra and reports the share kept). `adapters_disabled()` subtracts the pieces, so the base model (output
  preservation's target, the embedding-norm penalty's reference) is still W0.
- Resume: a checkpoint holds the pieces (`merged.safetensors`); the restored run rebuilds W0 and adds the pieces
  back one by one with the same operation, in the same order, as the merges did, so the base weight is the same
  bits as the uninterrupted run's.
- Data parallelism: every process holds the same factors after each (all-reduced) update and draws the restart
  from the same generator (seeded by train.seed, the module's name and the step), so the replicas stay equal
  without any communication.

Not merged: the run's last step (it would change nothing but the file's rank). Refused, with one line
(`check_config`): kinds whose update a piece cannot carry exactly (DoRA's normalisation, LoHa's Hadamard and LoKr's
Kronecker products are not sums), the inits that offset the base weight (compensated, principal: each restart
would offset it again), a low-bit base (model.base_precision: its grid is far coarser than a piece), train.ema (an average across restarts averages unrelated adapters) and schedule-free
AdamW (its state is the iterate itself).
"""

from __future__ import annotations

import torch

from sdlora.errors import UserError
from sdlora.lora.init import initialise
from sdlora.lora.layers import LoRALayer

MERGED_FILE = "merged.safetensors"  # in each checkpoint folder, once a merge has happened
FACTOR_ROLES = ("down", "up")  # the tensors that restart; a learnable alpha keeps its value and its moments


def check_config(cfg) -> None:
    """One-line UserErrors for what periodic merging cannot carry (before anything loads)."""
    if not cfg.lora.merge_every:
        return
    if cfg.lora.type != "lora":
        raise UserError(f"lora.merge_every applies to lora.type lora, not {cfg.lora.type}: a merged {cfg.lora.type} "
                        "update is not a sum of pieces its file can hold exactly")
    if cfg.lora.init in ("compensated", "principal"):
        raise UserError(f"lora.merge_every does not apply to lora.init={cfg.lora.init}: each restart would offset the "
                        "base weight again (allowed: zero, orthogonal, orthonormal)")
    if cfg.model.base_precision != "full":
        raise UserError(f"lora.merge_every does not apply with model.base_precision={cfg.model.base_precision}: a "
                        "piece added into a low-bit weight would be rounded to its grid, far coarser than the update "
                        "(use model.base_precision: full)")
    if cfg.train.ema.enabled:
        raise UserError("lora.merge_every does not apply with train.ema: an average across restarts averages "
                        "unrelated adapters (turn one off)")
    if cfg.optim.optimizer == "adamw_schedulefree":
        raise UserError("lora.merge_every does not apply to optim.optimizer=adamw_schedulefree: its state is the "
                        "iterate itself, which a restart cannot reset (use adamw)")


def restart_seed(seed: int, name: str, step: int) -> int:
    """The restart generator's seed for module `name` at `step`: the same on every process and after a resume."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(f"{name}@{step}".encode())) % (2**63)


class PeriodicMerge:
    """Merges and restarts `layers` every `every` optimiser steps (`__call__(step)` where `due(step)`);
    `state_dict` / `load_state_dict` carry the merged pieces through checkpoints."""

    def __init__(self, layers: dict[str, LoRALayer], every: int, max_steps: int, seed: int, optimizer):
        for name, layer in layers.items():  # check_config refused the rest; a kind added later must say it merges
            if not isinstance(layer, LoRALayer) or type(layer).PARAMETER_ROLES != LoRALayer.PARAMETER_ROLES:
                raise UserError(f"lora.merge_every: {name} is a {type(layer).__name__}, which periodic merging cannot carry")
        self.layers, self.every, self.max_steps, self.seed = layers, every, max_steps, seed
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds it

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step < self.max_steps

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        for name, layer in self.layers.items():
            down, up = layer.live_factors()
            layer.merged_down = down if layer.merged_down is None else torch.cat([layer.merged_down, down], 0)
            layer.merged_up = up if layer.merged_up is None else torch.cat([layer.merged_up, up], 1)
            add_piece(layer, pieces(layer) - 1)
            gen = torch.Generator().manual_seed(restart_seed(self.seed, name, step))
            a, b, offset = initialise(layer.init_scheme, layer.base.weight.detach().flatten(1), layer.rank,
                                      layer.scale_value(), gen)
            assert offset is None  # check_config refused the offset inits
            layer.lora_A.copy_(layer._shape_a(a.float()))
            layer.lora_B.copy_(layer._shape_b(b.float()))
            for p in (p for n, p in layer.trainable_parameters().items() if layer.PARAMETER_ROLES[n] in FACTOR_ROLES):
                self.optimizer.state.pop(p, None)  # created again, zeroed, at the next update (lazily, as at step 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged pieces by `<module>.merged_down` / `.merged_up` (fp32, CPU); empty before the first merge."""
        return {f"{name}.merged_{side}": getattr(layer, f"merged_{side}").detach().cpu().contiguous()
                for name, layer in self.layers.items() if layer.merged_down is not None for side in FACTOR_ROLES}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Take the pieces of a checkpoint and add them into the (freshly built, W0) base weights again, in order."""
        known = {f"{name}.merged_{side}" for name in self.layers for side in FACTOR_ROLES}
        if unexpected := sorted(set(tensors) - known):
            raise UserError(f"--resume: checkpoint {where}: {MERGED_FILE} has the unexpected tensor {unexpected[0]} "
                            "(lora targets changed since it was saved?)")
        for name, layer in self.layers.items():
            down, up = tensors.get(f"{name}.merged_down"), tensors.get(f"{name}.merged_up")
            if down is None and up is None:
                continue
            a, b = layer.lora_A, layer.lora_B
            if (down is None or up is None or down.shape[1:] != a.shape[1:] or up.shape[0] != b.shape[0]
                    or up.shape[2:] != b.shape[2:] or down.shape[0] != up.shape[1] or down.shape[0] % layer.rank):
                raise UserError(f"--resume: checkpoint {where}: {MERGED_FILE}'s pieces of {name} do not fit this "
                                "config's adapter (lora.rank or the targets changed?)")
            if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
                raise UserError(f"--resume: checkpoint {where}: {MERGED_FILE}'s pieces of {name} hold non-finite values")
            layer.merged_down = down.to(a.device, torch.float32)
            layer.merged_up = up.to(b.device, torch.float32)
            for k in range(pieces(layer)):
                add_piece(layer, k)


def pieces(layer: LoRALayer) -> int:
    return 0 if layer.merged_down is None else layer.merged_down.shape[0] // layer.rank


def add_piece(layer: LoRALayer, k: int) -> None:
    """W' += s_k·B_k·A_k (piece k, from the kept fp32 factors, rounded once to the base weight's dtype): the one
    operation both a merge and a resume's replay run, so both give the same bits."""
    r = layer.rank
    down = layer.merged_down[k * r:(k + 1) * r].contiguous()
    up = layer.merged_up[:, k * r:(k + 1) * r].contiguous()
    w = layer.base.weight
    w += layer._dense(down, up).to(w.dtype)
