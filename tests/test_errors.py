"""Bad input gives one clear line on stderr and exit status 2; nothing is left half-written."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RUN, exp, make_image_folder, refused


def fails(args):
    return refused(args, "")


@pytest.mark.parametrize("flag,value", [("--epochs", 0), ("--batch-size", -1), ("--limit", 0),
                                        ("--lr", 0), ("--lr", "-0.1"), ("--epochs", "ten"),
                                        ("--device", "tpu"), ("--dropout-p", 1.5),
                                        ("--weight-decay", "-0.0001")])
def test_nonsense_flags(flag, value):
    err = fails([flag, value])
    assert flag in err


def test_help_shows_each_default_once_and_no_empty_ones():
    parser = exp.build_parser()
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    for action in parser._actions:
        shown = action.default is not None and action.default is not False
        if shown and action.option_strings != ["-h", "--help"]:
            assert text.count(f"{action.help} (default: {action.default})") == 1, action.dest
    assert "(default: None)" not in text and "(default: False)" not in text


def test_tta_outside_evaluate(tmp_path):
    assert "--tta" in fails(["--tta", "--data-dir", tmp_path])


def test_negative_workers(tmp_path):
    assert "--workers" in fails(["--workers", -1, "--data-dir", tmp_path])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_where_there_is_none(image_folder):
    assert "no CUDA device" in fails(["--device", "cuda", "--data-dir", image_folder])


def test_mps_requested_where_there_is_none(image_folder):
    if torch.backends.mps.is_available():
        pytest.skip("MPS is present")
    assert "MPS is not available" in fails(["--device", "mps", "--data-dir", image_folder])


def test_missing_data_dir_offline_says_how_to_point_at_a_local_copy(tmp_path, offline):
    err = fails(["--data-dir", tmp_path / "absent", "--out", tmp_path / "run"])
    assert "--data-dir" in err and "ImageFolder" in err
    assert not (tmp_path / "absent").exists() and not (tmp_path / "run").exists()


def test_a_misspelled_nested_data_dir_leaves_no_folders_behind(tmp_path, offline):
    fails(["--data-dir", tmp_path / "a" / "b" / "c"])
    assert not (tmp_path / "a").exists()


def test_a_users_damaged_archive_is_left_as_it_was(tmp_path, offline):
    (tmp_path / "data").mkdir()
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.write_bytes(b"half a download")
    assert "is damaged or not the official archive" in fails(["--data-dir", tmp_path / "data"])
    assert archive.read_bytes() == b"half a download"


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # a 32x32 image counts as a bomb now
    err = fails(["--data-dir", data, "--out", tmp_path / "run"])
    assert "cannot read image" in err and "decompression bomb" in err


def test_empty_data_dir_offline_leaves_no_partial_download(tmp_path, offline):
    (tmp_path / "empty").mkdir()
    assert "downloading it failed" in fails(["--data-dir", tmp_path / "empty"])
    assert list((tmp_path / "empty").iterdir()) == []


def test_folder_that_is_not_cifar10(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    err = fails(["--data-dir", tmp_path / "photos"])
    assert "is not a CIFAR-10 folder" in err and "train/<class>" in err


@pytest.mark.parametrize("change,expected", [
    (lambda t: os.rename(t / "test" / "frog", t / "test" / ".frog"), "missing: frog"),
    (lambda t: (t / "train" / "unicorn").mkdir(), "unexpected: unicorn"),
    (lambda t: os.rename(t / "train" / "automobile", t / "train" / "car"),
     "missing: automobile; unexpected: car"),
])
def test_wrong_class_layout_names_what_is_wrong(tmp_path, change, expected):
    root = make_image_folder(tmp_path / "tree", per_class=(2, 2))
    change(root)
    err = fails(["--data-dir", root])
    assert expected in err and "exactly the ten CIFAR-10 class folders" in err


def test_empty_class_folder(tmp_path):
    root = make_image_folder(tmp_path / "tree", per_class=(2, 2))
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    assert f"{root / 'train' / 'cat'} holds no images" in fails(["--data-dir", root])


def test_stray_files_are_skipped_and_odd_images_converted(tmp_path):
    root = make_image_folder(tmp_path / "tree", per_class=(2, 2))
    for name in (".DS_Store", "Thumbs.db", "README"):
        (root / "train" / "cat" / name).write_bytes(b"\0junk")
    Image.new("L", (32, 32), 128).save(root / "train" / "dog" / "gray.png")
    Image.new("RGBA", (32, 32), (10, 20, 30, 40)).save(root / "train" / "dog" / "rgba.png")
    Image.new("RGB", (64, 64), (200, 100, 50)).save(root / "train" / "dog" / "big.png")
    splits, _, notes, _ = exp.load_cifar10(root)
    x, y = splits["train"]
    assert x.shape == (23, 32, 32, 3)
    assert len(notes["non-image files skipped"]) == 3
    assert len(notes["converted to RGB"]) == 2 and len(notes["resized to 32x32"]) == 1
    dog = x[y == exp.CLASSES.index("dog")]
    assert (dog == [200, 100, 50]).all(-1).all((1, 2)).sum() == 1  # the 64x64 one, resized
    assert (dog == 128).all((1, 2, 3)).sum() == 1  # the grayscale one, as RGB


def test_corrupt_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path / "tree", per_class=(2, 2))
    good = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(good).save(root / "test" / "ship" / "bad.jpg", quality=95)
    data = (root / "test" / "ship" / "bad.jpg").read_bytes()
    (root / "test" / "ship" / "bad.jpg").write_bytes(data[: len(data) // 2])
    err = fails(["--data-dir", root, "--out", tmp_path / "run"])
    assert "bad.jpg" in err and "cannot read image" in err
    assert not (tmp_path / "run").exists()


EPOCH_LOG = ("Epoch 1/60, Train Loss: 2.0, Train Accuracy: 20.00%, Test Loss: 2.0, "
             "Test Accuracy: 30.00%\n")


@pytest.mark.parametrize("files", [{"train.log": EPOCH_LOG, "last.pt": "x"},
                                   {"metrics.csv": "epoch\n1\n"}])
def test_existing_run_folder_is_not_overwritten(image_folder, tmp_path, files):
    (tmp_path / "run").mkdir()
    for name, text in files.items():
        (tmp_path / "run" / name).write_text(text)
    err = fails(["--data-dir", image_folder, "--out", tmp_path / "run"])
    assert "--overwrite" in err
    # never a resume hint for a file that is not there
    assert ("--resume" in err) == ("last.pt" in files)
    assert {f.name: f.read_text() for f in (tmp_path / "run").iterdir()} == files


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_checkpoint_that_does_not_exist(mode, tmp_path):
    assert "does not exist" in fails([mode, tmp_path / "nope.pt"])


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_file_that_is_not_a_checkpoint(mode, tmp_path):
    (tmp_path / "notes.pt").write_text("just some text")
    assert "is not a loadable checkpoint" in fails([mode, tmp_path / "notes.pt"])


@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_checkpoint_of_a_different_network(mode, tmp_path):
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, tmp_path / "other.pt")
    assert "holds a different network" in fails([mode, tmp_path / "other.pt"])


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f, protocol=2)
    err = fails(["--evaluate", tmp_path / "evil.pt"])
    assert "refused for safety" in err
    assert not MARKER.exists()


def test_a_pickle_that_is_not_a_torch_file_is_one_line_without_a_warning(tmp_path):
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump({"model": {}}, f, protocol=5)  # torch warns of the protocol, if asked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "is not a loadable checkpoint" in fails(["--evaluate", tmp_path / "raw.pt"])
    assert not caught, [str(w.message) for w in caught]


def test_exploding_loss_stops_with_a_clear_message(tiny, tmp_path, quick):
    err = fails(["--data-dir", tiny, "--out", tmp_path / "run", *RUN, "--lr", 1e30])
    assert "epoch 1, batch" in err and "stopped" in err


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tiny, tmp_path, quick, monkeypatch):
    real = exp.train_one_epoch

    def nan_in_epoch_2(training, loader, runtime, epoch, *rest):
        if epoch == 2:
            raise exp.NonFiniteLoss("loss became nan at epoch 2, batch 5")
        return real(training, loader, runtime, epoch, *rest)
    monkeypatch.setattr(exp, "train_one_epoch", nan_in_epoch_2)
    run = tmp_path / "run"
    err = fails(["--data-dir", tiny, "--out", run, *RUN])
    assert "epoch 2, batch 5" in err and f"last good checkpoint is {run / 'last.pt'}" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert (run / "train.log").read_text().splitlines()[-1] == err.strip()  # the log keeps it


def test_resume_from_weights_without_training_state(tmp_path):
    torch.save({"model": exp.Net().state_dict()}, tmp_path / "weights.pt")
    assert "no training state" in fails(["--resume", tmp_path / "weights.pt"])


def test_loadable_file_that_is_not_this_scripts_checkpoint(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    err = fails(["--evaluate", tmp_path / "other.pt"])
    assert "is not a checkpoint of this script" in err
