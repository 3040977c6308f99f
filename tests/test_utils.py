import torch

import utils


def test_totals_over_processes_count_exactly_past_float32s_range():
    """2**24 + 1 is the first integer float32 cannot hold: an epoch's image count or summed loss
    past it would be rounded."""
    big = 2**24 + 1
    assert utils.sum_over_processes(torch.tensor(big), big, torch.tensor(0.5)) == [big, big, 0.5]
    assert float(torch.tensor(big, dtype=torch.float32)) != big  # what float32 would have given
    # Apple's MPS has no float64: totals there are float32, exact up to 2**24 images.
    assert utils.totals_dtype(torch.device("mps")) == torch.float32


def test_before_the_process_group_exists_only_the_first_process_logs(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    utils.log("once")
    monkeypatch.setenv("RANK", "0")
    utils.log("once")
    assert capsys.readouterr().err == "once\n"
