import urllib.error

import pytest
import torch
import torchvision

import model as M
from narrow import NarrowResNet
from utils import Problem


def test_head_is_he_normal_with_zero_bias():
    torch.manual_seed(0)
    net = M.build_model("resnet18", 100, weights="none")
    w = net.fc.weight
    assert tuple(w.shape) == (100, 512)
    expected_std = (2 / 512) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.03
    assert abs(w.mean().item()) < 0.003
    assert torch.count_nonzero(net.fc.bias) == 0


def test_any_resnet_family_name_builds_and_others_are_refused():
    assert {"resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2"} <= set(
        M.resnet_family_names()
    )
    assert M.build_model("resnext50_32x4d", 3, weights="none").fc.out_features == 3
    with pytest.raises(Problem, match="resnet34"):
        M.build_model("vit_b_16", 3, weights="none")


def test_local_state_dict_loads_everything_but_the_head(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = M.build_model("resnet18", 7, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert torch.equal(net.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert net.fc.out_features == 7

    # A checkpoint of this project (state under "model", compiled/DDP prefixes) loads too.
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "classes": ["x"]}, tmp_path / "ck.pt")
    net = M.build_model("resnet18", 2, weights=str(tmp_path / "ck.pt"))
    assert torch.equal(net.conv1.weight, source.conv1.weight)

    with pytest.raises(Problem, match="do not fit resnet34"):
        M.build_model("resnet34", 7, weights=str(tmp_path / "r18.pth"))


def test_weights_of_another_width_are_a_message_naming_the_shapes(tmp_path):
    """resnet50's weights into wide_resnet50_2: the same names, twice the width inside each
    block (a RuntimeError traceback from load_state_dict before)."""
    narrow, wide = NarrowResNet(8), NarrowResNet(16)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.models, "get_model", lambda name, weights=None: wide)
        patch.setattr(M, "resnet_family_names", lambda: ["wide"])
        with pytest.raises(
            Problem, match=r"do not fit wide .* layer1.0.conv1.weight is \(8, 64, 3, 3\) there"
        ):
            M.build_model("wide", 3, weights=str(tmp_path / "narrow.pth"))


def test_a_checkpoint_as_weights_brings_its_normalisation_and_says_what_it_is(tmp_path):
    source = torchvision.models.resnet18(num_classes=5)
    history = [{"phase": 2, "epoch": 1, "val_acc": 0.25}, {"phase": 2, "epoch": 2, "val_acc": 0.5}]
    checkpoint = {
        "model": source.state_dict(),
        "arch": "resnet18",
        "classes": list("abcde"),
        "img_size": 64,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
        "phase": 2,
        "epoch": 2,
        "history": history,
    }
    torch.save(checkpoint, tmp_path / "best.pt")
    weights = M.load_weights("resnet18", str(tmp_path / "best.pt"))
    assert weights.mean == (0.5, 0.4, 0.3) and weights.std == (0.2, 0.2, 0.2)
    assert len(weights.state) == len(source.state_dict()) - 2  # all but fc.weight and fc.bias
    assert (
        "resnet18 trained on 5 classes at 64 px, phase 2 epoch 2, val acc 0.5000" in weights.about
    )
    assert "120 tensors (all but the head)" in weights.about
    with pytest.raises(Problem, match="holds a resnet18, not a resnet34"):
        M.load_weights("resnet34", str(tmp_path / "best.pt"))
    net = M.build_model("resnet18", 3, weights)
    assert torch.equal(net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert net.fc.out_features == 3


def test_unknown_weights_name_is_a_clear_error():
    with pytest.raises(Problem, match="IMAGENET1K_V1"):
        M.build_model("resnet18", 3, weights="imagenet22k")


def test_failed_download_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(Problem) as exc:
        M.build_model("resnet18", 3, weights="imagenet")
    message = str(exc.value)
    assert "--weights PATH" in message and "TORCH_HOME" in message and "--weights none" in message


def test_phase_one_trains_only_the_head():
    net = M.build_model("resnet18", 4, weights="none")
    trainable = M.set_trainable(net, phase=1)
    head = {id(p) for p in net.fc.parameters()}
    assert {id(p) for p in trainable} == head
    assert all(not p.requires_grad for n, p in net.named_parameters() if not n.startswith("fc."))
    assert len(M.set_trainable(net, phase=2)) == len(list(net.parameters()))


def test_freeze_bn_keeps_batch_norm_in_eval_mode():
    net = M.build_model("resnet18", 4, weights="none")
    M.train_mode(net)
    assert net.bn1.training
    M.train_mode(net, freeze_bn=True)
    assert net.training and not net.bn1.training and not net.layer3[0].bn2.training


def test_ema_follows_each_step_as_computed_by_hand():
    """timm's ModelEmaV3 with warmup and buffers copied: after the n-th update the average moves
    by 1 - min(decay, 1 - (1 + n) ** -2/3) towards the weights; batch norm statistics are copied."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = M.EMA(net, decay=0.9)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update()
    d = 1 - 2 ** (-2 / 3)  # 0.37: the warmup, under the decay
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * (start + 1))
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))
    ema.updates = 1000  # long after the warmup: the decay itself
    before = ema.module[0].weight.detach().clone()
    ema.update()
    assert torch.allclose(ema.module[0].weight, 0.9 * before + 0.1 * net[0].weight)
    assert not ema.module[0].weight.requires_grad


def test_layer_wise_decay_gives_each_stage_its_rate():
    net = M.build_model("resnet18", 3, weights="none")
    groups = M.stage_groups(net, 1e-3, 0.5)
    assert [g["lr"] for g in groups] == [1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5]
    assert groups[0]["params"] == list(net.fc.parameters())
    assert groups[-1]["params"] == [net.conv1.weight, net.bn1.weight, net.bn1.bias]  # the stem
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_a_checkpoint_is_evaluated_with_the_weights_it_says_or_those_asked_for():
    weights, average = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    state = {"model": weights, "ema": {"model": average}, "eval_weights": "ema"}
    assert M.inference_weights(state) is average
    assert M.inference_weights(state, "weights") is weights
    assert M.inference_weights({**state, "eval_weights": "model"}) is weights
    with pytest.raises(Problem, match="no moving average"):
        M.inference_weights({"model": weights, "ema": None}, "ema")


def test_batch_norm_measured_at_the_test_size_serves_that_size_alone():
    state = {"arch": "resnet18", "classes": ["a", "b"], "eval_weights": "model"}
    state["model"] = M.build_model("resnet18", 2, weights="none").state_dict()
    measured = {"bn1.running_mean": torch.full((64,), 7.0)}
    state |= {"test_size": 80, "test_bn": measured, "test_bn_of": "model"}
    at_80 = M.model_from_checkpoint(state, torch.device("cpu"), side=80)
    at_64 = M.model_from_checkpoint(state, torch.device("cpu"), side=64)
    assert torch.equal(at_80.bn1.running_mean, measured["bn1.running_mean"])
    assert torch.equal(at_64.bn1.running_mean, state["model"]["bn1.running_mean"])
    state["test_bn_of"] = "ema"  # measured for the other weights: not these
    plain = M.model_from_checkpoint(state, torch.device("cpu"), side=80)
    assert torch.equal(plain.bn1.running_mean, state["model"]["bn1.running_mean"])
