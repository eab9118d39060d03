import csv
import re
import signal
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

from conftest import JPEG_COPY, ROOT, exp, needs_jpeg_copy

SCRIPT = str(ROOT / "experiment2_cifar_cnn.py")
CPU = exp.Runtime(torch.device("cpu"), "fp32", False)
NO_STOP = types.SimpleNamespace(check=lambda: None)  # no stop signal arrives
BATCH_LINE = re.compile(r"^Epoch (\d+), Batch (\d+): Train Loss: \d+\.\d{4}, "
                        r"Train Accuracy: \d+\.\d{2}%$", re.M)
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+), Train Loss: \d+\.\d{4}, Train Accuracy: \d+\.\d{2}%, "
                        r"Test Loss: \d+\.\d{4}, Test Accuracy: (\d+\.\d{2})%$", re.M)


def script(*args, **kw):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kw)


def read_metrics(folder):
    with open(folder / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")}
                for row in csv.DictReader(f)]


def test_a_few_hundred_steps_lower_the_loss():
    torch.manual_seed(0)
    model = exp.Net()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0]


def training_objects(model, opt, sched, criterion):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return exp.Training(model, model, opt, sched, scaler, criterion, ema=None)


def test_train_one_epoch_returns_epoch_averages_and_logs_every_n_batches(image_folder):
    splits, _, _, _ = exp.load_cifar10(image_folder)
    model, lines = exp.Net(), []
    ds = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    loader = exp.TrainLoader(ds, 20, 0, 0, CPU.device)
    opt = exp.make_optimizer(model, exp.build_parser().parse_args([]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=len(loader))
    training = training_objects(model, opt, sched, nn.CrossEntropyLoss())
    loss, acc = exp.train_one_epoch(training, loader.epoch(3), CPU, 3, lines.append, 4, NO_STOP)
    assert len(lines) == 2 and all(BATCH_LINE.match(line) for line in lines)
    assert [BATCH_LINE.match(line).groups() for line in lines] == [("3", "4"), ("3", "8")]
    assert 0 < loss < 5 and 0 <= acc <= 100


def test_non_finite_loss_names_epoch_and_batch(image_folder):
    splits, _, _, _ = exp.load_cifar10(image_folder)
    model = exp.Net()
    ds = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    loader = exp.TrainLoader(ds, 20, 0, 0, CPU.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    nan_on_batch_3 = iter([1.0, 1.0, float("nan")] + [1.0] * 10)

    def criterion(out, y):
        return nn.functional.cross_entropy(out, y) * next(nan_on_batch_3)
    with pytest.raises(exp.NonFiniteLoss, match="epoch 2, batch 3"):
        exp.train_one_epoch(training_objects(model, opt, sched, criterion), loader.epoch(2), CPU, 2,
                            print, 100, NO_STOP)


def test_ema_update_moves_every_weight_and_statistic_a_fraction_toward_the_current_ones():
    torch.manual_seed(0)
    current = exp.Net()
    ema = exp.EMA(current, 0.9)
    average = ema.model
    with torch.no_grad():  # the EMA starts as a copy: make the two differ
        for p in average.parameters():
            p.copy_(torch.randn_like(p))
    current(torch.randn(8, 3, 32, 32))  # BN statistics and num_batches_tracked leave their defaults
    before = {k: v.clone() for k, v in average.state_dict().items()}
    ema.update(step=1000)
    for k, v in average.state_dict().items():
        now = current.state_dict()[k]
        expected = 0.9 * before[k] + 0.1 * now if v.is_floating_point() else now
        torch.testing.assert_close(v, expected, msg=k)
    ema.update(step=0)  # the first step: decay (1 + 0) / (10 + 0) = 0.1
    w = average.state_dict()["fc.weight"]
    after_first = 0.9 * before["fc.weight"] + 0.1 * current.fc.weight
    torch.testing.assert_close(w, 0.1 * after_first + 0.9 * current.fc.weight)


@pytest.mark.parametrize("ema", ["0.999", "0"])
def test_the_ema_is_what_is_evaluated_saved_and_reloaded(image_folder, tmp_path, ema):
    out = tmp_path / "run"
    r = script("--data-dir", image_folder, "--epochs", 2, "--batch-size", 20, "--ema", ema,
               "--out", out)
    assert r.returncode == 0, r.stderr
    state = torch.load(out / "last.pt", weights_only=True)
    assert ("ema" in state) == (ema != "0")
    if "ema" in state:
        assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    model = exp.Net().to(memory_format=torch.channels_last)
    model.load_state_dict(state.get("ema", state["model"]))
    splits, _, _, _ = exp.load_cifar10(image_folder)
    test = exp.as_tensors(*splits["test"])
    as_the_script_ran = exp.Runtime(CPU.device, exp.resolve_precision("auto", CPU.device), True)
    _, acc, _ = exp.evaluate(model, *test, as_the_script_ran)
    logged = EPOCH_LINE.findall(r.stdout)[-1][2]
    assert f"{acc:.2f}" == logged
    ev = script("--evaluate", out / "last.pt", "--data-dir", image_folder, "--tta")
    single, mirrored = ev.stdout.splitlines()
    assert single.endswith(f"Test Accuracy: {logged}%")
    _, flip_acc, _ = exp.evaluate(model, *test, as_the_script_ran, flip_average=True)
    assert "averaged with its mirror" in mirrored
    assert mirrored.endswith(f"Test Accuracy: {flip_acc:.2f}%")


def test_flip_average_is_the_mean_of_the_logits_of_each_image_and_its_mirror(image_folder):
    torch.manual_seed(0)
    # every pixel has its own weights: not mirror-blind
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images, labels = exp.load_cifar10(image_folder)[0]["test"]
    loss, _, preds = exp.evaluate(model, *exp.as_tensors(images, labels), CPU, flip_average=True)

    def logits(uint8_nhwc):
        return model(exp.normalize(torch.from_numpy(uint8_nhwc.transpose(0, 3, 1, 2).copy())))
    with torch.no_grad():
        mean = (logits(images) + logits(images[:, :, ::-1].copy())) / 2  # NHWC: axis 2 is x
    assert torch.equal(preds, mean.argmax(1))
    expected_loss = nn.functional.cross_entropy(mean, torch.as_tensor(labels)).item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    single_view = exp.evaluate(model, *exp.as_tensors(images, labels), CPU)[2]
    assert not torch.equal(preds, single_view)  # the mirror changed some predictions


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = exp.Net()
    model(torch.randn(8, 3, 32, 32))  # move BN running statistics off their defaults
    state = {"model": model.state_dict(), "epoch": 3, "history": [{"epoch": 1, "test_acc": 50.0}]}
    exp.save_checkpoint(tmp_path / "c.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    other = exp.Net()
    loaded = exp.load_checkpoint(tmp_path / "c.pt", other)
    assert loaded["epoch"] == 3 and loaded["history"] == state["history"]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_resume_after_sigterm_ends_with_the_same_metrics_as_an_uninterrupted_run(image_folder,
                                                                                 tmp_path):
    # 10 short epochs: the signal, sent after epoch 1, lands long before the run could end, even
    # on a busy machine
    common = ["--data-dir", image_folder, "--epochs", 10, "--batch-size", 4, "--workers", 1,
              "--seed", 7]
    full = script(*common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, common), "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Epoch 1/10"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"--resume {cut / 'last.pt'}" in err
    done = len(read_metrics(cut))  # 1, or more if later epochs ended before the signal landed
    assert 1 <= done < 10
    assert read_metrics(cut) == read_metrics(tmp_path / "full")[:done]  # same seed, same numbers

    resumed = script("--resume", cut / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {cut / 'last.pt'} after epoch {done}" in resumed.stdout
    assert read_metrics(cut) == read_metrics(tmp_path / "full")
    log = (cut / "train.log").read_text()
    assert [m[0] for m in EPOCH_LINE.findall(log)] == [str(e) for e in range(1, 11)]


@needs_jpeg_copy
def test_end_to_end_on_the_jpeg_copy_learns_far_above_chance(tmp_path):
    out = tmp_path / "run"
    r = script("--data-dir", JPEG_COPY, "--epochs", 2, "--limit", 5000, "--log-every", 10,
               "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Total trainable parameters: 86954" in r.stdout
    # 78 batches of the default 64 per epoch, a line every 10
    assert len(BATCH_LINE.findall(r.stdout)) == 2 * 7
    epochs = EPOCH_LINE.findall(r.stdout)
    assert [e[:2] for e in epochs] == [("1", "2"), ("2", "2")]
    assert float(epochs[-1][2]) > 25.0  # chance is 10%; this setting reached 42% here
    for name in exp.RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "train.log").read_text().count("Test Accuracy") == 2
    assert len(read_metrics(out)) == 2

    ev = script("--evaluate", out / "last.pt", "--data-dir", JPEG_COPY, "--limit", 5000)
    assert ev.returncode == 0, ev.stderr
    assert f"Test Accuracy: {epochs[-1][2]}%" in ev.stdout


def test_benchmark_runs_on_synthetic_data_and_prints_its_line(tmp_path):
    r = script("--benchmark", "--data-dir", tmp_path / "none", "--limit", 256, "--batch-size", 32,
               "--workers", 0)
    assert r.returncode == 0, r.stderr
    assert "synthetic" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"benchmark: step=\d+ img/s, epoch=\d+ img/s, hidden=\d+\.\d\d, "
                        r"speedup=\d+\.\dx, roofline=\d\.?\d*(e-\d+)?", last), last


def test_onecycle_moves_the_momentum_against_the_lr(image_folder, tmp_path):
    r = script("--data-dir", image_folder, "--epochs", 1, "--batch-size", 20,
               "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        bounds = (group["base_momentum"], group["max_momentum"])
        assert bounds == (exp.MIN_MOMENTUM, exp.MAX_MOMENTUM) == (0.85, 0.95)
        # back up near the top at the end
        assert group["nesterov"] and 0.94 < group["momentum"] <= 0.95
