import functools
import hashlib
import http.server
import pickle
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import JPEG_COPY, exp, needs_jpeg_copy


def make_fake_official_archive(folder, n_train=20, n_test=10):
    """A tiny cifar-10-python.tar.gz in the official format; returns (path, md5s, train images)."""
    rng = np.random.default_rng(0)
    src = folder / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    batches, train_images = {}, []
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 10 for i in range(n)]
        if name.startswith("data"):
            train_images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        batches[name] = {"data": data, "labels": labels}
    batches["batches.meta"] = {"label_names": list(exp.CLASSES)}
    md5 = {}
    for name, entry in batches.items():
        (src / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((src / name).read_bytes()).hexdigest()
    archive = folder / "server" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    md5["archive"] = hashlib.md5(archive.read_bytes()).hexdigest()
    return archive, md5, np.concatenate(train_images)


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/server: the real download code, no network."""
    (tmp_path / "server").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(tmp_path / "server"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_torchvision_source_downloads_extracts_and_loads(tmp_path, monkeypatch, local_server):
    from torchvision.datasets import CIFAR10
    archive, md5, train_images = make_fake_official_archive(tmp_path)
    monkeypatch.setattr(CIFAR10, "url", f"{local_server}/{archive.name}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5["archive"])
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})

    splits, source, _, _ = exp.load_cifar10(tmp_path / "data")
    assert source.startswith("torchvision")
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    (x, _), (xt, _) = splits["train"], splits["test"]
    assert x.shape == (100, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(x, train_images)
    splits, _, _, _ = exp.load_cifar10(tmp_path / "data", limit=30)  # no download now; limited
    assert np.bincount(splits["train"][1]).tolist() == [3] * 10


def test_image_folder_source_gives_official_labels(image_folder):
    splits, source, notes, _ = exp.load_cifar10(image_folder)
    (x, y), (xt, _) = splits["train"], splits["test"]
    assert source.startswith("ImageFolder")
    assert x.shape == (200, 32, 32, 3) and xt.shape == (100, 32, 32, 3)
    assert np.bincount(y).tolist() == [20] * 10
    first_frog = np.asarray(Image.open(image_folder / "train" / "frog" / "0000.png"))
    np.testing.assert_array_equal(x[np.flatnonzero(y == exp.CLASSES.index("frog"))[0]], first_frog)
    assert not any(notes.values())


def test_the_data_record_tells_images_of_the_same_names_and_sizes_apart(image_folder):
    # uncompressed BMP files: the same size whatever their pixels
    first = exp.load_cifar10(image_folder).record
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image_folder / "train" / "cat" / "extra.bmp")
    second = exp.load_cifar10(image_folder).record
    Image.new("RGB", (32, 32), (30, 20, 10)).save(image_folder / "train" / "cat" / "extra.bmp")
    third = exp.load_cifar10(image_folder).record
    assert second["counts"] == third["counts"] != first["counts"]
    assert len({first["sha256"], second["sha256"], third["sha256"]}) == 3


def test_limit_is_class_balanced_and_takes_the_first_images(image_folder):
    splits, _, _, _ = exp.load_cifar10(image_folder, limit=25)
    y = splits["train"][1]
    assert np.bincount(y, minlength=10).tolist() == [3] * 5 + [2] * 5
    assert np.bincount(splits["test"][1], minlength=10).tolist() == [3] * 5 + [2] * 5


def test_val_split_holds_out_the_last_images_of_each_class(image_folder):
    splits, _, _, _ = exp.load_cifar10(image_folder, val=50)
    assert set(splits) == {"train", "val"}
    assert np.bincount(splits["val"][1]).tolist() == [5] * 10
    assert np.bincount(splits["train"][1]).tolist() == [15] * 10
    full, _, _, _ = exp.load_cifar10(image_folder)
    # airplane 0..14 stay in train
    np.testing.assert_array_equal(splits["train"][0][:15], full["train"][0][:15])


def test_dataset_and_loader_give_uint8_batches_that_the_step_normalises(image_folder):
    splits, _, _, _ = exp.load_cifar10(image_folder)
    ds = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    import torch
    x, y = next(iter(exp.TrainLoader(ds, 16, 0, 0, torch.device("cpu")).epoch(1)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x, y = exp.Runtime(torch.device("cpu"), "fp32", True).prepare(x, y)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_loader_with_workers_is_seeded_and_each_worker_augments_differently(image_folder):
    import torch
    splits, _, _, _ = exp.load_cifar10(image_folder)
    x, y = splits["train"]
    same = np.repeat(x[:1], 64, axis=0)  # one image 64 times: only augmentation makes items differ
    ds = exp.AugmentedBatches(same, y[:64], exp.train_transform())

    def batches(seed):
        return [b[0] for b in exp.TrainLoader(ds, 8, seed, 2, torch.device("cpu")).epoch(1)]
    a, b = batches(1), batches(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])  # batches 0 and 1 come from different workers
    assert not torch.equal(a[0], batches(2)[0])


@needs_jpeg_copy
def test_jpeg_copy_loads_with_official_labels():
    splits, _, notes, _ = exp.load_cifar10(JPEG_COPY, limit=100)
    assert splits["train"][0].shape == splits["test"][0].shape == (100, 32, 32, 3)
    assert np.bincount(splits["train"][1]).tolist() == [10] * 10
    mean = splits["train"][0].reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, exp.CIFAR10_MEAN, atol=0.05)
