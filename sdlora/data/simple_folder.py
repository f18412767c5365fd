"""A minimal image-folder dataset (images + same-name .txt captions, centre-cropped squares).

Stand-in until the full pipeline (sources, buckets, caches) lands; the trainer uses it through
`build_dataset` / `collate` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    return ImageOps.fit(img, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, folder: str, resolution: int):
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"data.path: no such folder: {root}")
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise UserError(f"data.path: {root} holds no images ({', '.join(IMAGE_EXTS)})")
        self.resolution = resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        img = center_crop_resize(Image.open(path).convert("RGB"), self.resolution)
        cap = path.with_suffix(".txt")
        caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""
        return {"pixel_values": to_tensor(img), "caption": caption, "loss_weight": 1.0}


def collate(items):
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "loss_weight": torch.tensor([it["loss_weight"] for it in items], dtype=torch.float32),
    }
