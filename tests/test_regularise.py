"""Phase II's regularisers beyond the report (twophase/regularise.py): L2-SP's pull towards the
weights a run started from, as its paper defines it, through train.py's one step loop, and the
same on a continued run."""

from types import SimpleNamespace

import pytest
import torch

import model as M
import train
from conftest import TINY, narrowed, stop_at
from twophase.loss import loss_of
from twophase.regularise import L2SP
from twophase.resolve import resolve

CPU = torch.device("cpu")


def saved_weights(path, seed=1):
    """A narrow resnet18's state dict at `path`: the weights a run starts from (--weights)."""
    torch.manual_seed(seed)
    with narrowed():
        torch.save(M.build_model("resnet18", 3, weights="none").state_dict(), path)
    return str(path)


def backbone(model):
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("fc.")]


# ----------------------------------------------------------------------------- L2-SP


def test_the_l2sp_gradient_is_autograds_gradient_of_the_penalty_on_the_backbone_alone(
    tmp_path, narrow_models
):
    path = saved_weights(tmp_path / "w.pth")
    model = M.build_model("resnet18", 3, weights=path)
    with torch.no_grad():  # as after some training: away from where it started
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    alpha = 0.3
    l2sp = L2SP.of(SimpleNamespace(l2sp=alpha, arch="resnet18", weights=path), model)
    w0 = torch.load(path, weights_only=True)
    penalty = sum((p - w0[n]).pow(2).sum() for n, p in backbone(model)) * alpha / 2
    expected = dict(zip([n for n, _ in backbone(model)], torch.autograd.grad(penalty, l2sp.params)))
    loss_grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = loss_grads[n].clone()
    l2sp.pull()
    for n, p in model.named_parameters():
        if n.startswith("fc."):  # the new head: its own weight decay, no pull
            assert torch.equal(p.grad, loss_grads[n]), n
        else:
            torch.testing.assert_close(p.grad, loss_grads[n] + expected[n], msg=n)
    # Batch norm's running statistics are buffers: never pulled, nor among the parameters.
    assert {id(p) for p in l2sp.params} == {id(p) for _, p in backbone(model)}


@pytest.mark.parametrize("lr_decay", ["1", "0.7"])
def test_l2sp_turns_the_backbones_weight_decay_off_and_keeps_the_heads(lr_decay, tmp_path):
    path = saved_weights(tmp_path / "w.pth")
    args = resolve(TINY + ["--weights", path, "--l2sp", "0.01", "--lr-decay", lr_decay]).options
    with narrowed():
        model = M.build_model("resnet18", 3, weights=path)
    phase = train.phase_setup(2, args, model, CPU, loss_of(args), None)
    phase.set_rates(0)
    head = {id(p) for p in model.fc.parameters()}
    for group in phase.optimizer.param_groups:
        is_head = {id(p) for p in group["params"]} <= head
        assert group["weight_decay"] == (args.wd2 if is_head else 0.0)
        assert is_head or not {id(p) for p in group["params"]} & head  # the head is apart
    assert sum(len(g["params"]) for g in phase.optimizer.param_groups) == len(
        list(model.parameters())
    )
    without = train.phase_setup(2, args.replaced(l2sp=0.0), model, CPU, loss_of(args), None)
    without.set_rates(0)
    assert all(g["weight_decay"] == args.wd2 for g in without.optimizer.param_groups)
    assert (
        without.l2sp is None
        and train.phase_setup(1, args, model, CPU, loss_of(args), None).l2sp is None
    )


def last_state(path):
    return torch.load(path, weights_only=True)


def assert_same_run(a, b):
    a, b = last_state(a), last_state(b)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    return a, b


def test_a_run_with_l2sp_stopped_and_resumed_equals_an_uninterrupted_one(
    tiny_args, tmp_path, monkeypatch
):
    """Stopped after Phase I, at an epoch's end and in the middle of Phase II's second epoch:
    w0 is the run's --weights each time, not the weights it was stopped at."""
    levers = ["--weights", saved_weights(tmp_path / "w.pth"), "--l2sp", "1.0"]
    levers += ["--epochs1", "1", "--accum-steps", "2", "--batch-size", "2"]
    train.main(tiny_args + levers + ["--epochs2", "3"])
    (tmp_path / "ck").rename(tmp_path / "straight")
    last = tmp_path / "ck" / "last.pt"
    train.main(tiny_args + levers + ["--epochs2", "3", "--phase", "1"])
    train.main(["--resume", str(last), "--phase", "all", "--epochs2", "1"])
    with monkeypatch.context() as stop:  # 9 batches an epoch: Phase II's second, its 4th
        stop_at(stop, "step=4")
        with pytest.raises(SystemExit):
            train.main(["--resume", str(last), "--epochs2", "3"])
    stopped = last_state(last)
    assert (stopped["phase"], stopped["epoch"], stopped["step"]) == (2, 1, 4)
    assert stopped["l2sp_reference"] and stopped["args"]["l2sp"] == 1.0
    train.main(["--resume", str(last)])
    a, b = assert_same_run(tmp_path / "straight" / "last.pt", last)
    assert (b["phase"], b["epoch"]) == (2, 3) and a["l2sp_reference"] == b["l2sp_reference"]


def test_a_continued_run_whose_starting_weights_are_gone_or_changed_is_refused_naming_them(
    tiny_args, tmp_path
):
    path = saved_weights(tmp_path / "w.pth")
    train.main(tiny_args + ["--weights", path, "--l2sp", "0.1", "--epochs1", "0", "--epochs2", "1"])
    last = tmp_path / "ck" / "last.pt"
    saved = last.read_bytes()
    (tmp_path / "w.pth").rename(tmp_path / "elsewhere.pth")
    with pytest.raises(SystemExit, match=r"--weights .*w\.pth.* no file now: put it back"):
        train.main(["--resume", str(last), "--epochs2", "2"])
    assert last.read_bytes() == saved  # refused before anything was written
    saved_weights(tmp_path / "w.pth", seed=2)  # other weights under the run's name
    with pytest.raises(SystemExit, match="was pulled towards other weights than --weights"):
        train.main(["--resume", str(last), "--epochs2", "2"])
    assert last.read_bytes() == saved
    train.main(["--resume", str(last), "--epochs2", "2", "--l2sp", "0"])  # the way on
    assert last_state(last)["epoch"] == 2 and "l2sp_reference" not in last_state(last)


def test_l2sp_given_to_a_continued_run_applies_from_its_next_step(tiny_args, tmp_path):
    """Added to a run in Phase II (its optimizer's one group becomes the backbone's and the
    head's, each parameter keeping its state), changed, or dropped: the rest of the run trains as a
    fresh run given it would."""
    path = saved_weights(tmp_path / "w.pth")
    base = ["--weights", path, "--epochs1", "0"]
    train.main(tiny_args + base + ["--epochs2", "1"])
    last = tmp_path / "ck" / "last.pt"
    one = last_state(last)
    assert len(one["optimizer"]["param_groups"]) == 1
    train.main(["--resume", str(last), "--epochs2", "2", "--l2sp", "0.5"])
    two = last_state(last)
    assert two["args"]["l2sp"] == 0.5
    assert [g["weight_decay"] for g in two["optimizer"]["param_groups"]] == [0.0, 1e-4]
    assert two["optimizer"]["state"][0]["step"] == 2 * one["optimizer"]["state"][0]["step"]
    train.main(["--resume", str(last), "--epochs2", "3", "--l2sp", "0"])
    three = last_state(last)
    assert len(three["optimizer"]["param_groups"]) == 1 and "l2sp_reference" not in three
