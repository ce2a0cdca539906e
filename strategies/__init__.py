"""Server side: one Flower strategy per method (each a thin layer over :mod:`fedlora.algebra`) and the ServerApp."""

from .fedit import FedIT
from .fedpipe import FedPipe
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .lora_fair import LoRAFAIR

STRATEGIES = {s.name: s for s in (FedIT, FLoRA, FFALoRA, LoRAFAIR, FlexLoRA, HetLoRA, FedPipe)}


def get(name: str):
    if name not in STRATEGIES:
        from fedlora.config import ConfigError

        raise ConfigError(f"strategy '{name}' is not available yet: choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[name]
