"""A battery of odd inputs: each completes correctly, or ends in one line on stderr with exit 2,
before anything is written. (Interruptions: test_signals.py.)"""
import csv
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import exp, make_image_folder

TINY = ["--epochs", 1, "--batch-size", 20, "--workers", 0]


def fails(args, capsys, expected):
    with pytest.raises(SystemExit) as e:
        exp.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    return err


def trains(args, capsys):
    exp.main([str(a) for a in args])
    return capsys.readouterr().out


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tree(tmp_path):
    return make_image_folder(tmp_path / "tree", per_class=(4, 2))


# ---- flags

@pytest.mark.parametrize("flag,value", [
    ("--seed", 2**64), ("--seed", -1), ("--seed", "1e3"), ("--warmup", 1.5), ("--warmup", "x"),
    ("--label-smoothing", "nan"), ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"),
    ("--workers", -1), ("--ema", -0.5), ("--log-every", 0), ("--val", "0"),
    # finite as Python floats, but not in the float32 the step computes in
    ("--lr", "1e39"), ("--weight-decay", "1e300")])
def test_flag_values_that_cannot_train_are_refused_by_the_parser(flag, value, capsys):
    err = fails([flag, value], capsys, flag)
    assert err.endswith("(see --help)")


def test_a_fraction_where_a_whole_number_is_wanted(capsys):
    fails(["--batch-size", "3.5"], capsys, "'3.5' is not a whole number")


def test_a_log_interval_longer_than_an_epoch_costs_no_memory(image_folder, tmp_path, capsys):
    # the window of per-batch losses is the epoch's length, not the flag's
    out = trains(["--data-dir", image_folder, "--out", tmp_path / "run", *TINY,
                  "--log-every", 10_000_000_000_000], capsys)
    assert "Epoch 1/1," in out and ", Batch " not in out


@pytest.mark.parametrize("mode,unused", [
    (["--evaluate", "x.pt"], ["--val", 5, "--epochs", 2, "--lr", 0.1, "--seed", 1, "--out", "o"]),
    (["--benchmark"], ["--out", "o", "--epochs", 2]),
    (["--summary"], ["--seed", 1])])
def test_every_mode_refuses_the_flags_it_does_not_use(mode, unused, capsys):
    names = sorted(str(a) for a in unused if str(a).startswith("--"))
    fails([*mode, *unused], capsys, f"{mode[0]} does not use {', '.join(names)}")


@pytest.mark.parametrize("warmup", ["1", "0"])
def test_warmup_at_either_end_trains(image_folder, tmp_path, capsys, warmup):
    trains(["--data-dir", image_folder, "--out", tmp_path / "run", "--warmup", warmup, *TINY],
           capsys)
    (epoch,) = rows(tmp_path / "run")
    assert float(epoch["train_loss"]) < 5
    lr = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(group["lr"] < 0.01 for group in lr)  # annealed at the end either way


def test_a_warmup_of_exactly_one_step_trains(image_folder, tmp_path, capsys):
    # 200 images / batch 40 = 5 steps; 20% of 5 is one step, where OneCycleLR divided by zero
    trains(["--data-dir", image_folder, "--out", tmp_path / "run", "--epochs", 1,
            "--batch-size", 40, "--workers", 0], capsys)
    assert len(rows(tmp_path / "run")) == 1


def test_batch_larger_than_the_data_writes_nothing_and_a_retry_works(image_folder, tmp_path,
                                                                     capsys):
    run = tmp_path / "run"
    fails(["--data-dir", image_folder, "--out", run, "--epochs", 1, "--batch-size", 500], capsys,
          "--batch-size 500 is larger than the 200 training images")
    assert not run.exists()
    trains(["--data-dir", image_folder, "--out", run, *TINY], capsys)
    assert len(rows(run)) == 1


def test_classes_without_test_images_print_no_nan(image_folder, tmp_path, capsys):
    out = trains(["--data-dir", image_folder, "--out", tmp_path / "run", "--limit", 5,
                  "--batch-size", 4, "--epochs", 1, "--workers", 0], capsys)
    per_class = next(line for line in out.splitlines() if line.startswith("Per-class"))
    assert "nan" not in per_class and "truck (no images)" in per_class


