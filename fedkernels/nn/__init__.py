"""Drop-in layers and model surgery (inject LoRA, peft interop)."""

from fedkernels.nn.inject import LoRAConfig, find_targets, inject_lora, layer_index, lora_modules
from fedkernels.nn.lora import LoRALinear, base_weight_view
from fedkernels.nn.peft_interop import export_peft, exported_factors, from_peft, load_adapter

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "base_weight_view",
    "export_peft",
    "exported_factors",
    "find_targets",
    "from_peft",
    "inject_lora",
    "layer_index",
    "load_adapter",
    "lora_modules",
]
from fedkernels.nn.multi_lora import ClientRouter, MultiClientLoRA, MultiLoRALinear, to_multi_client  # noqa: E402

__all__ += ["ClientRouter", "MultiClientLoRA", "MultiLoRALinear", "to_multi_client"]
