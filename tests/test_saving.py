"""What a run writes, and what a resume may continue: a failed save (a full disk) is one line and
files that agree; a run folder belongs to one run; a resume keeps the run's data and settings.
(Interruptions: test_signals.py; other odd inputs: test_battery.py.)"""
import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, exp, make_image_folder

RUN = ["--epochs", 3, "--batch-size", 20, "--workers", 0, "--seed", 7]


def main(args, capsys):
    """(exit status, stdout, stderr) of the script run in this process."""
    try:
        exp.main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def metrics(folder):
    with open(folder / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def epoch_of(checkpoint):
    return torch.load(checkpoint, weights_only=True)["epoch"]


def stopped_in_epoch(epoch, monkeypatch):
    """train_one_epoch interrupted (as by Ctrl-C) at the start of the given epoch."""
    real = exp.train_one_epoch

    def cut(training, loader, runtime, at, *rest):
        if at == epoch:
            raise exp.Stopped(2)
        return real(training, loader, runtime, at, *rest)
    monkeypatch.setattr(exp, "train_one_epoch", cut)
    return real


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("saving") / "data")


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    """The uninterrupted run's metrics."""
    out = tmp_path_factory.mktemp("full") / "run"
    done = subprocess.run([sys.executable, str(ROOT / "experiment2_cifar_cnn.py"), "--data-dir",
                           str(data), "--out", str(out), *map(str, RUN)], capture_output=True)
    assert done.returncode == 0, done.stderr
    return metrics(out)


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
def test_a_failed_save_is_one_line_and_the_files_agree(data, full, tmp_path, capsys, monkeypatch,
                                                       name, nth, saved):
    run = tmp_path / "run"
    no_space_for(name, nth, monkeypatch)
    status, out, err = main(["--data-dir", data, "--out", run, *RUN], capsys)
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
    monkeypatch.undo()
    status, _, err = main(["--resume", run / "last.pt"], capsys)
    assert status == 0, err
    assert metrics(run) == full


