"""What a run writes, and what a resume may continue: a failed save (a full disk) is one line and
files that agree; a run folder belongs to one run; a resume keeps the run's data and settings.
(Interruptions: test_signals.py; other odd inputs: test_battery.py.)"""
import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import RUN, exp, make_image_folder, metrics, refused, run_main, stopped_in_epoch

pytestmark = pytest.mark.usefixtures("quick")  # blank pictures: see conftest.quick_pictures


def epoch_of(checkpoint):
    return torch.load(checkpoint, weights_only=True)["epoch"]


@pytest.fixture
def full(finished):
    """The uninterrupted run's metrics."""
    return metrics(finished)


# ---- a failed save

def no_space_for(name, nth, monkeypatch):
    """The nth write of the run file `name` fails as on a full disk."""
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(dst).name == name:
            calls.append(dst)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)
    monkeypatch.setattr(exp.os, "replace", replace)


@pytest.mark.parametrize("name,nth,saved", [
    ("augmentations.png", 1, 0), ("last.pt", 1, 0), ("last.pt", 2, 1), ("best.pt", 1, 1),
    ("metrics.csv", 2, 2), ("curves.png", 1, 3), ("misclassified.png", 1, 3)])
def test_a_failed_save_is_one_line_and_the_files_agree(tiny, full, tmp_path, monkeypatch, name,
                                                       nth, saved):
    run = tmp_path / "run"
    with monkeypatch.context() as full_disk:
        no_space_for(name, nth, full_disk)
        status, out, err = run_main(["--data-dir", tiny, "--out", run, *RUN])
    assert status == exp.SAVE_FAILED == 74
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {run / name}: No space")
    assert (run / "train.log").read_text().splitlines()[-1] == lines[0]
    assert not list(run.glob("*.tmp"))
    if saved == 0:
        assert "no epoch had finished, nothing to resume" in lines[0]
        assert not (run / "last.pt").exists()
        return
    # last.pt is written first; best.pt, metrics.csv and the epoch's line never get ahead of it
    assert epoch_of(run / "last.pt") == saved
    assert not (run / "best.pt").exists() or epoch_of(run / "best.pt") <= saved
    logged = out.count("/3, Train Loss")
    rows = len(metrics(run)) if (run / "metrics.csv").exists() else 0
    assert rows == logged <= saved
    assert f"(epoch {saved} of 3)" in lines[0] or "all 3 epochs are saved" in lines[0]
    status, _, err = run_main(["--resume", run / "last.pt"])
    assert status == 0, err
    assert metrics(run) == full


