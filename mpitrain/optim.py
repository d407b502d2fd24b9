"""The command's optimizers: momentum SGD, Adam and AdamW, identical on every rank.

Each is torch.optim's single-tensor update (the one torch runs for CPU tensors), operation for
operation, so a step gives the same bits as `torch.optim.SGD`/`Adam`/`AdamW` and their state
dicts are interchangeable (checkpoints keep torch's keys and groups). They exist because
constructing any `torch.optim` optimizer imports `torch._dynamo`: about 1.1 s of CPU on every rank
of every launch, more than the rest of a rank's start (`import torch` is 1.5 s). A user's loop on
the API keeps whatever torch optimizer it brings; these only need what the API reads from one:
`param_groups`, `state`, `step`, `zero_grad`, `state_dict`, `load_state_dict`."""
from __future__ import annotations

import torch

# torch.optim's own defaults and group keys, so that a state dict is the one torch writes
SGD_DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0, "weight_decay": 0.0, "nesterov": False,
                "maximize": False, "foreach": None, "differentiable": False, "fused": None}
ADAM_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                 "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                 "decoupled_weight_decay": False}
IMPLEMENTATIONS = ("foreach", "fused", "capturable", "differentiable")


class Optimizer:
    """One group of parameters and per-parameter state, in torch.optim's shapes."""
    defaults: dict

    def __init__(self, params, **settings):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no {', '.join(unknown)}")
        # torch's choices of implementation are kept in the groups (a state dict torch reads) but
        # only the single-tensor update exists here: asking for another must not pass in silence
        other = sorted(k for k in IMPLEMENTATIONS if settings.get(k))
        if other:
            raise TypeError(f"{type(self).__name__} runs torch's single-tensor update only; "
                            f"it takes no {', '.join(f'{k}=True' for k in other)}")
        self.param_groups = [{"params": list(params), **self.defaults, **settings}]
        self.state: dict[torch.Tensor, dict] = {}

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        for p in self.params():
            p.grad = None

    def step(self, closure=None):
        """One update of every parameter that has a gradient; `closure` (torch's): recomputes the
        loss first, with gradients on, and its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.update(p, p.grad if not group["maximize"] else -p.grad, group)
        return loss

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict):
        raise NotImplementedError

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self.params())}
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [index[p] for p in g["params"]]} for g in self.param_groups]}

    def load_state_dict(self, saved: dict):
        """torch's rules: the groups' settings are taken from `saved`, a step count stays where it
        is, every other state tensor takes its parameter's dtype and device."""
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict has a different number of parameters in its groups")
        params = self.params()
        at = {i: params[n] for n, i in enumerate(i for g in groups for i in g["params"])}
        self.param_groups = [{**g, "params": mine["params"]} for g, mine in zip(groups, self.param_groups)]
        self.state = {at[int(i)]: {k: v if k == "step" or not isinstance(v, torch.Tensor)
                                   else v.to(dtype=at[int(i)].dtype, device=at[int(i)].device)
                                   for k, v in s.items()} for i, s in saved["state"].items()}


class SGD(Optimizer):
    """torch.optim.SGD: v = mu v + (1 - dampening) g (v = g at the first step); p -= lr v."""
    defaults = SGD_DEFAULTS

    def update(self, param, grad, group):
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            state = self.state.setdefault(param, {})
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        param.add_(grad, alpha=-group["lr"])


class Adam(Optimizer):
    """torch.optim.Adam (AdamW: decoupled_weight_decay), amsgrad included."""
    defaults = ADAM_DEFAULTS

    def update(self, param, grad, group):
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        state = self.state.setdefault(param, {})
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on the host, as torch keeps it
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        step_size = lr / (1 - beta1 ** step)
        second = exp_avg_sq
        if group["amsgrad"]:
            second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        denom = (second.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 0.01, as torch's)."""
    defaults = {**ADAM_DEFAULTS, "weight_decay": 1e-2, "decoupled_weight_decay": True}
