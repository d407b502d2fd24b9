"""Models a user might bring with --model user_models:NAME (tests put this folder on PYTHONPATH)."""
import os
import signal

import torch
from torch import nn


def _faulty_on_rank1_call3(info, fault):
    """An MLP whose 3rd training forward pass on rank 1 passes its output through `fault`."""
    return _faulty_on_rank1_call(info, fault, 3)


def _faulty_on_rank1_call(info, fault, at: int):
    """An MLP whose forward pass number `at` on rank 1 passes its output through `fault`."""
    class Faulty(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info["num_classes"]))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            if self.calls == at and int(os.environ.get("PMI_RANK", "0")) == 1:
                return fault(out)
            return out
    return Faulty()


def raises_on_rank1_step3(info):
    def fault(out):
        raise RuntimeError("deliberate failure in the user's model")
    return _faulty_on_rank1_call3(info, fault)


def nan_on_rank1_step3(info):
    return _faulty_on_rank1_call3(info, lambda out: out * float("nan"))


def stops_on_rank1_step3(info):
    """Rank 1 stops itself (SIGSTOP, as a wedged node or a stuck filesystem would) in its 3rd step."""
    def fault(out):
        os.kill(os.getpid(), signal.SIGSTOP)
        return out
    return _faulty_on_rank1_call3(info, fault)


def drifts_on_rank1_step3(info):
    """Rank 1's parameters change behind the exchange's back in its 3rd step (a memory fault)."""
    model = None

    def fault(out):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        return out
    model = _faulty_on_rank1_call3(info, fault)
    return model


def tiny(info):
    """Two small layers (one matrix the low-rank compressors compress): fast for every compressor."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, info["num_classes"]))


def not_a_module(info):
    return 42


def half_precision(info):
    return nn.Linear(64, info["num_classes"]).to(torch.float64)


def big_mlp(info):
    """About 10M parameters (40 MB of weights), so writing a checkpoint takes measurable time."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3000), nn.ReLU(), nn.Linear(3000, 3000), nn.ReLU(),
                         nn.Linear(3000, info["num_classes"]))


def signals_on_rank1(info):
    """Rank 1 sends itself SIGUSR1 (as a scheduler would before preemption) in its Nth forward pass,
    N from the SIGNAL_AT_CALL environment variable; an ordinary MLP when it is unset."""
    at = int(os.environ.get("SIGNAL_AT_CALL", "0"))
    return _faulty_on_rank1_call(info, lambda out: os.kill(os.getpid(), signal.SIGUSR1) or out, at)


def poisons_on_rank1_step3(info):
    """Rank 1's first weight turns NaN in its 3rd step (its delta is non-finite at the next average)."""
    model = None

    def fault(out):
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
        return out
    model = _faulty_on_rank1_call3(info, fault)
    return model