def test_a_full_disk(data, tmp_path, capsys):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    # 2 MiB: the first last.pt (about 1.1 MB) fits, best.pt beside it does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine does not let a tmpfs be mounted (a container without the right)")
    try:
        status, _, err = main(["--data-dir", data, "--out", disk / "run", *RUN], capsys)
        run = disk / "run"
        assert status == 74, err
        assert err.strip().startswith(f"error: cannot write {run / 'best.pt'}: No space left")
        assert f"last completed epoch is saved in {run / 'last.pt'} (epoch 1 of 3)" in err
        assert epoch_of(run / "last.pt") == 1 and not (run / "metrics.csv").exists()
        assert not list(run.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(data, tmp_path, capsys,
                                                                  monkeypatch):
    run = tmp_path / "run"
    stopped_in_epoch(2, monkeypatch)
    assert main(["--data-dir", data, "--out", run, *RUN], capsys)[0] == 130
    for left in ("last.pt.x1y2z3.tmp", "curves.png.tmp", "metrics.csv.abc.tmp"):
        (run / left).write_bytes(b"half")
    (run / "notes.tmp").write_text("the user's own")
    monkeypatch.undo()
    assert main(["--resume", run / "last.pt"], capsys)[0] == 0
    assert [p.name for p in run.glob("*.tmp")] == ["notes.tmp"]


def test_files_follow_the_umask(data, tmp_path, capsys):
    before = os.umask(0o002)
    exp.umask.cache_clear()
    try:
        assert main(["--data-dir", data, "--out", tmp_path / "run", *RUN[2:], "--epochs", 1],
                    capsys)[0] == 0
    finally:
        os.umask(before)
        exp.umask.cache_clear()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == dict.fromkeys(exp.RUN_FILES, 0o664)


# ---- a run folder belongs to one run

def test_a_second_run_in_a_folder_in_use_is_refused(data, tmp_path, capsys):
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a run started a moment before would hold it
    try:
        status, _, err = main(["--data-dir", data, "--out", run, *RUN], capsys)
    finally:
        os.close(held)
    assert status == 2 and f"run folder {run} is in use by another run" in err
    assert list(run.iterdir()) == []


def test_where_folders_cannot_be_locked_the_run_goes_on_and_says_so(data, tmp_path, capsys,
                                                                    monkeypatch):
    import fcntl

    def cannot(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", cannot)
    status, out, _ = main(["--data-dir", data, "--out", tmp_path / "run", *RUN[2:], "--epochs", 1],
                          capsys)
    assert status == 0 and "note: the run folder cannot be locked here" in out


@pytest.fixture
def two_runs(data, tmp_path, capsys, monkeypatch):
    """Runs a and b, each stopped after its first epoch; b with another seed."""
    stopped_in_epoch(2, monkeypatch)
    for name, seed in (("a", 7), ("b", 8)):
        assert main(["--data-dir", data, "--out", tmp_path / name, *RUN[:6], "--seed", seed],
                    capsys)[0] == 130
    monkeypatch.undo()
    return tmp_path / "a", tmp_path / "b"


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("copied_as", ["b.pt", "last.pt"])
def test_resuming_into_a_folder_of_another_run_is_refused(two_runs, capsys, copied_as):
    a, b = two_runs
    if copied_as == "last.pt":
        (a / "best.pt").write_bytes((a / "last.pt").read_bytes())
    shutil.copy(b / "last.pt", a / copied_as)
    before = folder_bytes(a)
    status, _, err = main(["--resume", a / copied_as], capsys)
    assert status == 2 and f"{a} holds the files of another run" in err, err
    assert folder_bytes(a) == before


def test_a_linked_checkpoint_continues_the_run_in_its_own_folder(two_runs, tmp_path, capsys):
    a, _ = two_runs
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "latest.pt").symlink_to(a / "last.pt")
    assert main(["--resume", tmp_path / "elsewhere" / "latest.pt"], capsys)[0] == 0
    assert len(metrics(a)) == 3 and [p.name for p in (tmp_path / "elsewhere").iterdir()] == [
        "latest.pt"]


@pytest.mark.parametrize("where", ["train/cat", "train/myrun", "."])
def test_a_run_folder_inside_the_data_folder_is_refused(tmp_path, capsys, where):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    before = sorted(p for p in data.rglob("*"))
    status, _, err = main(["--data-dir", data, "--out", data / where, *RUN], capsys)
    assert status == 2 and "is inside the data folder" in err
    assert sorted(p for p in data.rglob("*")) == before


def test_an_empty_out_is_refused(capsys):
    status, _, err = main(["--out", ""], capsys)
    assert status == 2 and "--out: is empty" in err


# ---- a resume keeps the run

def test_resume_on_other_data_found_at_the_same_relative_path_is_refused(data, tmp_path, capsys,
                                                                          monkeypatch):
    for place in ("first", "second"):
        shutil.copytree(data, tmp_path / place / "data")
    changed = next((tmp_path / "second" / "data" / "train" / "cat").iterdir())
    changed.write_bytes((tmp_path / "second" / "data" / "train" / "dog" / changed.name)
                        .read_bytes())  # same counts, one image differs
    monkeypatch.chdir(tmp_path / "first")
    stopped_in_epoch(2, monkeypatch)
    assert main(["--data-dir", "data", "--out", tmp_path / "run", *RUN], capsys)[0] == 130
    monkeypatch.chdir(tmp_path / "second")
    status, _, err = main(["--resume", tmp_path / "run" / "last.pt"], capsys)
    assert status == 2 and "is not the data this run trained on: the same number" in err


def test_resume_keeps_the_precision_and_workers_the_run_resolved(data, tmp_path, capsys,
                                                                monkeypatch):
    run = tmp_path / "run"
    stopped_in_epoch(2, monkeypatch)
    assert main(["--data-dir", data, "--out", run, *RUN[:4], "--workers", 1], capsys)[0] == 130
    ran = torch.load(run / "last.pt", weights_only=True)["resolved"]
    monkeypatch.undo()
    real = exp.resolve_precision

    def other_machine(name, device):  # where 'auto' would resolve the other way
        if name == "auto":
            return "fp32" if ran["precision"] == "bf16" else "bf16"
        return real(name, device)
    monkeypatch.setattr(exp, "resolve_precision", other_machine)
    status, out, err = main(["--resume", run / "last.pt"], capsys)
    assert status == 0, err
    assert f"precision: {ran['precision']}," in out and ", 1 workers" in out
    assert "given anew" not in out


def test_a_setting_given_anew_is_taken_with_a_note(two_runs, capsys):
    a, _ = two_runs
    status, out, err = main(["--resume", a / "last.pt", "--workers", 1], capsys)
    assert status == 0, err
    assert "note: --workers 1 given anew (the run had 0): from here on the numbers differ" in out


def test_compile_can_be_switched_off_on_resume(two_runs, capsys):
    a, _ = two_runs
    state = torch.load(a / "last.pt", weights_only=True)
    state["args"]["compile"] = True
    torch.save(state, a / "last.pt")
    status, out, err = main(["--resume", a / "last.pt", "--no-compile"], capsys)
    assert status == 0 and "compile=False" in out, err


def test_a_checkpoint_of_an_older_version_resumes_to_the_same_metrics(data, full, tmp_path,
                                                                      capsys, monkeypatch):
    run = tmp_path / "run"
    stopped_in_epoch(2, monkeypatch)
    assert main(["--data-dir", data, "--out", run, *RUN], capsys)[0] == 130
    monkeypatch.undo()
    state = torch.load(run / "last.pt", weights_only=True)
    for added in ("run_id", "data", "resolved"):
        del state[added]
    # what a last.pt written at commit 89f7483 holds
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history",
                          "args", "data_dir_resolved", "ema"}
    state["args"] = {k: v for k, v in state["args"].items() if k != "cuda_graphs"}
    torch.save(state, run / "last.pt")
    status, out, err = main(["--resume", run / "last.pt"], capsys)
    assert status == 0, err
    assert "was written by an older version of this script" in out
    assert metrics(run) == full
