"""Ctrl-C, SIGTERM and SIGHUP sent to the script's whole process group (as a terminal, docker stop
or Slurm do), its worker included, at each moment of its life: one line saying what is saved
(also the last line of train.log), exit status 130, 143 or 129, never 0, no traceback, no process
left behind, nothing half-written, and the run resumes to exactly the metrics of an uninterrupted
one.

The signal is sent from inside the function it is aimed at, so it lands in the middle of a
checkpoint write, a picture, the workers' start. The processes are forked from a server that has
imported the script (processes.py); its first seconds, the imports, run in a fresh interpreter."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import processes
from conftest import RUN, metrics, quick_pictures, run_main, trains
from processes import SCRIPT, Aim

WITH_A_WORKER = [*RUN, "--workers", 1]
EPOCH_LINE = re.compile(r"^Epoch (\d+)/3, ", re.M)
SAYS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM",
        signal.SIGHUP: "SIGHUP (the terminal closed)"}


# the runs resumed in this process draw blank pictures, as the processes do
pytestmark = pytest.mark.usefixtures("quick")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The metrics of an uninterrupted run with a worker (whose augmentations differ from those
    of a run without)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        quick_pictures(monkeypatch)
        trains(["--data-dir", tiny, "--out", out, *WITH_A_WORKER])
    return metrics(out)


def interrupted(tiny, tmp_path, aim, **kwargs):
    # a line for every batch: where a run stopped shows
    return processes.run(["--data-dir", tiny, "--out", tmp_path / "run", *WITH_A_WORKER,
                          "--log-every", 1], tmp_path / "process", aim, **kwargs)


def assert_one_line(ended, sig, says, folder=None):
    assert ended.status == 128 + sig, ended
    lines = [line for line in ended.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in ended.err, ended.err
    assert lines[0].startswith(f"interrupted by {SAYS[sig]}: {says}"), ended.err
    if folder is not None:  # train.log ends with the same line
        assert (folder / "train.log").read_text().splitlines()[-1] == lines[0]


@pytest.mark.parametrize("target,nth,sig,last_batch", [
    # in epoch 2's first step: its second does not run
    ("experiment2_cifar_cnn:training_step", 3, signal.SIGTERM, "Epoch 2, Batch 1:"),
    ("experiment2_cifar_cnn:training_step", 3, signal.SIGHUP, "Epoch 2, Batch 1:"),
    # epoch 2 is trained, but not saved: its evaluation stops
    ("experiment2_cifar_cnn:evaluate", 2, signal.SIGINT, "Epoch 2, Batch 2:"),
    # the first checkpoint's write finishes; epoch 2 does not start
    ("torch:save", 1, signal.SIGTERM, "Epoch 1, Batch 2:"),
], ids=["mid-epoch", "closed terminal", "during evaluation", "inside torch.save"])
def test_interrupted_then_resumed_equals_uninterrupted(reference, tiny, tmp_path, target, nth,
                                                       sig, last_batch):
    run = tmp_path / "run"
    ended = interrupted(tiny, tmp_path, Aim(target, sig, nth))
    assert_one_line(ended, sig, "last completed epoch is saved in", run)
    assert f"--resume {run / 'last.pt'}" in ended.err
    done = metrics(run)
    assert done == reference[:1]
    assert ended.out.count("Epoch 1/3,") == 1  # the saved epoch is logged, the cut one is not
    assert [line for line in ended.out.splitlines() if ", Batch " in line][-1].startswith(
        last_batch)
    resumed = trains(["--resume", run / "last.pt"])
    assert f"resumed from {run / 'last.pt'} after epoch 1" in resumed
    assert metrics(run) == reference
    assert EPOCH_LINE.findall((run / "train.log").read_text()) == ["1", "2", "3"]


def test_with_nohup_a_closed_terminal_does_not_stop_the_run(reference, tiny, tmp_path):
    ended = interrupted(tiny, tmp_path, Aim("experiment2_cifar_cnn:training_step",
                                            signal.SIGHUP, 3), nohup=True)
    assert ended.status == 0 and not ended.err, ended
    assert metrics(tmp_path / "run") == reference


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_while_the_workers_start_leaves_a_folder_a_retry_may_use(reference, tiny,
                                                                             tmp_path, sig):
    run = tmp_path / "run"
    ended = interrupted(tiny, tmp_path, Aim("multiprocessing.process:BaseProcess.start", sig))
    assert_one_line(ended, sig, "no epoch had finished, nothing to resume", run)
    assert sorted(p.name for p in run.iterdir()) == ["augmentations.png", "train.log"]
    trains(["--data-dir", tiny, "--out", run, *WITH_A_WORKER])
    assert metrics(run) == reference


def test_interrupted_inside_a_picture_of_the_report(reference, tiny, tmp_path):
    run = tmp_path / "run"
    # the first picture drawn is augmentations.png, before the first epoch; the second curves.png
    ended = interrupted(tiny, tmp_path, Aim("matplotlib.figure:Figure.savefig", nth=2))
    assert_one_line(ended, signal.SIGTERM, "all 3 epochs are saved in", run)
    assert f"--resume {run / 'last.pt'}" in ended.err and metrics(run) == reference
    assert not list(run.glob("*.tmp"))  # the picture under way was finished, none half-written
    trains(["--resume", run / "last.pt"])
    assert all((run / name).stat().st_size > 0
               for name in ("curves.png", "confusion.png", "misclassified.png"))
    assert metrics(run) == reference


@pytest.mark.parametrize("aim,says", [
    # the last picture of the report: matplotlib frees it, where weakref callbacks run
    (Aim("matplotlib.pyplot:close", nth=4), "all 3 epochs are saved in"),
    # main's last step, closing train.log
    (Aim("experiment2_cifar_cnn:RunLog.close"), "the run had finished"),
    # after main has returned, as the process ends (its worker ended before, the same way)
    (Aim("os:_exit", how="process"), "the run had finished"),
], ids=["last picture", "closing the log", "process exit"])
def test_a_signal_at_the_end_of_a_run_is_never_exit_status_0(tiny, tmp_path, aim, says):
    assert_one_line(interrupted(tiny, tmp_path, aim), signal.SIGTERM, says)


def test_a_signal_while_the_first_file_is_written_leaves_no_temporary(tiny, tmp_path):
    # augmentations.png, before the first epoch: nothing under way must finish, so the process
    # ends at once, and the temporary written so far goes with it
    run = tmp_path / "run"
    ended = interrupted(tiny, tmp_path, Aim("os:fsync", signal.SIGINT, 1))
    assert_one_line(ended, signal.SIGINT, "no epoch had finished, nothing to resume", run)
    assert sorted(p.name for p in run.iterdir()) == ["train.log"]


@pytest.mark.parametrize("how", ["twice-group", "twice"],
                         ids=["one after the other", "both inside one C call"])
def test_a_second_signal_ends_the_run_at_once(tiny, tmp_path, how):
    run = tmp_path / "run"
    # inside the first last.pt's write: one signal would let it finish, a second does not
    ended = interrupted(tiny, tmp_path, Aim("os:fsync", nth=2, how=how))
    assert_one_line(ended, signal.SIGTERM, "no epoch had finished", run)
    assert "Epoch 1/3," not in ended.out
    assert sorted(p.name for p in run.iterdir()) == ["augmentations.png", "train.log"]


def test_interrupting_a_resume_while_it_decodes_says_what_the_checkpoint_holds(stopped, copy_run,
                                                                               tmp_path):
    run = copy_run(stopped / "a")
    ended = processes.run(["--resume", run / "last.pt"], tmp_path / "process",
                          Aim("experiment2_cifar_cnn:read_image", nth=5))
    assert_one_line(ended, signal.SIGTERM, "last completed epoch is saved in", run)
    assert "(epoch 1 of 3)" in ended.err


def test_a_resume_interrupted_before_it_holds_the_folder_claims_nothing_there(stopped, copy_run,
                                                                             tmp_path):
    # what the folder holds may be another live run's: the resume has written nothing
    run = copy_run(stopped / "a")
    ended = processes.run(["--resume", run / "last.pt"], tmp_path / "process",
                          Aim("fcntl:flock", signal.SIGINT))
    assert_one_line(ended, signal.SIGINT, "nothing was written")


@pytest.mark.parametrize("mode,target", [
    (["--evaluate", "last.pt"], "experiment2_cifar_cnn:read_image"),
    (["--benchmark", "--batch-size", "8"], "experiment2_cifar_cnn:rate")])
def test_modes_that_write_nothing_say_they_stopped(finished, tiny, tmp_path, mode, target):
    args = [finished / a if a == "last.pt" else a for a in mode]
    ended = processes.run([*args, "--data-dir", tiny], tmp_path / "process",
                          Aim(target, signal.SIGINT, 3 if target.endswith("read_image") else 1))
    assert_one_line(ended, signal.SIGINT, f"{mode[0]} stopped; it writes nothing")


def test_the_printed_resume_command_works_pasted_in_any_folder(reference, tiny, tmp_path,
                                                               monkeypatch):
    (tmp_path / "here").mkdir()
    ended = processes.run(["--data-dir", tiny, "--out", "a run folder", *WITH_A_WORKER],
                          tmp_path / "process", Aim("experiment2_cifar_cnn:training_step", nth=3),
                          cwd=tmp_path / "here")
    run = tmp_path / "here" / "a run folder"
    assert_one_line(ended, signal.SIGTERM, "last completed epoch is saved in", run)
    command = shlex.split(ended.err.strip().split("continue with: ")[1])  # as a shell reads it
    assert command == [sys.executable, str(SCRIPT), "--resume", str(run / "last.pt")]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    trains(command[2:])
    assert metrics(run) == reference


def test_workers_end_with_the_training_process_even_when_it_is_killed(tiny, tmp_path):
    # else they hold the run folder's lock, which they inherit, and a resume is refused
    process = processes.start(["--data-dir", tiny, "--out", tmp_path / "run", *WITH_A_WORKER],
                              tmp_path / "process", Aim("experiment2_cifar_cnn:training_step",
                                                        signal.SIGKILL, 3, how="process"))
    process.join(120)
    killed = time.monotonic()
    assert process.exitcode == -signal.SIGKILL
    while processes.group_alive(process.pid):
        assert time.monotonic() - killed < 2.5, "the worker outlived the training process"
        time.sleep(0.02)
    assert run_main(["--resume", tmp_path / "run" / "last.pt"]).status == 0


def test_a_closed_terminal_does_not_stop_training(reference, tiny, tmp_path):
    # as `python experiment2_cifar_cnn.py ... | head -2`
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    run = tmp_path / "run"
    process = processes.start(["--data-dir", tiny, "--out", run, *WITH_A_WORKER],
                              tmp_path / "process", stdout=pipe)
    with open(pipe) as head:
        first_lines = [head.readline() for _ in range(2)]
    ended = processes.finish(process)
    assert ended.status == 0 and "Traceback" not in ended.err, ended.err
    assert first_lines[0].startswith("data:")
    assert metrics(run) == reference
    assert "Done: final test accuracy" in (run / "train.log").read_text()


# ---- in a fresh interpreter: the script as `python experiment2_cifar_cnn.py` runs it

SIGNAL_DURING_IMPORTS = """
import os, runpy, sys
class SendOnImport:  # the signal goes when the script starts importing torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), {sig})
        return None
