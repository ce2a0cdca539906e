"""Server side: one Flower strategy per method (each a thin layer over :mod:`fedlora.algebra`) and the ServerApp."""

from .fedit import FedIT

STRATEGIES = {"fedit": FedIT}


def get(name: str):
    return STRATEGIES[name]
