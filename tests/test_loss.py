import pytest
import torch

import train
from conftest import NO_AUGMENT, TINY
from twophase.loss import class_weights, loss_of
from twophase.resolve import resolve


def test_a_weighted_loss_accumulated_over_two_batches_steps_as_one_batch_would(
    dataset, tmp_path, narrow_models
):
    weights = tmp_path / "w.csv"
    weights.write_text("cat,3\ndog,0.5\n")
    common = ["--data", str(dataset), *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn"]
    common += [*NO_AUGMENT, "--class-weights", str(weights)]
    train.main(common + ["--batch-size", "4", "--accum-steps", "2", "--out", str(tmp_path / "a")])
    train.main(common + ["--batch-size", "8", "--out", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / f / "last.pt", weights_only=True) for f in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_class_weights_are_inverse_frequencies_of_mean_one_or_a_files():
    args, _ = resolve(["--class-weights", "auto"])[:2]
    weights = class_weights("auto", ["a", "b", "c"], [10, 40, 0])
    assert weights.tolist() == pytest.approx([1.6, 0.4, 0.0])  # 1/10 : 1/40, mean 1 over a, b
    assert loss_of(args, ["a", "b", "c"], [10, 40, 0]).weight.tolist() == weights.tolist()
    assert class_weights("none", ["a"], [3]) is None


def test_a_class_weights_file_with_or_without_a_header_weighs_every_row(tmp_path, capsys):
    weights = tmp_path / "w.csv"
    for text in ("class,weight\ncat,5\neel,0.5\n", "cat,5\neel,0.5\n"):
        weights.write_text(text)
        assert class_weights(str(weights), ["cat", "dog", "eel"], None).tolist() == [
            5,
            1,
            0.5,
        ]
    assert (
        f"{weights} has no header: its line 1 (cat,5) is read as a row" in capsys.readouterr().err
    )


def test_a_bad_class_weights_file_is_refused_before_anything_is_written(tiny_args, tmp_path):
    weights = tmp_path / "w.csv"
    weights.write_text("class,weight\ncat,5\nzebra,2\ndog,heavy\neel,inf\n")
    with pytest.raises(SystemExit) as refused:
        train.main(tiny_args + ["--class-weights", str(weights)])
    message = str(refused.value)
    assert "line 3: 'zebra' is not one of the 3 classes" in message
    assert "line 4: 'heavy' is no finite number" in message
    assert "line 5: 'inf' is no finite number" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "data" / ".cache").exists()