@pytest.mark.parametrize("combo,expected", [
    (["--resume", "x.pt", "--evaluate", "y.pt"], "not allowed with argument"),
    (["--summary", "--benchmark"], "not allowed with argument"),
    (["--tta"], "--tta applies to --evaluate"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA")])
def test_flag_combinations_that_cannot_work(combo, expected, image_folder, capsys):
    fails([*combo, "--data-dir", image_folder], capsys, expected)


def test_benchmark_with_fewer_images_than_a_batch(tmp_path, capsys):
    fails(["--benchmark", "--data-dir", tmp_path / "none", "--limit", 20], capsys,
          "--benchmark needs at least --batch-size (64) training images")


# ---- data

def test_data_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(["--data-dir", tmp_path / "file"], capsys, "is not a CIFAR-10 folder")
    fails(["--data-dir", tmp_path / "file" / "sub"], capsys, "is a file, not a folder")


def test_class_folder_that_cannot_be_read(tree, tmp_path, capsys, monkeypatch):
    real = os.scandir

    def scandir(path):
        if str(path).endswith("cat"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    fails(["--data-dir", tree, "--out", tmp_path / "run"], capsys, "Permission denied")
    assert not (tmp_path / "run").exists()


def test_class_entry_that_is_a_file(tree, capsys):
    shutil.rmtree(tree / "train" / "cat")
    (tree / "train" / "cat").write_text("not a folder")
    fails(["--data-dir", tree], capsys, "missing: cat")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a"])
def test_image_files_that_are_empty_or_broken(tree, tmp_path, capsys, content):
    (tree / "test" / "dog" / "broken.png").write_bytes(content)
    fails(["--data-dir", tree, "--out", tmp_path / "run"], capsys, "broken.png")
    assert not (tmp_path / "run").exists()


def test_sixteen_bit_grayscale_png_looks_like_its_picture(tree):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tree / "train" / "cat" / "deep.png")
    splits, _, notes, _ = exp.load_cifar10(tree)
    loaded = exp.read_image(tree / "train" / "cat" / "deep.png", {})
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.abs(loaded[..., 0].astype(int) - expected).max() <= 1
    assert (loaded[..., 0] == loaded[..., 2]).all() and loaded.mean() < 200
    assert len(notes["converted to RGB"]) == 1


def test_odd_entries_in_a_class_folder_are_skipped_or_converted(tree, capsys, tmp_path):
    cat = tree / "train" / "cat"
    (cat / "folder.png").mkdir()
    (cat / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    Image.new("P", (1, 1)).save(cat / "tiny_palette.png", transparency=0)
    splits, _, notes, _ = exp.load_cifar10(tree)
    assert len(splits["train"][1]) == 41
    assert [p.name for p in notes["subfolders of class folders skipped"]] == ["folder.png"]
    assert [p.name for p in notes["non-image files skipped"]] == ["dangling.png"]
    assert [p.name for p in notes["resized to 32x32"]] == ["tiny_palette.png"]


def test_evaluate_decodes_the_test_split_only(image_folder, tmp_path, capsys, monkeypatch):
    trains(["--data-dir", image_folder, "--out", tmp_path / "run", *TINY], capsys)
    read = []
    real = exp.load_image_folder
    monkeypatch.setattr(exp, "load_image_folder",
                        lambda split_dir, *a: read.append(split_dir.name) or real(split_dir, *a))
    out = trains(["--evaluate", tmp_path / "run" / "last.pt", "--data-dir", image_folder], capsys)
    assert read == ["test"] and "Test Accuracy" in out


# ---- checkpoints

def checkpoint_files(tmp_path):
    good = {"model": exp.Net().state_dict()}
    torch.save(good, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("hello.txt", "not torch")
    (tmp_path / "folder.pt").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"model": {k: "text" for k in good["model"]}}, tmp_path / "strings.pt")
    torch.save({"model": good["model"], "ema": [1, 2]}, tmp_path / "badema.pt")
    (tmp_path / "text.pt").write_text("just some text")
    return {"empty.pt": "not a loadable checkpoint: the file is empty",
            "cut.pt": "not a loadable checkpoint: the file is cut short or damaged",
            "zip.pt": "not a loadable checkpoint: it is a zip archive, not a PyTorch file",
            "text.pt": "not a loadable checkpoint: it is not a PyTorch file",
            "folder.pt": "is not a file",
            "tensor.pt": "not a checkpoint of this script",
            "strings.pt": "holds a different network",
            "badema.pt": "not a checkpoint of this script"}


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_files_that_are_not_checkpoints(mode, tmp_path, capsys):
    for name, expected in checkpoint_files(tmp_path).items():
        err = fails([mode, tmp_path / name], capsys, expected)
        assert name in err


@pytest.fixture
def finished_run(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    trains(["--data-dir", image_folder, "--out", run, "--epochs", 3, "--batch-size", 20,
            "--workers", 0], capsys)
    return run


@pytest.mark.parametrize("damage", [
    lambda s: s.update(optimizer={"state": {}}),
    lambda s: s["scheduler"].update(last_epoch=5),  # not where epoch 3 ends
    lambda s: s["history"].pop(),
    lambda s: s["scheduler"].pop("last_epoch"),
    lambda s: s.update(rng=torch.zeros(3))])
def test_damaged_training_state(finished_run, capsys, damage):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    damage(state)
    torch.save(state, finished_run / "damaged.pt")
    fails(["--resume", finished_run / "damaged.pt"], capsys, "damaged training state")


def test_resume_on_other_data_than_the_run_trained_on(finished_run, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", per_class=(2, 2))
    fails(["--resume", finished_run / "last.pt", "--data-dir", other], capsys,
          "is not the data this run trained on: its train split has [2, 2, 2")


def test_resume_from_an_earlier_epoch_needs_overwrite(finished_run, capsys):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    state.update(epoch=1, history=state["history"][:1])
    torch.save(state, finished_run / "epoch1.pt")
    before = (finished_run / "metrics.csv").read_text()
    fails(["--resume", finished_run / "epoch1.pt"], capsys, "would rewrite them")
    assert (finished_run / "metrics.csv").read_text() == before


@pytest.mark.parametrize("flags,expected", [
    (["--epochs", 5], "--epochs cannot change on --resume"),
    (["--lr", 0.1, "--seed", 3], "--lr, --seed cannot be given with --resume"),
    (["--out", "elsewhere"], "--out cannot be given with --resume")])
def test_resume_refuses_the_settings_it_keeps(finished_run, capsys, flags, expected):
    fails(["--resume", finished_run / "last.pt", *flags], capsys, expected)


def test_resume_with_a_moved_data_folder_from_another_directory(image_folder, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    real = exp.train_one_epoch

    def ctrl_c_in_epoch_2(training, loader, runtime, epoch, *rest):
        if epoch == 2:
            raise exp.Stopped(signal.SIGINT)
        return real(training, loader, runtime, epoch, *rest)
    monkeypatch.setattr(exp, "train_one_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(SystemExit) as stop:
        exp.main(["--data-dir", image_folder.name, "--out", "run", "--epochs", "2",
                  "--batch-size", "20", "--workers", "0"])
    assert stop.value.code == 130 and "--resume run/last.pt" in capsys.readouterr().err
    monkeypatch.setattr(exp, "train_one_epoch", real)
    shutil.move(image_folder, tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    fails(["--resume", "../run/last.pt"], capsys, "give --data-dir")
    assert not (tmp_path / "elsewhere" / image_folder.name).exists()  # no empty download folder
    out = trains(["--resume", "../run/last.pt", "--data-dir", "../moved"], capsys)
    assert "data: ImageFolder ../moved:" in out and "Epoch 2/2" in out


def test_resume_of_a_finished_run_writes_its_report_again(finished_run, capsys):
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        (finished_run / name).unlink()
    drawn_at_start = (finished_run / "augmentations.png").stat().st_mtime_ns
    out = trains(["--resume", finished_run / "last.pt"], capsys)
    assert "resumed from" in out and "Done: final test accuracy" in out
    assert all((finished_run / n).stat().st_size > 0 for n in ("curves.png", "confusion.png"))
    assert (finished_run / "augmentations.png").stat().st_mtime_ns == drawn_at_start
    assert len(rows(finished_run)) == 3


# ---- --out

def test_out_that_cannot_be_a_folder(image_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    decoded = []
    monkeypatch.setattr(exp, "load_cifar10", lambda *a, **k: decoded.append(a))
    fails(["--data-dir", image_folder, "--out", tmp_path / "file"], capsys, "is a file")
    fails(["--data-dir", image_folder, "--out", tmp_path / "file" / "run"], capsys, "is a file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if not root, read-only
    fails(["--data-dir", image_folder, "--out", tmp_path / "ro" / "run"], capsys, "not writable")
    assert decoded == []  # refused before any image was decoded


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(exp.time, "strftime", lambda fmt: "20260101-000000")
    args = exp.parse_command_line([])[0]
    first, second = exp.make_run_folder(args), exp.make_run_folder(args)
    assert (first.name, second.name) == ("20260101-000000", "20260101-000000-2")


def test_overwrite_removes_the_previous_runs_pictures(finished_run, image_folder, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(exp, "report", lambda *a: None)  # the new run ends before its pictures
    trains(["--data-dir", image_folder, "--out", finished_run, "--overwrite", *TINY], capsys)
    assert sorted(p.name for p in finished_run.iterdir()) == [
        "augmentations.png", "best.pt", "last.pt", "metrics.csv", "train.log"]


def test_a_folder_holding_only_an_unfinished_runs_log_is_reused(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("data: ...\nconfig: ...\nEpoch 1, Batch 100: Train Loss: 2\n")
    trains(["--data-dir", image_folder, "--out", run, *TINY], capsys)
    assert (run / "train.log").read_text().startswith("data: ImageFolder")
    assert len(rows(run)) == 1
