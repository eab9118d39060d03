"""Ctrl-C and SIGTERM sent to the whole process group (as a terminal, docker stop or Slurm do),
DataLoader workers included, at each moment of a run: one line saying what is saved (also the
last line of train.log), exit 130/143, never 0, no traceback, no process left behind, and the
run resumes to exactly the metrics of an uninterrupted one.

The signal is sent from inside the function it is aimed at (the script runs with that function
wrapped), so it lands in the middle of a checkpoint write, a picture, the workers' start."""
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
WRAPPER = """
import importlib, os, signal, sys
sys.path.insert(0, {root!r})
import experiment2_cifar_cnn as exp

def aimed(real):
    calls = 0
    def call(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == {nth}:
            for _ in range({times}):
                os.killpg(os.getpgrp(), {sig})
        return real(*args, **kwargs)
    return call

owner = importlib.import_module({module!r})
*path, name = {attribute!r}.split(".")
for part in path:
    owner = getattr(owner, part)
setattr(owner, name, aimed(getattr(owner, name)))
exp.main(sys.argv[1:])
"""


def run_args(data, out, *more):
    return ["--data-dir", data, "--epochs", 3, "--batch-size", 20, "--workers", 2, "--seed", 7,
            "--out", out, *more]


def metrics(folder):
    with open(folder / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def script(*args, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_image_folder
    root = tmp_path_factory.mktemp("signals")
    data = make_image_folder(root / "data")
    r = script(*run_args(data, root / "full"))
    assert r.returncode == 0, r.stderr
    return data, metrics(root / "full")


def interrupted(args, target, sig=signal.SIGTERM, nth=1, times=1, cwd=None):
    """Runs the script in a process group of its own with target ("module:attribute") wrapped
    to send sig to the whole group at its nth call; returns (exit status, stdout, stderr) once
    every process of the group has ended."""
    module, attribute = target.split(":")
    code = WRAPPER.format(root=str(ROOT), module=module, attribute=attribute, nth=nth,
                          times=times, sig=int(sig))
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    out, err = proc.communicate(timeout=330)
    watchdog.cancel()
    deadline = time.time() + 30
    while time.time() < deadline:  # every worker of the group ends too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted run are still running")
    return proc.returncode, out, err


def assert_one_line(err, status, sig, says, folder=None):
    assert status == (143 if sig == signal.SIGTERM else 130), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    by = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert lines[0].startswith(f"interrupted by {by}: {says}"), err
    if folder is not None:  # train.log ends with the same line
        assert (folder / "train.log").read_text().splitlines()[-1] == lines[0]


@pytest.mark.parametrize("moment,target,nth,sig", [
    ("mid-epoch", "experiment2_cifar_cnn:training_step", 13, signal.SIGTERM),
    ("during evaluation", "experiment2_cifar_cnn:evaluate", 2, signal.SIGINT),
    ("inside torch.save of the first checkpoint", "torch:save", 1, signal.SIGTERM),
])
def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path, moment, target, nth,
                                                       sig):
    data, full = reference
    run = tmp_path / "run"
    status, out, err = interrupted(run_args(data, run), target, sig, nth)
    assert_one_line(err, status, sig, "last completed epoch is saved in", run)
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
    status, _, err = interrupted(run_args(data, run), "multiprocessing.process:BaseProcess.start",
                                 sig)
    assert_one_line(err, status, sig, "no epoch had finished, nothing to resume", run)
    assert sorted(p.name for p in run.iterdir()) == ["augmentations.png", "train.log"]
    retry = script(*run_args(data, run))
    assert retry.returncode == 0, retry.stderr
    assert metrics(run) == full


def test_interrupted_inside_a_picture_of_the_report(reference, tmp_path):
    data, full = reference
    run = tmp_path / "run"
    # the first picture drawn is augmentations.png, before the first epoch; the second curves.png
    status, _, err = interrupted(run_args(data, run), "matplotlib.figure:Figure.savefig", nth=2)
    assert_one_line(err, status, signal.SIGTERM, "all 3 epochs are saved in", run)
    assert f"--resume {run / 'last.pt'}" in err and metrics(run) == full
    assert not list(run.glob("*.tmp"))  # the picture under way was finished, none half-written
    again = script("--resume", run / "last.pt")
    assert again.returncode == 0, again.stderr
    assert all((run / name).stat().st_size > 0
               for name in ("curves.png", "confusion.png", "misclassified.png"))
    assert metrics(run) == full


@pytest.mark.parametrize("target,nth,says", [
    # matplotlib frees the last figure: the run's last moments, where weakref callbacks run
    ("matplotlib.pyplot:close", 4, "all 3 epochs are saved in"),
    # after the run has ended: everything is saved
    ("experiment2_cifar_cnn:RunLog.close", 1, "the run had finished"),
])
def test_a_signal_at_the_end_of_a_run_is_never_exit_status_0(reference, tmp_path, target, nth,
                                                             says):
    data, _ = reference
    status, _, err = interrupted(run_args(data, tmp_path / "run"), target, nth=nth)
    assert_one_line(err, status, signal.SIGTERM, says)


def test_a_second_signal_ends_the_run_at_once(reference, tmp_path):
    data, _ = reference
    run = tmp_path / "run"
    # both inside the first checkpoint's write: the first would let it finish, the second does not
    status, out, err = interrupted(run_args(data, run), "torch:save", times=2)
    assert_one_line(err, status, signal.SIGTERM, "no epoch had finished", run)
    assert "Epoch 1/3," not in out and not (run / "last.pt").exists()
    assert not (run / "metrics.csv").exists()


def test_interrupting_a_resume_while_it_decodes_says_what_the_checkpoint_holds(reference,
                                                                               tmp_path):
    data, full = reference
    run = tmp_path / "run"
    status, _, _ = interrupted(run_args(data, run), "experiment2_cifar_cnn:evaluate", nth=1)
    assert status == 143
    status, _, err = interrupted(["--resume", run / "last.pt"],
                                 "experiment2_cifar_cnn:read_image", nth=5)
    assert_one_line(err, status, signal.SIGTERM, "last completed epoch is saved in", run)
    assert "(epoch 1 of 3)" in err


@pytest.mark.parametrize("mode", [["--evaluate", "RUN/last.pt"], ["--benchmark", "--limit", 200]])
def test_modes_that_write_nothing_say_they_stopped(reference, tmp_path, mode):
    data, _ = reference
    run = tmp_path / "run"
    trained = script("--data-dir", data, "--epochs", 1, "--batch-size", 20, "--out", run)
    assert trained.returncode == 0, trained.stderr
    args = [str(run / "last.pt") if a == "RUN/last.pt" else a for a in mode]
    status, _, err = interrupted([*args, "--data-dir", data], "experiment2_cifar_cnn:read_image",
                                 signal.SIGINT, nth=3)
    assert_one_line(err, status, signal.SIGINT, f"{mode[0]} stopped; it writes nothing")


def test_the_printed_resume_command_works_when_pasted(reference, tmp_path):
    data, full = reference
    run = tmp_path / "a run folder"
    status, _, err = interrupted(run_args(data, run), "experiment2_cifar_cnn:evaluate", nth=2)
    assert status == 143
    command = err.strip().split("continue with: ")[1]
    pasted = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert pasted.returncode == 0, pasted.stderr
    assert metrics(run) == full


def test_a_closed_terminal_does_not_stop_training(reference, tmp_path):
    data, full = reference
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, run_args(data, run))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a run that hangs fails, not the test suite
    watchdog.start()
    first_lines = [proc.stdout.readline() for _ in range(2)]  # as `| head -2`
    proc.stdout.close()
    err = proc.stderr.read()
    status = proc.wait()
    watchdog.cancel()
    assert status == 0 and "Traceback" not in err, err
    assert first_lines[0].startswith("data:")
    assert metrics(run) == full and "Done: final test accuracy" in (run / "train.log").read_text()
