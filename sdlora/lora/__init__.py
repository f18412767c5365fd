"""Adapter layers (LoRA, DoRA, LoHa, LoKr), init schemes, injection and optimiser groups."""

from sdlora.lora.groups import build_param_groups, trainable_count
from sdlora.lora.inject import inject_all
from sdlora.lora.layers import AdapterLayer, LoRAConv2d, LoRALayer, LoRALinear, adapters_disabled, lora_layers

__all__ = ["AdapterLayer", "LoRAConv2d", "LoRALayer", "LoRALinear", "adapters_disabled", "build_param_groups", "inject_all",
           "lora_layers", "trainable_count"]
