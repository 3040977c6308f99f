"""Phase II's regularisers beyond the report (twophase/regularise.py): L2-SP's pull towards the
weights a run started from, and SAM's second gradient; each as its paper defines it, through
train.py's one step loop, and the same on a continued run."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import model as M
import train
from conftest import TINY, examples, make_dataset, narrowed, stop_at
from test_distributed import forked_ddp
from twophase.loss import Loss, loss_of
from twophase.regularise import L2SP, SAM, running_stats_kept
from twophase.resolve import resolve
from twophase.schedule import Phase
from twophase.tally import EpochTally

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


def test_a_run_with_l2sp_and_sam_stopped_and_resumed_equals_an_uninterrupted_one(
    tiny_args, tmp_path, monkeypatch
):
    """Stopped after Phase I, at an epoch's end and in the middle of Phase II's second epoch:
    w0 is the run's --weights each time, not the weights it was stopped at."""
    levers = ["--weights", saved_weights(tmp_path / "w.pth"), "--l2sp", "1.0", "--sam", "0.1"]
    levers += ["--epochs1", "1", "--accum-steps", "2", "--batch-size", "2"]
    train.main(tiny_args + levers + ["--epochs2", "2"])
    (tmp_path / "ck").rename(tmp_path / "straight")
    last = tmp_path / "ck" / "last.pt"
    train.main(tiny_args + levers + ["--epochs2", "2", "--phase", "1"])
    train.main(["--resume", str(last), "--phase", "all", "--epochs2", "1"])
    with monkeypatch.context() as stop:  # 9 batches an epoch: Phase II's second, its 4th
        stop_at(stop, "step=4")
        with pytest.raises(SystemExit):
            train.main(["--resume", str(last), "--epochs2", "2"])
    stopped = last_state(last)
    assert (stopped["phase"], stopped["epoch"], stopped["step"]) == (2, 1, 4)
    assert stopped["l2sp_reference"] and stopped["args"]["sam"] == 0.1
    train.main(["--resume", str(last)])
    a, b = assert_same_run(tmp_path / "straight" / "last.pt", last)
    assert (b["phase"], b["epoch"]) == (2, 2) and a["l2sp_reference"] == b["l2sp_reference"]


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


def test_l2sp_and_sam_given_to_a_continued_run_apply_from_its_next_step(tiny_args, tmp_path):
    """Added to a run in Phase II (its optimizer's one group becomes the backbone's and the
    head's, each parameter keeping its state), changed, or dropped: the rest of the run trains as a
    fresh run given them would."""
    path = saved_weights(tmp_path / "w.pth")
    base = ["--weights", path, "--epochs1", "0"]
    train.main(tiny_args + base + ["--epochs2", "1"])
    last = tmp_path / "ck" / "last.pt"
    one = last_state(last)
    assert len(one["optimizer"]["param_groups"]) == 1
    train.main(["--resume", str(last), "--epochs2", "2", "--l2sp", "0.5", "--sam", "0.05"])
    two = last_state(last)
    assert (two["args"]["l2sp"], two["args"]["sam"]) == (0.5, 0.05)
    assert [g["weight_decay"] for g in two["optimizer"]["param_groups"]] == [0.0, 1e-4]
    assert two["optimizer"]["state"][0]["step"] == 2 * one["optimizer"]["state"][0]["step"]
    train.main(["--resume", str(last), "--epochs2", "3", "--l2sp", "0", "--sam", "0"])
    three = last_state(last)
    assert len(three["optimizer"]["param_groups"]) == 1 and "l2sp_reference" not in three


# ----------------------------------------------------------------------------- SAM


def sam_phase(model, rho, criterion=None, accum=1, clip=0.0, scaler=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Phase(
        number=2,
        epochs=1,
        optimizer=optimizer,
        peak_lrs=[0.1],
        schedule=lambda epoch: 1.0,
        image_size=lambda epoch: None,
        weight_decay=0.0,
        clip=clip,
        freeze_bn=False,
        mix=None,
        criterion=criterion or nn.CrossEntropyLoss(),
        dtype=None,
        scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
        accum_steps=accum,
        sam=SAM(rho),
    )


def steps(model, phase, batches):
    return list(
        train.optimizer_steps(model, iter(batches), len(batches), phase, None, EpochTally())
    )


def step_loss(weights, batches, criterion):
    """The loss a step of `batches` minimises at the linear layer's `weights`: the mean over its
    images (with class weights, the weighted mean over all of them)."""
    weight, bias = weights
    if isinstance(criterion, Loss) and criterion.weight is not None:
        sums = [criterion.sums(x @ weight.T + bias, y) for x, y in batches]
        return sum(s for s, _ in sums) / sum(w for _, w in sums)
    return sum(criterion(x @ weight.T + bias, y) for x, y in batches) / len(batches)


def sam_by_hand(layer, batches, criterion, rho, lr=0.1, clip=0.0):
    """Foret et al.'s step, written out: g at w, e = rho g/||g||, the gradient at w + e, w moved
    by plain SGD with it (clipped to `clip` where given)."""
    w = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias)]
    g = torch.autograd.grad(step_loss(w, batches, criterion), w)
    norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
    ascended = [(p + rho * x / norm).detach().requires_grad_() for p, x in zip(w, g)]
    g2 = torch.autograd.grad(step_loss(ascended, batches, criterion), ascended)
    if clip:
        total = torch.sqrt(sum(x.pow(2).sum() for x in g2))
        g2 = [x * min(1.0, clip / (total.item() + 1e-6)) for x in g2]
    return [(p - lr * x).detach() for p, x in zip(w, g2)]


