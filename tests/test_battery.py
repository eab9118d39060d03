"""A battery of odd inputs: each completes correctly, or ends in one line on stderr with exit 2,
before anything is written. (Interruptions: test_signals.py.)"""
import logging
import os
import re
import shutil
import signal
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    RUN,
    exp,
    make_image_folder,
    metrics,
    refused,
    run_main,
    stopped_in_epoch,
    trains,
)

pytestmark = pytest.mark.usefixtures("quick")  # blank pictures: see conftest.quick_pictures
ONE_EPOCH = ["--epochs", 1, "--batch-size", 20, "--workers", 0]


@pytest.fixture
def tree(tmp_path):
    return make_image_folder(tmp_path / "tree", per_class=(4, 2))


# ---- flags

@pytest.mark.parametrize("flag,value", [
    ("--seed", 2**64), ("--seed", -1), ("--seed", "1e3"), ("--warmup", 1.5), ("--warmup", "x"),
    ("--label-smoothing", "nan"), ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"),
    ("--workers", -1), ("--ema", -0.5), ("--log-every", 0), ("--val", "0"),
    pytest.param("--epochs", "1" + "0" * 400, id="--epochs-10**400"),  # past an int64
    # finite as Python floats, but not in the float32 the step computes in
    ("--lr", "1e39"), ("--weight-decay", "1e300"),
    ("--workers", 100_000),  # forked until forking failed, then hung
    ("--ema", 1)])  # no longer an average with a decay of its own
def test_flag_values_that_cannot_train_are_refused_by_the_parser(flag, value):
    err = refused([flag, value], flag)
    assert err.endswith("(see --help)")


def test_a_fraction_where_a_whole_number_is_wanted():
    refused(["--batch-size", "3.5"], "'3.5' is not a whole number")


def test_a_log_interval_longer_than_an_epoch_costs_no_memory(tiny, tmp_path):
    # the window of per-batch losses is the epoch's length, not the flag's
    out = trains(["--data-dir", tiny, "--out", tmp_path / "run", *ONE_EPOCH,
                  "--log-every", 10_000_000_000_000])
    assert "Epoch 1/1," in out and ", Batch " not in out


@pytest.mark.parametrize("mode,unused", [
    (["--evaluate", "x.pt"], ["--val", 5, "--epochs", 2, "--lr", 0.1, "--seed", 1, "--out", "o"]),
    (["--benchmark"], ["--out", "o", "--epochs", 2]),
    (["--summary"], ["--seed", 1])])
def test_every_mode_refuses_the_flags_it_does_not_use(mode, unused):
    names = sorted(str(a) for a in unused if str(a).startswith("--"))
    refused([*mode, *unused], f"{mode[0]} does not use {', '.join(names)}")


@pytest.mark.parametrize("warmup", ["1", "0"])
def test_warmup_at_either_end_trains(tiny, tmp_path, warmup):
    # 10 steps: the schedule's value one step past its end is what the checkpoint keeps
    trains(["--data-dir", tiny, "--out", tmp_path / "run", "--warmup", warmup, *ONE_EPOCH,
            "--batch-size", 4])
    (epoch,) = metrics(tmp_path / "run")
    assert float(epoch["train_loss"]) < 5
    lr = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(group["lr"] < 0.01 for group in lr)  # annealed at the end either way


def test_a_warmup_of_exactly_one_step_trains(tiny, tmp_path):
    # 40 images / batch 8 = 5 steps; 20% of 5 is one step, where OneCycleLR divided by zero
    trains(["--data-dir", tiny, "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 8,
            "--workers", 0])
    assert len(metrics(tmp_path / "run")) == 1


def test_batch_larger_than_the_data_writes_nothing_and_a_retry_works(tiny, tmp_path):
    run = tmp_path / "run"
    refused(["--data-dir", tiny, "--out", run, "--epochs", 1, "--batch-size", 500],
          "--batch-size 500 is larger than the 40 training images")
    assert not run.exists()
    trains(["--data-dir", tiny, "--out", run, *ONE_EPOCH])
    assert len(metrics(run)) == 1


def test_classes_without_test_images_print_no_nan(tiny, tmp_path):
    out = trains(["--data-dir", tiny, "--out", tmp_path / "run", "--limit", 5,
                  "--batch-size", 4, "--epochs", 1, "--workers", 0])
    per_class = next(line for line in out.splitlines() if line.startswith("Per-class"))
    assert "nan" not in per_class and "truck (no images)" in per_class


