import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench  # noqa: E402


def test_the_benchmark_runs_every_cpu_section_on_a_tiny_setup(tmp_path, capsys):
    bench.main(["--workdir", str(tmp_path), "--n", "12", "--img-size", "32", "--batch-size", "4", "--steps", "1",
                "--repeats", "1", "--workers", "0", "--sections", "pipeline,train,predict,cache"])
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and "---" not in line and "measurement" not in line}
    for name in ("input pipeline, released code path", "input pipeline, cached path",
                 "input-bound ratio, Phase 1", "input-bound ratio, Phase 2", "predict",
                 "Phase 2 training, end to end, batches prepared in a background thread",
                 "cache build, 24 images, memory growth while building (MiB)"):
        assert name in rows, name
        assert math.isfinite(float(rows[name])) and float(rows[name]) >= 0, (name, rows[name])


def test_the_augmentation_asks_of_the_device_what_benchmarks_md_reports():
    """Exact counts, not timings: a change that adds passes over the batch shows here."""
    args = bench.get_args_parser().parse_args(["--img-size", "224", "--batch-size", "72"])
    (_, ops, _), (_, traffic_mb, _) = bench.augmentation_device_work(args)
    assert ops <= 75 and traffic_mb <= 2100, (ops, traffic_mb)  # 72 and 2041 in BENCHMARKS.md


def test_busy_time_counts_overlapping_work_once_and_idle_gaps_between():
    import profile_train

    intervals = [(0, 4), (2, 6), (10, 11), (11.05, 12)]  # microseconds, as in a trace
    assert profile_train.union_length(intervals) == pytest.approx(6 + 1 + 0.95)
    assert profile_train.gaps(intervals, at_least=1) == [4]  # 6 -> 10; the 0.05 gap is too short


def test_the_profile_runs_on_the_cpu(tmp_path, capsys):
    import profile_train

    profile_train.main(["--workdir", str(tmp_path), "--n", "10", "--img-size", "32", "--batch-size", "4",
                        "--steps", "1", "--workers", "0", "--trace", str(tmp_path / "trace")])
    out = capsys.readouterr().out
    assert "== Phase 1" in out and "== Phase 2" in out and "(training thread): in PyTorch ops" in out
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["phase1.json.gz", "phase2.json.gz"]


@pytest.mark.parametrize("flag, layout", [("--channels-last", "channels_last"), ("--no-channels-last", "contiguous")])
def test_the_training_benchmark_measures_the_layout_it_is_given(tmp_path, monkeypatch, flag, layout):
    import torch
    import train

    seen = set()

    def spy(net, batches, preprocess, *args, **kwargs):
        if isinstance(batches, list):  # the model-only steps: batches already preprocessed
            images = batches[0][0]
            for name, tensor in (("weights", net.conv1.weight), ("batch", images)):
                seen.add((name, "channels_last" if tensor.is_contiguous(memory_format=torch.channels_last)
                          and not tensor.is_contiguous() else "contiguous"))

    monkeypatch.setattr(train, "train_one_epoch", spy)
    bench.main(["--workdir", str(tmp_path), "--n", "10", "--img-size", "16", "--batch-size", "4", "--steps", "1",
                "--repeats", "1", "--workers", "0", "--sections", "train", flag])
    assert seen == {("weights", layout), ("batch", layout)}
