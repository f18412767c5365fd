"""The wheels a GPU machine without network needs for benchmarks/gpu_check.py, downloaded into .whl/ (git-ignored).

    python3 benchmarks/gpu_wheels.py            # here, with PyPI: about 17 MB into .whl/
    # there, in the `run` command, with carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl

The lent machines' image (/work/.library/device/KINDS.md: Python 3.12, torch 2.11 cu130, transformers 5.17,
accelerate, huggingface-hub 1.33, safetensors, numpy, pillow, scikit-learn, matplotlib, pytest, hypothesis) lacks
diffusers, pydantic and bitsandbytes; peft is carried at the version the tests ran with. transformers stays the
image's: 5.25 would need huggingface-hub >= 2.4 and more. bitsandbytes' wheel holds a library for every CUDA and ROCm
release (43 MB); the working tree that travels is limited to 64 MiB, so the copy kept here holds CUDA 13's libraries
and the CPU one only (the image's torch is built for CUDA 13.0).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["diffusers==0.42.1", "peft==0.21.2", "pydantic==2.13.4", "pydantic_core==2.46.4", "annotated-types==0.7.0",
          "typing-inspection==0.4.2", "typing-extensions==4.16.0", "importlib_metadata==8.7.0", "bitsandbytes==0.50.2"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
KEEP_NATIVE = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")


def trim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the native libraries of other CUDA / ROCm / XPU releases (RECORD kept consistent)."""
    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and base not in KEEP_NATIVE

    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not dropped(line.split(b",", 1)[0].decode()))
            dst.writestr(item, data)
    trimmed.replace(wheel)


def main() -> int:
    out = ROOT / ".whl"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), *WHEELS]
    subprocess.run(cmd, check=True)
    for wheel in out.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel)
    sizes = {w.name: w.stat().st_size for w in sorted(out.glob("*.whl"))}
    for name, size in sizes.items():
        print(f"{size / 2**20:6.1f} MiB  {name}")
    print(f"{sum(sizes.values()) / 2**20:6.1f} MiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