sys.meta_path.insert(0, SendOnImport())
sys.argv = [{script!r}, "--summary"]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_imports_ends_in_one_line(sig):
    code = SIGNAL_DURING_IMPORTS.format(sig=int(sig), script=str(SCRIPT))
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert ended.returncode == 128 + sig, ended
    assert ended.stderr.strip() == f"interrupted by {SAYS[sig]}: nothing was written"
    assert not ended.stdout


SIGNAL_AS_IT_EXITS = """
import os, runpy, sys
real_exit = os._exit
def exiting(status):  # the signal goes as the script ends its process
    os._exit = real_exit
    os.kill(os.getpid(), {sig})
    real_exit(status)
os._exit = exiting
sys.argv = [{script!r}, "--summary"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_signal_as_the_script_exits_ends_in_one_line():
    # the process ends at once after main, not through seconds of the interpreter's shutdown,
    # where the default handlers are back and a signal ends it without a line
    code = SIGNAL_AS_IT_EXITS.format(sig=int(signal.SIGTERM), script=str(SCRIPT))
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert ended.returncode == 143, ended
    assert ended.stderr.strip() == "interrupted by SIGTERM: --summary stopped; it writes nothing"
    assert ended.stdout.endswith("Total trainable parameters: 86,954\n")


def test_the_script_runs_as_a_command():
    ended = subprocess.run([sys.executable, SCRIPT, "--summary"], capture_output=True, text=True,
                           timeout=120)
    assert ended.returncode == 0 and not ended.stderr, ended
    assert ended.stdout.endswith("Total trainable parameters: 86,954\n")


@pytest.mark.parametrize("closed,flags,status", [
    (">&- 2>&-", ["--epochs", 1, "--batch-size", 20, "--workers", 0], 0),
    ("2>&-", ["--epochs", 0], 2)], ids=["a run, stdout and stderr closed", "a mistake, stderr"])
def test_closed_stdout_or_stderr_end_with_the_usual_status(tiny, tmp_path, closed, flags, status):
    # as from a daemon or a cron job; what cannot be shown is still in train.log
    run = tmp_path / "run"
    command = shlex.join([sys.executable, str(SCRIPT), "--data-dir", str(tiny), "--out",
                          str(run), *map(str, flags)])
    ended = subprocess.run(f"{command} {closed}", shell=True, capture_output=True, text=True,
                           timeout=120)
    assert ended.returncode == status and "Traceback" not in ended.stderr, ended
    if status == 0:
        assert "Done: final test accuracy" in (run / "train.log").read_text()


def test_a_second_signal_ends_a_run_whose_stdout_nobody_reads(tiny, tmp_path):
    # `| less` left paused: the run waits to print, and a second Ctrl-C must still end it
    import fcntl
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read
    fcntl.fcntl(reader, 1031, 4096)  # F_SETPIPE_SZ: full after a few epochs' lines
    run = tmp_path / "run"
    try:
        process = processes.start(["--data-dir", tiny, "--out", run, *RUN, "--epochs", 1000,
                                   "--log-every", 1], tmp_path / "process", stdout=fifo)
        size, still = -1, 0
        while still < 10:  # train.log stops growing: the run waits on its stdout
            time.sleep(0.1)
            now = (run / "train.log").stat().st_size if (run / "train.log").exists() else 0
            still, size = (still + 1 if now == size else 0), now
        for _ in range(2):
            os.kill(process.pid, signal.SIGINT)
            time.sleep(0.3)
        ended = processes.finish(process, timeout=10)
    finally:
        os.close(reader)
    assert_one_line(ended, signal.SIGINT, "last completed epoch is saved in", run)


def test_with_compile_a_stop_before_the_first_epoch_is_saved_acts_at_once(tiny, tmp_path):
    # compiling the first step takes ~20 s on a CPU, past docker stop's 10 s; nothing is lost
    ended = processes.run(["--data-dir", tiny, "--out", tmp_path / "run", *RUN, "--compile",
                           "--log-every", 1], tmp_path / "process",
                          Aim("experiment2_cifar_cnn:training_step", how="process"))
    assert_one_line(ended, signal.SIGTERM, "no epoch had finished, nothing to resume",
                    tmp_path / "run")
    assert ", Batch 1:" not in ended.out  # the step, and its compilation, never ran
