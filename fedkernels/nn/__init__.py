"""Drop-in layers and model surgery (inject LoRA, peft interop)."""

from fedkernels.nn.lora import LoRALinear, base_weight_view

__all__ = ["LoRALinear", "base_weight_view"]