def batches_of(n, images=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(images, 4, generator=generator),
            torch.randint(0, 3, (images,), generator=generator),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "accum, weighted, clip",
    [(1, False, 0.0), (2, False, 0.0), (1, True, 0.0), (3, True, 0.0), (2, False, 0.05)],
)
def test_a_sam_step_is_the_papers_two_step_update(accum, weighted, clip):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    criterion = Loss(weight=torch.tensor([1.0, 3.0, 0.5])) if weighted else nn.CrossEntropyLoss()
    batches = batches_of(accum)
    expected = sam_by_hand(layer, batches, criterion, rho=0.2, clip=clip)
    assert steps(layer, sam_phase(layer, 0.2, criterion, accum, clip), batches) == [accum]
    torch.testing.assert_close(layer.weight.detach(), expected[0])
    torch.testing.assert_close(layer.bias.detach(), expected[1])


def test_sam_updates_batch_norms_statistics_once_a_batch_from_the_weights_before_the_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    once = copy.deepcopy(net).train()
    batches = batches_of(4)
    with torch.no_grad():
        for x, _ in batches:  # one forward a batch, at the weights the steps start from
            once(x)
    assert steps(net, sam_phase(net, 0.5, accum=4), batches) == [4]
    bn, expected = net[1], once[1]
    assert bn.num_batches_tracked.item() == expected.num_batches_tracked.item() == 4
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
    counted = copy.deepcopy(net)
    with running_stats_kept(net):  # a forward within normalises alike, and changes nothing
        out = net(batches[0][0])
    assert bn.track_running_stats and bn.num_batches_tracked.item() == 4
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(out, counted(batches[0][0]))


def test_a_sam_step_whose_first_gradient_overflows_is_skipped_and_the_weights_kept():
    """Under a grad scaler, as fp16 trains: a first gradient with inf or nan makes the second so,
    and the scaler skips the step (lowering its scale), as it would skip a plain one."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    before = [p.detach().clone() for p in layer.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    images, labels = batches_of(1)[0]
    images[0, 0] = math.inf
    steps(layer, sam_phase(layer, 0.05, scaler=scaler), [(images, labels)])
    for p, q in zip(layer.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert scaler.get_scale() == 2.0**15


def test_two_processes_take_sam_and_l2sp_steps_together(tmp_path, narrow_models):
    """Under DDP, with accumulated batches and class weights: the second pass's all-reduce (at
    the step's last batch) and the class weights' sums over both processes meet, and the run
    ends on both with finite weights."""
    data = make_dataset(tmp_path / "data")
    argv = ["--data", data, *TINY, "--weights", saved_weights(tmp_path / "w.pth")]
    argv += ["--epochs1", "0", "--epochs2", "1", "--sam", "0.05", "--l2sp", "0.1"]
    argv += ["--accum-steps", "2", "--class-weights", "auto", "--out", tmp_path / "ck"]
    assert forked_ddp(argv, tmp_path) == [0, 0], (tmp_path / "rank1.log").read_text()
    state = last_state(tmp_path / "ck" / "last.pt")
    assert state["world_size"] == 2 and state["l2sp_reference"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- combinations


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    return saved_weights(tmp_path_factory.mktemp("weights") / "w.pth")


@settings(max_examples=examples(12))
@given(
    l2sp=st.sampled_from(["0", "0.01", "1"]),
    sam=st.sampled_from(["0", "0.05", "0.5"]),
    accum=st.integers(1, 3),
    class_weights=st.sampled_from(["none", "auto"]),
    mix=st.sampled_from([[], ["--mixup", "0.4"], ["--cutmix", "1.0"]]),
    from_file=st.booleans(),
    batches=st.integers(1, 5),
)
def test_any_combination_of_the_levers_steps_to_finite_weights(
    start_weights, l2sp, sam, accum, class_weights, mix, from_file, batches
):
    weights = start_weights if from_file else "none"
    argv = TINY + ["--weights", weights, "--l2sp", l2sp, "--sam", sam, "--accum-steps", str(accum)]
    args = resolve([*argv, "--class-weights", class_weights, *mix]).options
    torch.manual_seed(0)
    with narrowed():
        model = M.build_model("resnet18", 3, weights=weights)
    criterion = loss_of(args, ["a", "b", "c"], [4, 1, 2])
    phase = train.phase_setup(2, args, model, CPU, criterion, None)
    phase.set_rates(1)
    data = [(torch.randn(3, 3, 16, 16), torch.randint(0, 3, (3,))) for _ in range(batches)]
    done = steps(model, phase, data)
    assert done == [min(batches, k) for k in range(accum, batches + accum, accum)]
    for name, value in model.state_dict().items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    assert model.bn1.num_batches_tracked.item() == batches  # once a batch, SAM or not
    assert (phase.l2sp is not None, phase.sam is not None) == (l2sp != "0", sam != "0")
