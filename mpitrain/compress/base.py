"""The interface every compressor implements, and the registry that names them."""
from __future__ import annotations


class Compressor:
    """Turns each rank's gradient share (in the layout's flat buffer) into the global mean, in place.

    The loop scales the loss by 1/world_size before backward, which costs nothing (it seeds
    autograd), so the buffer already holds each rank's share g_i / N and the global mean is the
    plain sum of the shares: no averaging pass over memory after the exchange. Every compressor
    here is linear or scale-equivariant, so compressing g_i / N is compressing g_i, scaled.

    `aggregate(step)` is the only place ranks exchange gradients. It must carry the layout's
    control words (`layout.control`, also shares) through one of its Allreduces, summed. `stats` holds what the metrics line reports
    about the last step (wire bytes are counted by comm, not here).
    """

    name = ""
    # Linear and shared across ranks: the trajectory depends on the residuals only through their
    # sum, so a checkpoint may store that sum once and resume exactly at any world size.
    linear = True
    # The residuals may be re-sharded (their sum stored once, each rank resuming from sum / N): the
    # sum of what all ranks will send stays that of the uninterrupted run. Exact when linear.
    reshardable = True
    # Biased compressors need error feedback to converge; --error-feedback auto turns it on for them.
    biased = True

    def __init__(self, layout, world, cfg):
        self.layout = layout
        self.world = world
        self.cfg = cfg
        self.stats: dict = {}
        self.error_feedback = cfg.error_feedback == "on" or (cfg.error_feedback == "auto" and self.biased)

    # Overlap with backward (--bucket-mb): `begin()` before backward, `ready(slot)` from each
    # matrix's post-accumulate-grad hook, `aggregate` then finishes what is in flight.
    overlaps = False

    def begin(self) -> None:
        pass

    def ready(self, slot) -> None:
        pass

    def aggregate(self, step: int) -> None:
        raise NotImplementedError

    def state_dict(self, copy: bool = True) -> dict:
        """{"local": this rank's arrays, "shared": arrays equal on every rank}; copy=False gives views
        of the live buffers, for a caller that copies them before the next step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    REGISTRY[cls.name] = cls
    return cls
