import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import model as M
import train
from conftest import examples, load_splits
from evaluate import main as evaluate_main
from twophase import average
from twophase.augment import BatchPreprocess
from twophase.loader import make_loader


def test_the_average_is_the_mean_of_the_weights_with_batch_norm_measured_anew(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "3", "--keep-last", "2"])
    out = tmp_path / "ck"
    kept = sorted(p.name for p in out.glob("epoch*.pt"))
    assert kept == ["epoch002.pt", "epoch003.pt"]  # the last two epochs
    sources = [torch.load(out / name, weights_only=True) for name in kept]
    average.main([str(out / n) for n in kept] + ["--out", str(out / "avg.pt"), "--device", "cpu"])
    averaged = torch.load(out / "avg.pt", weights_only=True)
    for key, value in averaged["model"].items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.allclose(value, (sources[0]["model"][key] + sources[1]["model"][key]) / 2), key

    # Batch norm: not the mean of the two runs' statistics, but one pass over the training images.
    net = M.build_model("resnet18", 3, weights="none")
    net.load_state_dict(averaged["model"])
    splits = load_splits(tmp_path / "data", 16)
    loader = make_loader(splits.train, 128, True, seed=0)  # the run's seed, shuffled
    batches = [(BatchPreprocess()(x), y) for x, y in loader]
    torch.optim.swa_utils.update_bn(batches, net)
    mean_of_means = (
        sources[0]["model"]["bn1.running_mean"] + sources[1]["model"]["bn1.running_mean"]
    ) / 2
    assert not torch.allclose(averaged["model"]["bn1.running_mean"], mean_of_means)
    for key in ("bn1.running_mean", "layer4.0.bn2.running_var"):
        assert torch.allclose(averaged["model"][key], net.state_dict()[key], atol=1e-6), key
    assert averaged["averaged"] == [str(out / n) for n in kept]
    evaluate_main(
        ["--ckpt", str(out / "avg.pt"), "--figures", str(tmp_path / "fig"), "--device", "cpu"]
    )


def test_a_checkpoint_named_twice_is_averaged_once_and_said(
    tiny_args, tmp_path, capsys, monkeypatch
):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "2", "--keep-last", "2"])
    out = tmp_path / "ck"
    monkeypatch.chdir(out)
    names = ["epoch001.pt", "./epoch001.pt", str(out / "epoch002.pt")]
    average.main(names + ["--out", "avg.pt", "--no-bn-update", "--device", "cpu"])
    said = capsys.readouterr().err
    assert "./epoch001.pt is epoch001.pt, given again: averaged once" in said
    assert "averaged 2 checkpoints" in said
    averaged = torch.load(out / "avg.pt", weights_only=True)
    assert averaged["averaged"] == [str(out / "epoch002.pt"), "epoch001.pt"]  # sorted, as given
    one, two = (torch.load(out / n, weights_only=True)["model"] for n in names[1:])
    key = "fc.weight"
    assert torch.allclose(averaged["model"][key], (one[key] + two[key]) / 2)


# One file's names: as given, relative, absolute, through .., a symbolic link, a hard link.
SPELLINGS = ("{i}.pt", "./{i}.pt", "../ck/{i}.pt", "{ck}/{i}.pt", "../ck/../ck/{i}.pt", "sym{i}.pt")
SPELLINGS += ("hard{i}.pt",)


@settings(max_examples=examples(30))
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(SPELLINGS)), min_size=1, max_size=8))
def test_each_file_is_averaged_once_however_often_and_however_it_is_named(tmp_path_factory, drawn):
    ck = tmp_path_factory.mktemp("names") / "ck"
    ck.mkdir()
    for i in range(3):
        (ck / f"{i}.pt").write_bytes(b"x")
        os.symlink(ck / f"{i}.pt", ck / f"sym{i}.pt")
        os.link(ck / f"{i}.pt", ck / f"hard{i}.pt")
    os.chdir(ck)
    names = [spelling.format(i=i, ck=ck) for i, spelling in drawn]
    files = [i for i, _ in drawn]
    kept = average.distinct_files(names)
    assert kept == [names[files.index(i)] for i in dict.fromkeys(files)]  # each first name


def test_the_average_replaces_only_an_average(tiny_args, tmp_path):
    """--out over a run's best.pt or a file of the user's is refused before any work; an average
    written before is replaced."""
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "2", "--keep-last", "2"])
    out = tmp_path / "ck"
    sources = [str(p) for p in sorted(out.glob("epoch*.pt"))]
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"my own")
    before = (out / "best.pt").read_bytes()
    for target, why in (
        (out / "best.pt", "a checkpoint that is not an average"),
        (mine, "not a checkpoint"),
    ):
        with pytest.raises(SystemExit, match=f"--out {target} holds {why}"):
            average.main(sources + ["--out", str(target), "--no-bn-update"])
    assert (out / "best.pt").read_bytes() == before and mine.read_bytes() == b"my own"
    for _ in range(2):
        average.main(sources + ["--out", str(out / "avg.pt"), "--no-bn-update"])
    assert torch.load(out / "avg.pt", weights_only=True)["averaged"] == sources


def test_an_average_keeps_which_run_it_is_of_and_the_images_it_validated_on():
    """best.pt where the average wins, and averaged.pt: evaluate.py validates them on the images
    the run chose by (--drop-copies' val_left_out, the held-out split's digest)."""
    from twophase.checkpoint import ABOUT, RUN_RECORD, averaged_checkpoint

    last = {key: "x" for key in ABOUT} | {"args": {}, "history": [], "phase": 2, "epoch": 3}
    last |= {key: [f"{key} of the run"] for key in RUN_RECORD}
    state = averaged_checkpoint(last, {"w": torch.ones(1)}, ["epoch002.pt", "epoch003.pt"])
    assert {key: state[key] for key in RUN_RECORD} == {key: last[key] for key in RUN_RECORD}
