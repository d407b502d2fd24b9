"""The command's optimizers (optim.py) against torch.optim: the same bits every step, state dicts
that load either way, and a training process that never imports torch._dynamo (their reason)."""

import pytest
import torch

from helpers import mpi
from mpitrain import optim

CASES = [
    (optim.SGD, torch.optim.SGD, {"lr": 0.1}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.25, "nesterov": False}),
    (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    (optim.Adam, torch.optim.Adam, {"lr": 1e-2}),
    (optim.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "betas": (0.8, 0.99)}),
    (optim.AdamW, torch.optim.AdamW, {"lr": 1e-2}),
    (optim.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.3, "eps": 1e-3}),
]


def params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (5,), (3, 2, 4)]]


def steps(optimizer, ps, first: int, last: int):
    """Seeded gradients (one parameter without a gradient at odd steps), a learning rate set per
    step as the loop sets it; the parameters and state after each step."""
    seen = []
    for step in range(first, last):
        g = torch.Generator().manual_seed(1000 + step)
        for i, p in enumerate(ps):
            p.grad = None if (i == 1 and step % 2) else torch.randn(p.shape, generator=g)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * 0.9
        optimizer.step()
        state = optimizer.state_dict()["state"]
        seen.append(([p.detach().clone() for p in ps],
                     {i: {k: v.clone() for k, v in s.items()} for i, s in sorted(state.items())}))
    return seen


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert sa[i][k].dtype == sb[i][k].dtype and torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("ours,theirs,settings", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_every_step_and_state_is_torch_optims_bit_for_bit(ours, theirs, settings):
    a, b = params(0), params(0)
    for x, y in zip(steps(ours(a, **settings), a, 0, 6), steps(theirs(b, **settings), b, 0, 6)):
        same(x, y)


@pytest.mark.parametrize("ours,theirs,settings", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_state_dicts_load_either_way_and_go_on_as_one_run(ours, theirs, settings):
    """Checkpoints written before these classes existed hold torch's state dicts, and the other way."""
    whole = params(1)
    reference = steps(theirs(whole, **settings), whole, 0, 6)
    for first, second in [(ours, theirs), (theirs, ours)]:
        ps = params(1)
        before = first(ps, **settings)
        steps(before, ps, 0, 3)
        after = second(ps, **settings)
        after.load_state_dict(before.state_dict())
        assert after.state_dict()["param_groups"] == before.state_dict()["param_groups"]
        for x, y in zip(steps(after, ps, 3, 6), reference[3:]):
            same(x, y)


def test_a_closure_is_evaluated_with_gradients_first_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = optim.SGD([w], lr=0.25)

    def closure():
        optimizer.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert loss.item() == 9.0 and w.item() == 3.0 - 0.25 * 6.0


def test_an_unknown_setting_and_a_mismatched_state_dict_are_refused():
    with pytest.raises(TypeError, match="takes no momentum"):
        optim.Adam(params(0), momentum=0.9)
    with pytest.raises(TypeError, match="single-tensor update only; it takes no fused=True"):
        optim.AdamW(params(0), fused=True)
    assert optim.SGD(params(0), foreach=None, lr=0.1).param_groups[0]["foreach"] is None  # torch's default passes
    with pytest.raises(ValueError, match="different number of parameters"):
        optim.SGD(params(0)[:2], lr=0.1).load_state_dict(optim.SGD(params(0), lr=0.1).state_dict())


# each rank writes, as it exits, whether torch._dynamo was imported, to a file of its own
WATCH = ("import atexit, os, runpy, sys; seen = os.path.join(sys.argv[1], f'dynamo-{os.getpid()}'); "
         "atexit.register(lambda: open(seen, 'w').write(str('torch._dynamo' in sys.modules))); "
         "sys.argv = ['mpitrain', *sys.argv[2:]]; runpy.run_module('mpitrain', run_name='__main__')")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_training_run_and_its_resume_never_import_torch_dynamo(tmp_path, optimizer):
    """torch._dynamo is what torch.optim costs a rank's start (optim.py): a check that it stays out."""
    flags = ["--optimizer", optimizer, "--run-dir", tmp_path, "--checkpoint-every", 2, "--eval-every", 2,
             "--grad-clip", 1.0]
    for steps_ in (2, 4):
        seen = tmp_path / f"seen-{steps_}"
        seen.mkdir()
        r = mpi(2, ["-c", WATCH, seen, "--steps", steps_, *flags])
        assert r.returncode == 0, r.stderr
        assert sorted(f.read_text() for f in seen.iterdir()) == ["False", "False"]
    assert (tmp_path / "checkpoints" / "ckpt-000000004.h5").exists()
