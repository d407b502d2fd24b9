"""The interface every compressor implements, and the registry that names them."""
from __future__ import annotations


class Compressor:
    """Turns each rank's gradients (in the layout's flat buffer) into the global average, in place.

    `aggregate(step)` is the only place ranks exchange gradients. It must carry the layout's
    control words (`layout.control`) through one of its Allreduces, summed, and leave them
    divided by the world size like the gradients. `stats` holds what the metrics line reports
    about the last step (wire bytes are counted by comm, not here).
    """

    name = ""

    def __init__(self, layout, world, cfg):
        self.layout = layout
        self.world = world
        self.cfg = cfg
        self.stats: dict = {}

    def aggregate(self, step: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    REGISTRY[cls.name] = cls
    return cls
