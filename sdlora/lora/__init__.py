"""LoRA layers, init schemes, injection and optimiser groups."""

from .groups import build_param_groups, trainable_count
from .inject import inject_all
from .layers import LoRAConv2d, LoRALayer, LoRALinear, adapters_disabled, lora_layers

__all__ = ["LoRAConv2d", "LoRALayer", "LoRALinear", "adapters_disabled", "build_param_groups", "inject_all",
           "lora_layers", "trainable_count"]
