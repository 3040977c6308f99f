"""jobs/slurm.sh's decisions, with stand-ins for srun, scontrol, python and torchrun: a run stopped
by a signal requeues the job, one that failed does not, every start is --resume auto's (which
tests/test_cluster.py tests), and under torchrun a worker's death restarts the workers."""

import os
import subprocess

import pytest

from conftest import REPO

# The training command's stand-in: logs its arguments, then ends as $ENDING says, as train.py
# would: "preempted" exits 75 leaving <out>/preempted; "preempted under torchrun" leaves the
# file but exits 1, as torchrun does when a worker exits 75; "failed" exits 1; "done" exits 0.
TRAINER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT
[ -n "$timeout" ] && echo "shutdown $timeout" >> "$CALLS"
case $ENDING in
    preempted) echo stopped > "$OUT/preempted"; exit 75 ;;
    "preempted under torchrun") echo stopped > "$OUT/preempted"; exit 1 ;;
    failed) exit 1 ;;
esac
"""


@pytest.fixture
def job(tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    out.mkdir()
    stand_ins = {
        "srun": 'exec "$@"\n',
        "scontrol": 'echo "scontrol $*" >> "$CALLS"\n',
        "python": TRAINER,
        "torchrun": TRAINER,
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"

    def run(ending, nproc=1):
        calls.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
        env |= {"ENDING": ending, "OUT": str(out), "NPROC": str(nproc), "SLURM_JOB_ID": "42"}
        result = subprocess.run(
            ["bash", "jobs/slurm.sh", "--data", "photos", "--out", str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.returncode, calls.read_text().splitlines()

    return run, out


def test_a_preempted_run_requeues_the_job_and_the_next_start_resumes(job):
    run, out = job
    status, calls = run("preempted")
    assert status == 0 and calls == [
        f"python train.py --data photos --out {out} --resume auto",
        "scontrol requeue 42",
    ]
    status, calls = run("done")  # the same command: the run in --out goes on
    assert status == 0 and calls == [f"python train.py --data photos --out {out} --resume auto"]


def test_under_torchrun_the_file_the_run_leaves_tells_a_preemption_from_a_failure(job):
    run, out = job
    status, calls = run("preempted under torchrun", nproc=2)
    assert calls[0] == (
        "torchrun --standalone --max-restarts 3 --nproc_per_node 2 train.py --data photos --out "
        f"{out} --resume auto"
    )
    assert status == 0 and calls[2] == "scontrol requeue 42"
    status, calls = run("failed", nproc=2)  # the file of the previous start does not count
    assert status == 1 and not any(call.startswith("scontrol") for call in calls)


def test_a_failed_run_is_not_requeued(job):
    run, _ = job
    status, calls = run("failed")
    assert status == 1 and len(calls) == 1


def test_under_torchrun_the_workers_get_the_time_the_job_leaves_before_its_limit(job):
    """torchrun passes a signal on to its workers and kills them 30 s later by default: not
    time enough for a validation and a save. The job gives them most of the 180 s that SLURM's
    --signal=TERM@180 leaves, and torchrun reads it from there."""
    from torch.distributed.launcher.api import LaunchConfig

    run, _ = job
    _, calls = run("preempted under torchrun", nproc=2)
    seconds = int(calls[1].removeprefix("shutdown "))
    assert 120 <= seconds < 180
    script = (REPO / "jobs" / "slurm.sh").read_text().splitlines()
    lead = next(line for line in script if "--signal=TERM@" in line)
    assert seconds < int(lead.rsplit("@", 1)[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(seconds))
        assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2).shutdown_timeout == seconds
