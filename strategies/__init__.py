"""Server side: one Flower strategy per method (each a thin layer over :mod:`fedlora.algebra`) and the ServerApp.

``STRATEGIES`` is the one registry of methods. What each supports is declared on its class
(``supports_mixed_ranks``, ``privacy_modes``, ``client_sends``) and checked by ``check_config``."""

from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedpipe import FedPipe
from .fedsa_lora import FedSALoRA
from .fedsvd import FedSVD
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .lora_fair import LoRAFAIR
from .rolora import RoLoRA

STRATEGIES = {s.name: s for s in (
    FedIT,
    FLoRA,
    FFALoRA,
    LoRAFAIR,
    FlexLoRA,
    HetLoRA,
    FedPipe,
    RoLoRA,
    FedSVD,
    FedSALoRA,
    FedExLoRA,
)}


def get(name: str):
    """The strategy class registered under ``name`` (a ConfigError naming the choices otherwise)."""
    if name not in STRATEGIES:
        from fedlora.config import ConfigError

        raise ConfigError(f"strategy '{name}' is not available yet: choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[name]
