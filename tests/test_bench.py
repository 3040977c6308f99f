import math
import sys

import pytest
import torch

import train
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402
import profile_train  # noqa: E402

TINY_BENCH = "--img-size 32 --batch-size 4 --steps 1 --repeats 1 --workers 0".split()


def table_rows(table):
    return {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line and "measurement" not in line
    }


def test_the_benchmark_runs_every_cpu_section_on_a_tiny_setup(tmp_path, capsys, narrow_models):
    sections = "pipeline,train,predict,cache"
    bench.main(["--workdir", str(tmp_path), "--n", "12", *TINY_BENCH, "--sections", sections])
    rows = table_rows(capsys.readouterr().out)
    for name in (
        "input pipeline, released code path",
        "input pipeline, cached path",
        "input-bound ratio, Phase 1",
        "input-bound ratio, Phase 2",
        "predict",
        "cache build, 24 images, memory growth while building (MiB)",
    ):
        assert name in rows, name
        assert math.isfinite(float(rows[name])) and float(rows[name]) >= 0, (name, rows[name])


def test_the_benchmark_sets_each_phase_up_as_training_does(tmp_path, monkeypatch, narrow_models):
    """Table 1 reaches the benchmark through train.phase_setup: a changed default shows there."""
    built = []
    real = train.phase_setup

    def spy(number, args, model, device):
        built.append((number, args.lr1 if number == 1 else args.lr2, args.optimizer2))
        return real(number, args, model, device)

    monkeypatch.setattr(train, "phase_setup", spy)
    monkeypatch.setattr(
        bench, "RECIPE", train.parse_args(["--lr2", "7e-4", "--optimizer2", "sgd"])[0]
    )
    bench.main(["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--sections", "train"])
    assert built == [(1, 5e-4, "sgd"), (2, 7e-4, "sgd")]


def test_the_augmentation_asks_of_the_device_what_benchmarks_md_reports():
    """Exact counts, not timings: a change that adds passes over the batch shows here."""
    args = bench.get_args_parser().parse_args(["--img-size", "224", "--batch-size", "72"])
    (_, ops, _), (_, traffic_mb, _) = bench.augmentation_device_work(args)
    assert ops <= 75 and traffic_mb <= 2100, (ops, traffic_mb)  # 72 and 2041 in BENCHMARKS.md


def test_busy_time_counts_overlapping_work_once_and_idle_gaps_between():
    intervals = [(0, 4), (2, 6), (10, 11), (11.05, 12)]  # microseconds, as in a trace
    assert profile_train.union_length(intervals) == pytest.approx(6 + 1 + 0.95)
    assert profile_train.gaps(intervals, at_least=1) == [4]  # 6 -> 10; the 0.05 gap is too short


def test_the_profile_runs_on_the_cpu(tmp_path, capsys, narrow_models):
    trace = tmp_path / "trace"
    profile_train.main(
        ["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--trace", str(trace)]
    )
    out = capsys.readouterr().out
    assert "== Phase 1" in out and "== Phase 2" in out
    assert "(training thread): in PyTorch ops" in out
    assert sorted(p.name for p in trace.iterdir()) == ["phase1.json.gz", "phase2.json.gz"]


def layout_of(tensor):
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last)
    return "channels_last" if channels_last and not tensor.is_contiguous() else "contiguous"


@pytest.mark.parametrize(
    "flag, layout", [("--channels-last", "channels_last"), ("--no-channels-last", "contiguous")]
)
def test_the_training_benchmark_measures_the_layout_it_is_given(
    tmp_path, monkeypatch, flag, layout
):
    seen = set()

    def spy(net, batches, preprocess, *args, **kwargs):
        if isinstance(batches, list):  # the model-only steps: batches already preprocessed
            seen.add(("weights", layout_of(net.conv1.weight)))
            seen.add(("batch", layout_of(batches[0][0])))

    monkeypatch.setattr(train, "train_one_epoch", spy)
    args = ["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--img-size", "16"]
    bench.main(args + ["--sections", "train", flag])
    assert seen == {("weights", layout), ("batch", layout)}
