import os
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

JPEG_COPY = ROOT.parent / "shared" / "cifar10-jpeg"
needs_jpeg_copy = pytest.mark.skipif(not (JPEG_COPY / "train").is_dir(),
                                     reason=f"{JPEG_COPY} not present")


def make_image_folder(root, per_class=(20, 10), size=32):
    """A tiny ImageFolder tree: each class a distinct colour plus noise, so it is learnable."""
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


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """torchvision's download pointed at a file that does not exist: no test touches the network."""
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri())


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """exp.main installs its own SIGINT/SIGTERM handlers: pytest gets its own back after each."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
