"""One typed record of what a run trained: built once from the config and the loaded model, written into every
exported file (adapter, kohya file, merged folder, merged single file) and read back here, nowhere else.

Every metadata field of every export is derived from this record (`kohya_fields`, `modelspec_fields`), so a
value the trainer used (the prediction type the loss targeted, the resolution, the clip skip) is the value the
files say. In a safetensors header it is the JSON under `sdlora.run`; a merged diffusers folder holds it as
`sdlora_run.json`. Adapters written before the record existed are read from their older `sdlora.*` keys.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

METADATA_KEY = "sdlora.run"
FOLDER_FILE = "sdlora_run.json"
PREDICTION_TYPES = ("epsilon", "v_prediction")


LAYOUT_KEYS = ("layers_per_block", "down_block_types", "up_block_types")


def unet_layout(family, unet_config) -> dict | None:
    """The UNet config keys that kohya's original-block numbering depends on, for a family that uses it (SDXL)."""
    if family.kohya_unet_layout is None:
        return None
    return {k: v if isinstance(v := unet_config[k], int) else list(v) for k in LAYOUT_KEYS}


@dataclass(frozen=True)
class RunRecord:
    base_model: str  # what was loaded (model.path)
    base_model_version: str  # sd_v1 | sd_v2 | sd_v2_v | sdxl_base_v1-0
    prediction_type: str  # the training target actually used: epsilon | v_prediction
    resolution: int  # data.resolution (the bucket area budget is resolution²); the largest of several
    clip_skip: int  # text_encoder.clip_skip (1 = last layer)
    rank: int
    alpha: float  # initial alpha (learned per-module alphas are in sdlora.modules)
    conv_rank: int | None
    conv_alpha: float | None
    init: str
    scaling: str
    learnable_alpha: bool
    text_encoder_trained: bool
    mixed_precision: str
    seed: int
    output_name: str  # output.name
    steps: int = 0
    sdlora_version: str = ""
    created: str = ""
    zero_terminal_snr: bool = False  # the noise schedule was rescaled to zero terminal SNR (model.zero_terminal_snr)
    # The UNet's block structure where kohya numbers its original (LDM) blocks (SDXL): the loaded UNet's
    # layers_per_block, down_block_types, up_block_types; None for SD 1.x/2.x (and records from before it existed).
    unet_layout: dict | None = None
    config: dict = field(default_factory=dict, compare=False)  # the resolved config, for reports (never a path to open)
    # kohya's ss_tag_frequency, counted from the run's caption files when it started (export reads no files for it)
    tag_frequency: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_training(cls, cfg, comps, *, steps: int = 0) -> "RunRecord":
        """From the validated config and the loaded components (whose scheduler is the one the loss used)."""
        from sdlora import __version__

        return cls(base_model=str(comps.source), base_model_version=comps.base_model_version,
                   prediction_type=comps.prediction_type, zero_terminal_snr=comps.zero_terminal_snr,
                   resolution=cfg.top_resolution(),
                   clip_skip=cfg.text_encoder.clip_skip, rank=cfg.lora.rank, alpha=float(cfg.lora.alpha),
                   conv_rank=(cfg.lora.conv_rank or cfg.lora.rank) if cfg.lora.conv else None,
                   conv_alpha=float(cfg.lora.conv_alpha if cfg.lora.conv_alpha is not None else cfg.lora.alpha)
                   if cfg.lora.conv else None,
                   init=cfg.lora.init, scaling=cfg.lora.scaling, learnable_alpha=cfg.lora.learnable_alpha,
                   text_encoder_trained=cfg.text_encoder.train, mixed_precision=cfg.train.mixed_precision,
                   seed=cfg.train.seed, output_name=cfg.output.name, steps=steps, sdlora_version=__version__,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=cfg.to_dict(),
                   tag_frequency=caption_tag_frequency(cfg), unet_layout=unet_layout(comps.family, comps.denoiser.config))

    def at_step(self, steps: int) -> "RunRecord":
        return replace(self, steps=steps, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    # ------------------------------------------------------------------------------------------ writing
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_metadata(self) -> dict[str, str]:
        """safetensors header entries: the record, plus the flat sdlora.* keys older readers look for."""
        return {METADATA_KEY: self.to_json(), "sdlora.version": self.sdlora_version, "sdlora.rank": str(self.rank),
                "sdlora.alpha": str(self.alpha), "sdlora.base_model": self.base_model,
                "sdlora.base_model_version": self.base_model_version, "sdlora.prediction_type": self.prediction_type,
                "sdlora.zero_terminal_snr": str(self.zero_terminal_snr),
                "sdlora.steps": str(self.steps), "sdlora.created": self.created,
                "sdlora.config": json.dumps(self.config, sort_keys=True)}

    def write_folder(self, folder: str | Path) -> None:
        from sdlora.util.atomic import write_text

        write_text(Path(folder) / FOLDER_FILE, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @property
    def family(self):
        """The model family (architecture alone; `prediction_type` is the other half of `base_model_version`)."""
        from sdlora.model.families import family_of_version

        return family_of_version(self.base_model_version)[0]

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    def modelspec_fields(self, *, title: str, lora: bool) -> dict[str, str]:
        """ModelSpec 1.0.1 keys (A1111, ComfyUI, model sites), as kohya sd-scripts writes them."""
        return self.family.modelspec(self.prediction_type, resolution=self.resolution, title=title, lora=lora)

    def kohya_fields(self) -> dict[str, str]:
        """kohya's ss_* training keys that describe the run (the network shape keys come from the tensors)."""
        return {**self.family.kohya_base_fields(self.prediction_type), "ss_sd_model_name": Path(self.base_model).name,
                "ss_steps": str(self.steps), "ss_max_train_steps": str(self.steps),
                "ss_clip_skip": str(self.clip_skip), "ss_resolution": f"({self.resolution}, {self.resolution})",
                "ss_seed": str(self.seed), "ss_mixed_precision": self.mixed_precision,
                "ss_network_train_unet_only": str(not self.text_encoder_trained),
                "ss_zero_terminal_snr": str(self.zero_terminal_snr)}

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "RunRecord | None":
        """The record in a safetensors header; None for a file that sdlora did not train (another trainer's)."""
        if METADATA_KEY in meta:
            try:
                return cls(**json.loads(meta[METADATA_KEY]))
            except (ValueError, TypeError):
                return None
        return cls._from_legacy(meta)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "RunRecord | None":
        p = Path(folder) / FOLDER_FILE
        return cls(**json.loads(p.read_text(encoding="utf-8"))) if p.is_file() else None

    @classmethod
    def _from_legacy(cls, meta: dict[str, str]) -> "RunRecord | None":
        """Adapters from before the record: the resolved config under sdlora.config, version, steps."""
        try:
            cfg = json.loads(meta["sdlora.config"])
            version = meta.get("sdlora.base_model_version", "sd_v1")
            lora, model = cfg.get("lora", {}), cfg.get("model", {})
            prediction = meta.get("sdlora.prediction_type") or model.get("prediction_type") or (
                "v_prediction" if version == "sd_v2_v" else "epsilon")
            return cls(base_model=meta.get("sdlora.base_model", model.get("path", "")), base_model_version=version,
                       prediction_type=prediction, resolution=int(cfg.get("data", {}).get("resolution", 512)),
                       clip_skip=int(cfg.get("text_encoder", {}).get("clip_skip", 1)), rank=int(lora.get("rank", 0)),
                       alpha=float(lora.get("alpha", 0)), conv_rank=lora.get("conv_rank"),
                       conv_alpha=lora.get("conv_alpha"), init=lora.get("init", "zero"),
                       scaling=lora.get("scaling", "standard"), learnable_alpha=bool(lora.get("learnable_alpha")),
                       text_encoder_trained=bool(cfg.get("text_encoder", {}).get("train", True)),
                       mixed_precision=cfg.get("train", {}).get("mixed_precision", "no"),
                       seed=int(cfg.get("train", {}).get("seed", 0)), output_name=cfg.get("output", {}).get("name", ""),
                       steps=int(meta.get("sdlora.steps", 0) or 0), sdlora_version=meta.get("sdlora.version", ""),
                       created=meta.get("sdlora.created", ""), config=cfg)
        except (KeyError, ValueError, TypeError, AttributeError):
            return None


def caption_tag_frequency(cfg) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency from the caption files of the user's own config (`data.path` / `data.subsets`,
    each with its caption extension), read when the run starts."""

    captions = {}
    for subset in cfg.data_subsets():
        folder = Path(subset.path).expanduser() if subset.path else None
        if folder is not None and folder.is_dir():
            captions[folder.name] = [c.read_text(encoding="utf-8", errors="replace").strip()
                                     for c in sorted(folder.rglob(f"*{subset.caption_extension}"))]
    return tag_frequency(captions)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder, how often each comma-separated tag occurs."""
    out = {}
    for folder, captions in captions_by_folder.items():
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(t.strip() for t in caption.split(",") if t.strip())
        out[folder] = dict(counts)
    return out