@pytest.mark.parametrize("combo,expected", [
    (["--resume", "x.pt", "--evaluate", "y.pt"], "not allowed with argument"),
    (["--summary", "--benchmark"], "not allowed with argument"),
    (["--tta"], "--tta applies to --evaluate"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA")])
def test_flag_combinations_that_cannot_work(combo, expected, tiny):
    refused([*combo, "--data-dir", tiny], expected)


def test_benchmark_with_fewer_images_than_a_batch_is_refused_before_it_measures(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(exp, "rate", lambda *args: pytest.fail("measured before refusing"))
    refused(["--benchmark", "--data-dir", tmp_path / "none", "--limit", 20],
          "--benchmark needs at least --batch-size (64) training images; it has 20")


# ---- data

def test_data_dir_that_is_a_file_or_under_one(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(["--data-dir", tmp_path / "file"], "is not a CIFAR-10 folder")
    refused(["--data-dir", tmp_path / "file" / "sub"], "is a file, not a folder")


def test_class_folder_that_cannot_be_read(tree, tmp_path, monkeypatch):
    real = os.scandir

    def scandir(path):
        if str(path).endswith("cat"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    refused(["--data-dir", tree, "--out", tmp_path / "run"], "Permission denied")
    assert not (tmp_path / "run").exists()


def test_class_entry_that_is_a_file(tree):
    shutil.rmtree(tree / "train" / "cat")
    (tree / "train" / "cat").write_text("not a folder")
    refused(["--data-dir", tree], "missing: cat")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a"])
def test_image_files_that_are_empty_or_broken(tree, tmp_path, content):
    (tree / "test" / "dog" / "broken.png").write_bytes(content)
    err = refused(["--data-dir", tree, "--out", tmp_path / "run"], "broken.png")
    assert "BytesIO" not in err and ("the file is empty" in err) == (content == b"")
    assert not (tmp_path / "run").exists()


def test_val_leaves_the_test_folder_unread_and_unneeded(tree, tmp_path):
    shutil.rmtree(tree / "test")
    out = trains(["--data-dir", tree, "--out", tmp_path / "run", "--val", 10, *ONE_EPOCH,
                  "--batch-size", 10])
    assert "30 train / 10 val images" in out


def test_sixteen_bit_grayscale_png_looks_like_its_picture(tree):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tree / "train" / "cat" / "deep.png")
    splits, _, notes, _ = exp.load_cifar10(tree)
    loaded = exp.read_image(tree / "train" / "cat" / "deep.png", {})
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.abs(loaded[..., 0].astype(int) - expected).max() <= 1
    assert (loaded[..., 0] == loaded[..., 2]).all() and loaded.mean() < 200
    assert len(notes["converted to RGB"]) == 1


def test_odd_entries_in_a_class_folder_are_skipped_or_converted(tree, tmp_path):
    cat = tree / "train" / "cat"
    (cat / "folder.png").mkdir()
    (cat / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    Image.new("P", (1, 1)).save(cat / "tiny_palette.png", transparency=0)
    splits, _, notes, _ = exp.load_cifar10(tree)
    assert len(splits["train"][1]) == 41
    assert [p.name for p in notes["subfolders of class folders skipped"]] == ["folder.png"]
    assert [p.name for p in notes["non-image files skipped"]] == ["dangling.png"]
    assert [p.name for p in notes["resized to 32x32"]] == ["tiny_palette.png"]


@pytest.mark.filterwarnings("error")  # Pillow warns of such a palette, if not asked for RGBA
def test_a_palette_image_with_transparency_is_converted_without_a_warning(tree):
    palette = Image.new("P", (32, 32))
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    palette.save(tree / "train" / "cat" / "palette.png", transparency=b"\x00\x80")
    image = exp.read_image(tree / "train" / "cat" / "palette.png", {})
    assert (image[:, :16] == [200, 30, 30]).all() and (image[:, 16:] == 0).all()


def test_evaluate_decodes_the_test_split_only(finished, tiny, monkeypatch):
    read = []
    real = exp.load_image_folder
    monkeypatch.setattr(exp, "load_image_folder",
                        lambda split_dir, *a: read.append(split_dir.name) or real(split_dir, *a))
    out = trains(["--evaluate", finished / "last.pt", "--data-dir", tiny])
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
def test_files_that_are_not_checkpoints(mode, tmp_path):
    for name, expected in checkpoint_files(tmp_path).items():
        err = refused([mode, tmp_path / name], expected)
        assert name in err


@pytest.fixture
def finished_run(finished, copy_run):
    return copy_run(finished)


@pytest.mark.parametrize("damage", [
    lambda s: s.update(optimizer={"state": {}}),
    lambda s: s["scheduler"].update(last_epoch=5),  # not where epoch 3 ends
    lambda s: s["history"].pop(),
    lambda s: s["scheduler"].pop("last_epoch"),
    lambda s: s.update(rng=torch.zeros(3)),
    # forged: each part a resume reads, of another type than it wrote
    lambda s: s.pop("resolved"),
    lambda s: s["resolved"].update(threads=2**40),
    lambda s: s["resolved"].update(threads=True),
    lambda s: s.update(scheduler=list(s["scheduler"])),
    lambda s: s.update(optimizer="adam"),
    lambda s: s["history"][0].update(test_acc="50%"),
    lambda s: s["history"][0].pop("lr"),
    lambda s: s.update(run_id=["a"]),
    lambda s: s.update(data_dir_resolved=5),
    lambda s: s["scheduler"].pop("total_steps"),
    lambda s: s["args"].pop("epochs")])
def test_damaged_training_state(finished_run, damage):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    damage(state)
    torch.save(state, finished_run / "damaged.pt")
    refused(["--resume", finished_run / "damaged.pt"], "damaged training state")


def test_resume_on_other_data_than_the_run_trained_on(finished_run, tmp_path):
    other = make_image_folder(tmp_path / "other", per_class=(2, 2))
    refused(["--resume", finished_run / "last.pt", "--data-dir", other],
          "is not the data this run trained on: its train split has [2, 2, 2")


@pytest.mark.parametrize("name", ["epoch1.pt", "last.pt"])
def test_resume_from_an_earlier_epoch_needs_overwrite(finished_run, name):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    state.update(epoch=1, history=state["history"][:1])
    torch.save(state, finished_run / name)
    before = (finished_run / "metrics.csv").read_text()
    err = refused(["--resume", finished_run / name], "would rewrite them; ")
    # the run's own last.pt is suggested, unless that is the file being resumed
    assert (f"resume from {finished_run / 'last.pt'}, or" in err) == (name != "last.pt")
    assert (finished_run / "metrics.csv").read_text() == before


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s["args"].update(batch_size="x"), "--batch-size: 'x' is not a whole number"),
    (lambda s: s["args"].update(device="tpu"), "--device: invalid choice: 'tpu'"),
    (lambda s: s["args"].update(epochs=0), "--epochs: must be > 0, got 0"),
    (lambda s: s["args"].update(compile="yes"), "damaged setting: compile='yes'"),
    (lambda s: s.update(args={**s["args"], "data_dir": 5}, data_dir_resolved="/nowhere"),
     "(--data-dir 5) is not found from here"),
    (lambda s: s["resolved"].update(workers=-1), "--workers: must be >= 0, got -1"),
    (lambda s: s["resolved"].update(precision="fp8"), "--precision: invalid choice: 'fp8'"),
    (lambda s: s["resolved"].update(precision="fp16"), "--precision fp16 needs CUDA"),
    (lambda s: s.update(data={}), "holds a damaged record of its data"),
])
def test_a_checkpoint_with_edited_settings_is_refused_in_one_line(finished_run, edit, expected):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, finished_run / "last.pt")
    refused(["--resume", finished_run / "last.pt"], expected)


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_a_checkpoint_with_a_flipped_byte_is_refused(finished_run, mode):
    data = bytearray((finished_run / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # in the middle of the weights
    (finished_run / "last.pt").write_bytes(data)
    refused([mode, finished_run / "last.pt"], "is not a loadable checkpoint: the file is damaged")


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_a_checkpoint_path_with_a_name_too_long(tmp_path, mode):
    refused([mode, tmp_path / ("x" * 300) / "last.pt"], "File name too long")


def test_a_metrics_csv_past_the_csv_field_limit_does_not_stop_a_resume(stopped, copy_run):
    run = copy_run(stopped / "a")
    (run / "metrics.csv").write_text("epoch,note\n1," + "x" * 200_000 + "\n")
    trains(["--resume", run / "last.pt"])  # the checkpoint's history is what counts
    assert len(metrics(run)) == 3


@pytest.mark.parametrize("name", ["curves.png", "last.pt"])
def test_a_folder_named_as_a_run_file_is_refused(tiny, tmp_path, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    err = refused(["--data-dir", tiny, "--out", tmp_path / "run", *ONE_EPOCH],
                f"{tmp_path / 'run' / name} is a folder, where the run writes a file")
    assert "--resume" not in err


def test_a_folder_named_as_a_run_file_is_refused_on_resume(stopped, copy_run):
    run = copy_run(stopped / "a")
    (run / "curves.png").mkdir()
    refused(["--resume", run / "last.pt"], f"{run / 'curves.png'} is a folder")


def test_the_final_line_lists_the_files_the_folder_holds(finished_run):
    (finished_run / "best.pt").unlink()
    out = trains(["--resume", finished_run / "last.pt"])
    assert out.splitlines()[-1] == (f"run folder: {finished_run} (train.log, metrics.csv, last.pt, "
                                    "augmentations.png, curves.png, confusion.png, "
                                    "misclassified.png)")


def test_more_workers_than_cpus_is_a_note_not_a_warning(tiny, tmp_path):
    workers = exp.usable_cpus() + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = trains(["--data-dir", tiny, "--out", tmp_path / "run", *ONE_EPOCH,
                      "--workers", workers])
    assert f"note: {workers} workers on {exp.usable_cpus()} usable CPUs" in out
    assert not [w for w in caught if "DataLoader" in str(w.message)]


def test_compiling_on_a_cpu_silences_torchs_no_cuda_runtime_line():
    # printed where a CUDA toolkit is installed but no GPU: not the user's concern
    runtime = exp.Runtime(torch.device("cpu"), "fp32", True, compile=True)
    exp.stepped_module(exp.Net(), runtime, batch_size=8)
    assert logging.getLogger("torch.utils.cpp_extension").level == logging.ERROR


@pytest.mark.parametrize("flags,expected", [
    (["--epochs", 5], "--epochs cannot change on --resume"),
    (["--lr", 0.1, "--seed", 3], "--lr, --seed cannot be given with --resume"),
    (["--out", "elsewhere"], "--out cannot be given with --resume")])
def test_resume_refuses_the_settings_it_keeps(finished_run, flags, expected):
    refused(["--resume", finished_run / "last.pt", *flags], expected)


@pytest.fixture
def relative_run(tiny, tmp_path, monkeypatch):
    """A run started in tmp_path with --data-dir data, stopped by Ctrl-C in epoch 2; the test
    goes on in tmp_path/elsewhere."""
    shutil.copytree(tiny, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as stopping:
        stopped_in_epoch(2, stopping)
        ended = run_main(["--data-dir", "data", "--out", "run", *RUN])
    assert ended.status == 130 and f"--resume {tmp_path / 'run' / 'last.pt'}" in ended.err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "run"


def test_resume_with_a_moved_data_folder_from_another_directory(relative_run, tmp_path):
    shutil.move(tmp_path / "data", tmp_path / "moved")
    refused(["--resume", "../run/last.pt"], "give --data-dir")
    assert not (tmp_path / "elsewhere" / "data").exists()  # no empty download folder
    out = trains(["--resume", "../run/last.pt", "--data-dir", "../moved"])
    assert "data: ImageFolder ../moved:" in out and "Epoch 3/3" in out


def test_resume_of_a_relative_data_folder_from_another_directory(relative_run):
    out = trains(["--resume", "../run/last.pt"])
    assert "data: ImageFolder data:" in out and "Epoch 3/3" in out


def test_resume_of_a_finished_run_writes_its_report_again(finished_run):
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        (finished_run / name).unlink()
    drawn_at_start = (finished_run / "augmentations.png").stat().st_mtime_ns
    out = trains(["--resume", finished_run / "last.pt"])
    assert "resumed from" in out and "Done: final test accuracy" in out
    assert all((finished_run / n).stat().st_size > 0 for n in ("curves.png", "confusion.png"))
    assert (finished_run / "augmentations.png").stat().st_mtime_ns == drawn_at_start
    assert len(metrics(finished_run)) == 3


# ---- --out

def test_out_that_cannot_be_a_folder(tiny, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    decoded = []
    monkeypatch.setattr(exp, "load_cifar10", lambda *a, **k: decoded.append(a))
    refused(["--data-dir", tiny, "--out", tmp_path / "file"], "is a file")
    refused(["--data-dir", tiny, "--out", tmp_path / "file" / "run"], "is a file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if not root, read-only
    refused(["--data-dir", tiny, "--out", tmp_path / "ro" / "run"], "not writable")
    assert decoded == []  # refused before any image was decoded


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(exp.time, "strftime", lambda fmt: "20260101-000000")
    args = exp.parse_command_line([])[0]
    first, second = exp.make_run_folder(args), exp.make_run_folder(args)
    assert (first.name, second.name) == ("20260101-000000", "20260101-000000-2")


def test_overwrite_removes_the_previous_runs_pictures(finished_run, tiny, monkeypatch):
    monkeypatch.setattr(exp, "report", lambda *a: None)  # the new run ends before its pictures
    trains(["--data-dir", tiny, "--out", finished_run, "--overwrite", *ONE_EPOCH])
    assert sorted(p.name for p in finished_run.iterdir()) == [
        "augmentations.png", "best.pt", "last.pt", "metrics.csv", "train.log"]


def test_a_folder_holding_only_an_unfinished_runs_log_is_reused(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("data: ...\nconfig: ...\nrun id: 0123456789ab\n"
                                   "Epoch 1, Batch 100: Train Loss: 2\n")
    trains(["--data-dir", tiny, "--out", run, *ONE_EPOCH])
    assert (run / "train.log").read_text().startswith("data: ImageFolder")
    assert len(metrics(run)) == 1


@pytest.mark.parametrize("flag", ["--out", "--data-dir"])
def test_a_symbolic_link_loop_is_one_line(tiny, tmp_path, offline, flag):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    args = ["--out", tmp_path / "run", "--data-dir", tiny, *ONE_EPOCH]
    args[args.index(flag) + 1] = tmp_path / "loop"
    refused(args, f"{flag} {tmp_path / 'loop'} is a symbolic link that leads nowhere, or in a loop")


def test_odd_bytes_and_control_characters_in_names_are_escaped_in_the_log(tiny, tmp_path):
    # a legal Linux name that is not UTF-8; a folder name holding a line of the log's own
    data = tmp_path / "copy\nrun id: forged"
    shutil.copytree(tiny, data)
    run = tmp_path / os.fsdecode(b"run-\xff")
    out = trains(["--data-dir", data, "--out", run, *ONE_EPOCH])
    log = (run / "train.log").read_text()
    assert "copy\\nrun id: forged" in log and "run-\\udcff" in out
    assert exp.run_ids_in_log(run / "train.log") == re.findall(r"run id: (\w+)\n", out)[-1:]


def test_a_stop_is_said_once(tmp_path):
    log = exp.RunLog()
    log.open(tmp_path, append=False)
    stop = exp.Stop(log)
    for _ in range(2):  # a second signal just after the first stop's line
        stop.say(exp.Stopped(signal.SIGINT))
    assert (tmp_path / "train.log").read_text() == (
        "interrupted by Ctrl-C: no epoch had finished, nothing to resume\n")


def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(finished_run):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    state["ema"]["fc.bias"][0] = float("nan")
    torch.save(state, finished_run / "last.pt")
    for mode in ("--resume", "--evaluate"):
        refused([mode, finished_run / "last.pt"], "holds weights that are not finite numbers")


def test_best_pt_is_written_only_on_a_new_best(tiny, tmp_path, monkeypatch):
    real, accuracies = exp.evaluate, [60.0, 50.0, 40.0]

    def falling(*args, **kwargs):
        loss, _, preds = real(*args, **kwargs)
        return loss, accuracies.pop(0), preds
    monkeypatch.setattr(exp, "evaluate", falling)
    trains(["--data-dir", tiny, "--out", tmp_path / "run", *RUN])
    epochs = {name: torch.load(tmp_path / "run" / name, weights_only=True)["epoch"]
              for name in ("best.pt", "last.pt")}
    assert epochs == {"best.pt": 1, "last.pt": 3}
