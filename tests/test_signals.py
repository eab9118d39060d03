"""Ctrl-C and SIGTERM sent to the whole process group (as a terminal, docker stop or Slurm do),
DataLoader workers included, at each moment of a run: one line, exit 130/143, no traceback, no
process left behind, and the run resumes to exactly the metrics of an uninterrupted one."""
import csv
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

SCRIPT = str(ROOT / "experiment2_cifar_cnn.py")
# the script with some of its functions announcing themselves and then taking a second, so that
# a signal can be aimed at them
WRAPPER = """
import sys, time
sys.path.insert(0, {root!r})
import experiment2_cifar_cnn as exp

def announced(name, real):
    def slow(*args, **kwargs):
        print("MARK " + name, flush=True)
        time.sleep(1.0)
        return real(*args, **kwargs)
    return slow

for name in {names!r}:
    setattr(exp, name, announced(name, getattr(exp, name)))
exp.main(sys.argv[1:])
"""


def run_args(data, out):
    return ["--data-dir", data, "--epochs", 3, "--batch-size", 20, "--workers", 2, "--seed", 7,
            "--log-every", 1, "--out", out]


def metrics(folder):
    with open(folder / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def script(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_image_folder
    root = tmp_path_factory.mktemp("signals")
    data = make_image_folder(root / "data")
    r = script(*run_args(data, root / "full"))
    assert r.returncode == 0, r.stderr
    return data, metrics(root / "full")


def interrupt(args, marker, sig, patched=(), nth=1):
    """Runs the script in a session of its own, sends sig to the whole group once the nth line
    starting with marker is printed; returns (exit status, stdout, stderr)."""
    code = WRAPPER.format(root=str(ROOT), names=tuple(patched))
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    seen, printed = 0, []
    for line in proc.stdout:
        printed.append(line)
        seen += line.startswith(marker)
        if seen == nth:
            os.killpg(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=300)
    watchdog.cancel()
    assert seen == nth, "".join(printed) + out + err
    deadline = time.time() + 30
    while time.time() < deadline:  # every worker of the group ends too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted run are still running")
    return proc.returncode, "".join(printed) + out, err


def assert_one_line(err, status, sig, says):
    assert status == (143 if sig == signal.SIGTERM else 130), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    by = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert lines[0].startswith(f"interrupted by {by}: {says}"), err


@pytest.mark.parametrize("moment,marker,patched,nth,sig", [
    ("mid-epoch", "Epoch 2, Batch 3:", (), 1, signal.SIGTERM),
    ("during evaluation", "MARK evaluate", ("evaluate",), 2, signal.SIGINT),
    ("during the checkpoint write", "MARK save_checkpoint", ("save_checkpoint",), 1,
     signal.SIGTERM),
])
def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path, moment, marker,
                                                       patched, nth, sig):
    data, full = reference
    run = tmp_path / "run"
    status, out, err = interrupt(run_args(data, run), marker, sig, patched, nth)
    assert_one_line(err, status, sig, "last completed epoch is saved in")
    assert f"--resume {run / 'last.pt'}" in err
    done = metrics(run)
    assert 1 <= len(done) < 3 and done == full[:len(done)]
    assert out.count("Epoch 1/3,") == 1  # the epoch being saved when the signal came is logged
    resumed = script("--resume", run / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == full


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_while_the_workers_start_leaves_a_folder_a_retry_may_use(reference, tmp_path,
                                                                             sig):
    data, full = reference
    run = tmp_path / "run"
    status, _, err = interrupt(run_args(data, run), "MARK start_worker", sig, ("start_worker",))
    assert_one_line(err, status, sig, "no epoch had finished, nothing to resume")
    assert sorted(p.name for p in run.iterdir()) == ["augmentations.png", "train.log"]
    retry = script(*run_args(data, run))
    assert retry.returncode == 0, retry.stderr
    assert metrics(run) == full


def test_interrupted_while_the_pictures_are_drawn(reference, tmp_path):
    data, full = reference
    run = tmp_path / "run"
    # the first picture, augmentations.png, is drawn before the first epoch
    status, _, err = interrupt(run_args(data, run), "MARK save_figure", signal.SIGTERM,
                               ("save_figure",), nth=2)
    assert_one_line(err, status, signal.SIGTERM, "all 3 epochs are saved in")
    assert f"--resume {run / 'last.pt'}" in err and metrics(run) == full
    pictures = sorted(p.name for p in run.iterdir() if p.suffix in (".png", ".tmp"))
    assert pictures == ["augmentations.png"]  # none half-written
    again = script("--resume", run / "last.pt")
    assert again.returncode == 0, again.stderr
    assert all((run / name).stat().st_size > 0
               for name in ("curves.png", "confusion.png", "misclassified.png"))
    assert metrics(run) == full
