"""The two-level exchange (--hierarchy node): the ranks of a node share memory, which is fast beside the
network between nodes, so they sum their gradients there first and cross the network once per
node rather than once per rank, each compressing only its share of the matrices.

One step on local rank l of a node with k ranks:
  1. node Reduce_scatter: l gets the node's sum of its share, a contiguous run of slots (shares
     balanced by size; the last share carries the control words);
  2. the compressor, built over that share alone, exchanges it with the ranks that hold the same
     share on the other nodes (`Node.network`): its selections, factors and residual are those of
     a flat exchange of the node sums, per share; error feedback is kept per node share;
  3. node Allgatherv: every rank of the node holds every share's result.
Network bytes per node are one rank's flat payload, not k; each rank's compression work is about
1/k of the flat one's. `bench hierarchy` measures both against --hierarchy flat.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..config import UsageError
from .base import Compressor


def shares(slots: list, parts: int) -> list[tuple[int, int]]:
    """The slots cut into `parts` contiguous runs [first, last) of at least one slot each, every cut
    where the running size comes nearest to its even share."""
    total, bounds, size, i = sum(s.numel for s in slots), [0], 0, 0
    for j in range(1, parts):
        target = total * j / parts
        while i < len(slots) - (parts - j) and abs(size + slots[i].numel - target) <= abs(size - target):
            size, i = size + slots[i].numel, i + 1
        if i == bounds[-1]:  # every share holds a slot
            size, i = size + slots[i].numel, i + 1
        bounds.append(i)
    return list(zip(bounds, bounds[1:] + [len(slots)]))


def pieces_numel(layout: dict) -> dict[str, int]:
    """Values a state_layout's keys hold (each a list of (name, shape))."""
    return {key: sum(int(np.prod(shape)) for _, shape in parts) for key, parts in layout.items()}


class NodeSharded(Compressor):
    """`inner` (a compressor class) run for this local rank's share of the slots, across the nodes."""

    two_level = True

    def __init__(self, inner: type[Compressor], layout, world, cfg):
        self.node = world.node()
        cut = shares(layout.slots, self.node.size)
        first, last = cut[self.node.rank]
        ends = [layout.slots[a].offset for a, _ in cut] + [layout.flat.numel()]  # the last share: + control words
        self.counts = np.diff(ends).tolist()
        self.part = layout.part(first, last)
        self.share = self.part.flat_np[:self.counts[self.node.rank]]
        self.inner = inner(self.part, self.node.network, dataclasses.replace(cfg, bucket_mb=0.0))
        self.name, self.biased = inner.name, inner.biased  # before the base class reads `biased`
        self.linear, self.reshardable = self.inner.linear, self.inner.reshardable
        super().__init__(layout, world, cfg)
        # every share's state layout, in share order: what a checkpoint holds is the flat one's
        self.layouts = [json.loads(t) for t in self.node.texts(json.dumps(self.inner.state_layout()))]
        sizes = [pieces_numel(lay) for lay in self.layouts]
        self.starts = {key: sum(s.get(key, 0) for s in sizes[:self.node.rank]) for key in sizes[self.node.rank]}
        self.sizes = sizes
        self.collected: dict = {}

    def aggregate(self, step: int) -> None:
        before = self.world.sent_bytes
        self.part.control.clear()  # a share without the control words carries zeros in its own
        self.node.reduce_scatter_(self.layout.flat_np, self.share, self.counts)
        self.inner.aggregate(step)
        network = self.node.network.take_sent_bytes()
        self.node.allgatherv_(self.share, self.layout.flat_np, self.counts)
        self.world.sent_bytes += network
        node = self.world.sent_bytes - before - network
        # what this node sent across the network, its ranks' bytes summed (8 bytes in shared memory)
        by_node = int(self.node.allreduce_(np.array([network], dtype=np.int64))[0])
        self.stats = {**self.inner.stats, "network_bytes": network, "node_bytes": node, "node_network_bytes": by_node}

    # -- checkpoints: the state of a flat compressor, each share's pieces in their place ---------
    def state_layout(self) -> dict:
        keys = dict.fromkeys(key for lay in self.layouts for key in lay)
        return {key: [(name, tuple(shape)) for lay in self.layouts for name, shape in lay.get(key, [])]
                for key in keys}

    def collect_state(self) -> None:
        """Every share's pieces of the shared state, end to end, on local rank 0 (rank 0 writes them):
        a collective, before a checkpoint reads `state_dict` there."""
        shared = self.inner.state_dict(copy=False).get("shared", {})
        self.collected = {key: self.node.gatherv(np.ascontiguousarray(shared[key]).reshape(-1),
                                                 [s.get(key, 0) for s in self.sizes])
                          for key in sorted(shared) if key in self.starts}

    def state_dict(self, copy: bool = True) -> dict:
        """The residual at full length, this share's piece in its place and zeros elsewhere: summed
        over a node's ranks it is the node's residual, and over all ranks the total, as a flat
        compressor's. The shared state as `collect_state` last gathered it (on local rank 0)."""
        inner = self.inner.state_dict(copy)  # the residual is copied into its place either way
        local, own = {}, inner.get("local", {})
        if "residual" in own:
            local["residual"] = np.zeros(sum(s.get("residual", 0) for s in self.sizes), dtype=np.float32)
            self.place(local["residual"], "residual")[:] = np.asarray(own["residual"]).reshape(-1)
        shared = {key: self.collected.get(key, value) for key, value in inner.get("shared", {}).items()}
        return {"local": local, "shared": shared}

    def place(self, whole: np.ndarray, key: str) -> np.ndarray:
        """This share's piece of a full-length state array."""
        start = self.starts[key]
        return whole.reshape(-1)[start:start + self.sizes[self.node.rank][key]]

    def load_state_dict(self, state: dict) -> None:
        """A flat compressor's state: this share's pieces. The residual rows of a node's ranks are summed
        first (one row held a piece of the node's residual each, or each the mean's equal part)."""
        local = dict(state.get("local", {}))
        if local.get("residual") is not None:
            whole = self.node.allreduce_(np.ascontiguousarray(local["residual"], dtype=np.float32).reshape(-1))
            local["residual"] = self.place(whole, "residual").copy()
        shared = {key: self.place(np.asarray(v), key).copy() if key in self.starts else v
                  for key, v in state.get("shared", {}).items()}
        self.inner.load_state_dict({"local": local, "shared": shared})


def wanted(cfg, layout, world) -> bool:
    """--hierarchy: flat; node (an error where it cannot run); auto: node when there are several nodes,
    each with several ranks, and it can run. A collective (the nodes' sizes), unless flat."""
    if cfg.hierarchy == "flat":
        return False
    sizes = world.allreduce_(np.array([world.local_size, -world.local_size], dtype=np.int64), op="max")
    equal, several = sizes[0] == -sizes[1], world.local_size < world.size
    why = ("the nodes hold different numbers of ranks" if not equal else
           "--compressor auto measures the flat exchange" if cfg.compressor == "auto" else
           "--average-every > 1 averages parameters through the flat exchange" if cfg.average_every > 1 else
           f"it runs on the CPU only for now, not on {layout.device.type}" if layout.device.type != "cpu" else
           f"the model has {len(layout.slots)} tensors, fewer than the {world.local_size} ranks of a node"
           if len(layout.slots) < world.local_size else None)
    if cfg.hierarchy == "node" and why:
        raise UsageError(f"--hierarchy node: {why}; use --hierarchy flat")
    return not why and (cfg.hierarchy == "node" or (cfg.hierarchy == "auto" and several and world.local_size > 1))