def test_a_full_disk(tiny, tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    # 2 MiB: the first last.pt (about 1.1 MB) fits, best.pt beside it does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine does not let a tmpfs be mounted (a container without the right)")
    try:
        status, _, err = run_main(["--data-dir", tiny, "--out", disk / "run", *RUN])
        run = disk / "run"
        assert status == 74, err
        assert err.strip().startswith(f"error: cannot write {run / 'best.pt'}: No space left")
        assert f"last completed epoch is saved in {run / 'last.pt'} (epoch 1 of 3)" in err
        assert epoch_of(run / "last.pt") == 1 and not (run / "metrics.csv").exists()
        assert not list(run.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(stopped, copy_run):
    run = copy_run(stopped / "a")
    for left in ("last.pt.x1y2z3.tmp", "curves.png.tmp", "metrics.csv.abc.tmp"):
        (run / left).write_bytes(b"half")
    (run / "notes.tmp").write_text("the user's own")
    assert run_main(["--resume", run / "last.pt"]).status == 0
    assert [p.name for p in run.glob("*.tmp")] == ["notes.tmp"]


def train_log_fails(error, monkeypatch, when="w"):
    """Opening a train.log (mode w: a new run's; a: a resume's) fails with error."""
    def opening(path, mode="r", *args, **kwargs):
        if Path(path).name == "train.log" and mode == when:
            raise OSError(error, os.strerror(error))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(exp, "open", opening, raising=False)  # found before the builtin


def test_a_users_files_named_as_run_files_are_never_replaced_without_overwrite(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = {"train.log": b"mine", "curves.png": b"a picture", "last.pt.mybackup.tmp": b"keep",
            "notes.txt": b"other"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    err = refused(["--data-dir", tiny, "--out", run, *RUN],
                  f"run folder {run} holds files the run would replace: curves.png, "
                  "last.pt.mybackup.tmp, train.log; move them away, or add --overwrite")
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == mine
    assert run_main(["--data-dir", tiny, "--out", run, *RUN, "--overwrite"]).status == 0
    assert (run / "notes.txt").read_bytes() == b"other"
    assert not (run / "last.pt.mybackup.tmp").exists()
    assert (run / "train.log").read_text().startswith("data: ")


def test_a_train_log_that_cannot_be_created_is_one_line(tiny, tmp_path, monkeypatch):
    train_log_fails(errno.ENOSPC, monkeypatch)  # no inode left
    status, _, err = run_main(["--data-dir", tiny, "--out", tmp_path / "run", *RUN])
    assert status == 74 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {tmp_path / 'run' / 'train.log'}: No space")


def test_a_train_log_a_resume_may_not_write_is_one_line(stopped, copy_run, monkeypatch):
    run = copy_run(stopped / "a")
    train_log_fails(errno.EACCES, monkeypatch, when="a")
    status, _, err = run_main(["--resume", run / "last.pt"])
    assert status == 74 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write {run / 'train.log'}: Permission denied; last completed epoch" in err


@pytest.mark.parametrize("resuming", [False, True])
def test_a_train_log_that_cannot_be_read_is_one_line(stopped, copy_run, tiny, monkeypatch,
                                                     resuming):
    run = copy_run(stopped / "a")
    for name in ("metrics.csv", "best.pt", "last.pt"):  # a new run reads the log for results
        if not resuming:
            (run / name).unlink()
    real = Path.read_text

    def unreadable(path, *args, **kwargs):
        if path.name == "train.log":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", unreadable)
    args = ["--resume", run / "last.pt"] if resuming else ["--data-dir", tiny, "--out", run, *RUN]
    status, _, err = run_main(args)
    assert status == 2 and err == f"error: cannot read {run / 'train.log'}: Permission denied\n"


def test_files_follow_the_umask(tiny, tmp_path):
    before = os.umask(0o002)
    exp.umask.cache_clear()
    try:
        assert run_main(["--data-dir", tiny, "--out", tmp_path / "run", *RUN,
                         "--epochs", 1]).status == 0
    finally:
        os.umask(before)
        exp.umask.cache_clear()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == dict.fromkeys(exp.RUN_FILES, 0o664)


# ---- a run folder belongs to one run

def test_a_second_run_in_a_folder_in_use_is_refused(tiny, tmp_path):
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a run started a moment before would hold it
    try:
        status, _, err = run_main(["--data-dir", tiny, "--out", run, *RUN])
    finally:
        os.close(held)
    assert status == 2 and f"run folder {run} is in use by another run" in err
    assert list(run.iterdir()) == []


def test_the_folder_is_locked_before_it_is_checked_and_the_data_decoded(tiny, finished,
                                                                         copy_run, monkeypatch):
    # else a second run given the folder while the first decodes would pass the check, finish,
    # and have its results cleared by the first
    import fcntl
    run = copy_run(finished)
    real = exp.load_cifar10

    def decoding(*args, **kwargs):
        other = os.open(run, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        return real(*args, **kwargs)
    monkeypatch.setattr(exp, "load_cifar10", decoding)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    status, _, err = run_main(["--data-dir", tiny, "--out", run, *RUN])
    assert status == 2 and "already holds results" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert run_main(["--data-dir", tiny, "--out", run, *RUN, "--overwrite"]).status == 0


def test_a_resume_of_a_run_in_use_is_refused(stopped, copy_run):
    import fcntl
    run = copy_run(stopped / "a")
    held = os.open(run, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the run itself, still going, holds it
    try:
        status, _, err = run_main(["--resume", run / "last.pt"])
    finally:
        os.close(held)
    assert status == 2 and err.strip().endswith(
        f"run folder {run} is in use by another run; wait for that run to end")


def test_a_resume_locks_the_folder_before_it_reads_the_checkpoint(stopped, copy_run,
                                                                  monkeypatch):
    # else a resume could continue from an older epoch than another resume had just written
    import fcntl
    run = copy_run(stopped / "a")
    real, held = exp.read_checkpoint, []

    def reading(path):
        other = os.open(run, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(path)
        finally:
            os.close(other)
        return real(path)
    monkeypatch.setattr(exp, "read_checkpoint", reading)
    assert run_main(["--resume", run / "last.pt"]).status == 0 and held


def test_a_folder_another_run_locked_first_is_never_removed(tiny, tmp_path, monkeypatch):
    # the other run locked it between this run's mkdir and its lock
    import fcntl
    run, real, other = tmp_path / "run", exp.make_run_folder, []

    def made_then_taken(plan):
        folder = real(plan)
        other.append(os.open(folder, os.O_RDONLY))
        fcntl.flock(other[0], fcntl.LOCK_EX)
        return folder
    monkeypatch.setattr(exp, "make_run_folder", made_then_taken)
    try:
        refused(["--data-dir", tiny, "--out", run, *RUN], "is in use by another run")
        assert run.is_dir()
    finally:
        os.close(other[0])


def test_the_folders_a_failed_run_made_are_removed_before_its_lock_is_released(tiny, tmp_path,
                                                                              monkeypatch):
    real, when_released = os.close, []

    def close(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):  # the run folder's lock
            when_released.append(sorted(p.name for p in tmp_path.iterdir()))
        real(fd)
    monkeypatch.setattr(exp.os, "close", close)
    refused(["--data-dir", tiny, "--out", tmp_path / "a" / "b" / "run", *RUN, "--batch-size",
             500], "--batch-size 500 is larger than the 40 training images")
    monkeypatch.undo()
    assert when_released == [[]]  # nothing left in tmp_path while the folder was locked
    assert not (tmp_path / "a").exists()


def test_a_run_made_in_runs_removes_runs_too_when_it_writes_nothing(tiny, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["--data-dir", tiny, *RUN, "--batch-size", 500], "is larger than")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["metrics.csv", "train.log"])
def test_a_fifo_in_place_of_a_run_file_is_refused_on_resume(stopped, copy_run, name):
    run = copy_run(stopped / "a")
    (run / name).unlink()
    os.mkfifo(run / name)

    def hung(signum, frame):  # opening a FIFO nothing writes to waits forever
        raise AssertionError(f"the resume hung on the FIFO {name}")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        refused(["--resume", run / "last.pt"],
                f"{run / name} is not a regular file, where the run writes a file; move it away")
    finally:
        signal.alarm(0)


def test_a_resume_into_a_folder_it_cannot_write_names_the_run_folder(stopped, copy_run,
                                                                     monkeypatch):
    run = copy_run(stopped / "a")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if not root, read-only
    err = refused(["--resume", run / "last.pt"], f"run folder {run}: {run} is not writable")
    assert "--out" not in err


def test_where_folders_cannot_be_locked_the_run_goes_on_and_says_so(tiny, tmp_path,
                                                                    monkeypatch):
    import fcntl

    def cannot(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", cannot)
    status, out, _ = run_main(["--data-dir", tiny, "--out", tmp_path / "run", *RUN, "--epochs", 1])
    assert status == 0 and "note: the run folder cannot be locked here" in out


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("copied_as", ["b.pt", "last.pt"])
def test_resuming_into_a_folder_of_another_run_is_refused(stopped, copy_run, copied_as):
    a = copy_run(stopped / "a")
    if copied_as == "last.pt":
        (a / "best.pt").write_bytes((a / "last.pt").read_bytes())
    shutil.copy(stopped / "b" / "last.pt", a / copied_as)
    before = folder_bytes(a)
    status, _, err = run_main(["--resume", a / copied_as])
    assert status == 2 and f"{a} holds the files of another run" in err, err
    assert folder_bytes(a) == before


def test_a_linked_checkpoint_continues_the_run_in_its_own_folder(stopped, copy_run, tmp_path):
    a = copy_run(stopped / "a")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "latest.pt").symlink_to(a / "last.pt")
    assert run_main(["--resume", tmp_path / "elsewhere" / "latest.pt"]).status == 0
    assert len(metrics(a)) == 3 and [p.name for p in (tmp_path / "elsewhere").iterdir()] == [
        "latest.pt"]


@pytest.mark.parametrize("where", ["train/cat", "train/myrun", "."])
def test_a_run_folder_inside_the_data_folder_is_refused(tmp_path, where):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    before = sorted(p for p in data.rglob("*"))
    status, _, err = run_main(["--data-dir", data, "--out", data / where, *RUN])
    assert status == 2 and "is inside the data folder" in err
    assert sorted(p for p in data.rglob("*")) == before


def test_a_resumed_run_inside_its_data_folder_is_told_to_move_not_to_give_out(stopped, tiny,
                                                                             copy_run, tmp_path):
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    run = copy_run(stopped / "a")
    shutil.move(run, data / "run")
    err = refused(["--resume", data / "run" / "last.pt", "--data-dir", data],
                  f"run folder {data / 'run'} is inside the data folder {data}")
    assert err.endswith("; move it elsewhere")


def test_an_empty_out_is_refused():
    status, _, err = run_main(["--out", ""])
    assert status == 2 and "--out: is empty" in err


# ---- a resume keeps the run

def test_resume_on_other_data_found_at_the_same_relative_path_is_refused(tiny, tmp_path,
                                                                          monkeypatch):
    for place in ("first", "second"):
        shutil.copytree(tiny, tmp_path / place / "data")
    changed = next((tmp_path / "second" / "data" / "train" / "cat").iterdir())
    changed.write_bytes((tmp_path / "second" / "data" / "train" / "dog" / changed.name)
                        .read_bytes())  # same counts, one image differs
    monkeypatch.chdir(tmp_path / "first")
    with monkeypatch.context() as stopping:
        stopped_in_epoch(2, stopping)
        assert run_main(["--data-dir", "data", "--out", tmp_path / "run", *RUN]).status == 130
    monkeypatch.chdir(tmp_path / "second")
    status, _, err = run_main(["--resume", tmp_path / "run" / "last.pt"])
    assert status == 2 and "is not the data this run trained on: the same number" in err


def test_resume_keeps_the_precision_and_workers_the_run_resolved(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as stopping:
        stopped_in_epoch(2, stopping)
        assert run_main(["--data-dir", tiny, "--out", run, *RUN, "--workers", 1]).status == 130
    ran = torch.load(run / "last.pt", weights_only=True)["resolved"]
    real = exp.resolve_precision

    def other_machine(name, device):  # where 'auto' would resolve the other way
        if name == "auto":
            return "fp32" if ran["precision"] == "bf16" else "bf16"
        return real(name, device)
    monkeypatch.setattr(exp, "resolve_precision", other_machine)
    status, out, err = run_main(["--resume", run / "last.pt"])
    assert status == 0, err
    assert f"precision: {ran['precision']}," in out and ", 1 workers" in out
    assert "given anew" not in out


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("omp", [None, "", "abc"])  # unset, or set to what torch ignores
def test_a_resume_keeps_the_runs_cpu_threads(stopped, copy_run, monkeypatch, threads_restored,
                                             omp):
    run = copy_run(stopped / "a")
    state = torch.load(run / "last.pt", weights_only=True)
    state["resolved"]["threads"] = torch.get_num_threads() + 1  # as on another machine
    torch.save(state, run / "last.pt")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    status, out, err = run_main(["--resume", run / "last.pt"])
    assert status == 0, err
    assert f"{state['resolved']['threads']} threads" in out and "given anew" not in out


def test_threads_given_anew_are_taken_with_a_note(stopped, copy_run, monkeypatch,
                                                  threads_restored):
    run = copy_run(stopped / "a")
    state = torch.load(run / "last.pt", weights_only=True)
    ran = state["resolved"]["threads"]
    monkeypatch.setenv("OMP_NUM_THREADS", str(ran + 1))
    torch.set_num_threads(ran + 1)  # what torch read from the variable at its start
    status, out, err = run_main(["--resume", run / "last.pt"])
    assert status == 0, err
    assert f"note: OMP_NUM_THREADS={ran + 1} given anew (the run had {ran}): from here" in out


def test_a_setting_given_anew_is_taken_with_a_note(stopped, copy_run):
    a = copy_run(stopped / "a")
    status, out, err = run_main(["--resume", a / "last.pt", "--workers", 1])
    assert status == 0, err
    assert "note: --workers 1 given anew (the run had 0): from here on the numbers differ" in out


def test_compile_can_be_switched_off_on_resume(stopped, copy_run):
    a = copy_run(stopped / "a")
    state = torch.load(a / "last.pt", weights_only=True)
    state["args"]["compile"] = True
    torch.save(state, a / "last.pt")
    status, out, err = run_main(["--resume", a / "last.pt", "--no-compile"])
    assert status == 0 and "compile=False" in out, err


def test_a_checkpoint_of_an_older_version_resumes_to_the_same_metrics(stopped, copy_run, full):
    run = copy_run(stopped / "a")
    state = torch.load(run / "last.pt", weights_only=True)
    for added in ("run_id", "data", "resolved"):
        del state[added]
    # what a last.pt written at commit 89f7483 holds
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history",
                          "args", "data_dir_resolved", "ema"}
    state["args"] = {k: v for k, v in state["args"].items() if k != "cuda_graphs"}
    torch.save(state, run / "last.pt")
    status, out, err = run_main(["--resume", run / "last.pt"])
    assert status == 0, err
    assert "was written by an older version of this script" in out
    assert metrics(run) == full
