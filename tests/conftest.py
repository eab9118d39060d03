"""What the tests share: the script imported, tiny image folders, the script run in this process,
and runs made once per test session that tests copy instead of training their own."""
import contextlib
import csv
import io
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

import experiment2_cifar_cnn as exp  # noqa: E402
from processes import PLOTS, Ended, blank_figure  # noqa: E402

JPEG_COPY = ROOT.parent / "shared" / "cifar10-jpeg"
needs_jpeg_copy = pytest.mark.skipif(not (JPEG_COPY / "train").is_dir(),
                                     reason=f"{JPEG_COPY} not present")
# how most tests train: on the tiny folder (40 training images, 20 test), 3 epochs of 2 steps
RUN = ["--epochs", 3, "--batch-size", 20, "--seed", 7, "--workers", 0]


def make_image_folder(root, per_class=(20, 10), size=32):
    """A small ImageFolder tree: each class a distinct colour plus noise, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(exp.CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            colour = np.array([(c * 25) % 256, (c * 80) % 256, 255 - c * 25])
            for i in range(n):
                img = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def run_main(args):
    """The script run in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = exp.main([str(a) for a in args])
    return Ended(status, out.getvalue(), err.getvalue())


def refused(args, expected):
    """Runs args, which must end in one line on stderr with exit status 2; returns the line."""
    ended = run_main(args)
    err = ended.err.strip()
    assert ended.status == 2, ended
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    return err


def trains(args):
    """Runs args, which must end with exit status 0; returns stdout."""
    ended = run_main(args)
    assert ended.status == 0, ended.err
    return ended.out


def metrics(folder):
    """metrics.csv without its time columns."""
    with open(folder / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def stopped_in_epoch(epoch, monkeypatch):
    """train_one_epoch interrupted, as by Ctrl-C, at the start of the given epoch."""
    real = exp.train_one_epoch

    def cut(training, loader, runtime, at, *rest):
        if at == epoch:
            raise exp.Stopped(signal.SIGINT)
        return real(training, loader, runtime, at, *rest)
    monkeypatch.setattr(exp, "train_one_epoch", cut)


def quick_pictures(monkeypatch):
    """Blank pictures (processes.blank_figure) instead of the real ones."""
    for name in PLOTS:
        monkeypatch.setattr(exp, name, blank_figure)


@pytest.fixture
def quick(monkeypatch):
    """Runs in the test draw blank pictures."""
    quick_pictures(monkeypatch)


@pytest.fixture
def brief_benchmark(monkeypatch):
    """The benchmark's measurements at their shortest: three calls each, no warm-up."""
    real = exp.rate
    monkeypatch.setattr(exp, "rate", lambda fn, device, *timing: real(fn, device, 0, 0))


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """torchvision's download pointed at a file that does not exist: no test touches the network."""
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The folder most runs train on (tests must not change it)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "data", per_class=(4, 2))


@pytest.fixture(scope="session")
def finished(tiny, tmp_path_factory):
    """A finished run of RUN, pictures included; copy it (copy_run) to change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trains(["--data-dir", tiny, "--out", out, *RUN])
    return out


@pytest.fixture(scope="session")
def stopped(tiny, tmp_path_factory):
    """Runs of RUN stopped by Ctrl-C in their second epoch: seed 7 ('a') and seed 8 ('b')."""
    folder = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as monkeypatch:
        quick_pictures(monkeypatch)
        stopped_in_epoch(2, monkeypatch)
        for name, seed in (("a", 7), ("b", 8)):
            assert run_main(["--data-dir", tiny, "--out", folder / name, *RUN,
                             "--seed", seed]).status == 130  # the later --seed is the one taken
    return folder


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(folder, name="run"): a copy of a session run, to change."""
    def copy(folder, name="run"):
        return Path(shutil.copytree(folder, tmp_path / name, symlinks=True))
    return copy


@pytest.fixture(autouse=True)
def stop_state_restored():
    """main takes SIGINT, SIGTERM and SIGHUP and keeps state in exp.STOP: pytest gets its handlers
    back and the next test a fresh STOP."""
    saved = {sig: signal.getsignal(sig) for sig in exp.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    exp.STOP.__init__()


def pytest_collection_finish(session):
    """Tests that fork script processes: their server imports the script (seconds) while the
    first tests run."""
    if any(item.module.__name__ == "test_signals" for item in session.items):
        import multiprocessing.forkserver
        multiprocessing.forkserver.ensure_running()
