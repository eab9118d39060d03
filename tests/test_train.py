"""Training, evaluation and the EMA, on the tiny folders and, where present, the JPEG copy."""
import csv
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import JPEG_COPY, RUN, exp, metrics, needs_jpeg_copy, trains

CPU = exp.Runtime(torch.device("cpu"), "fp32", False)
BATCH_LINE = re.compile(r"^Epoch (\d+), Batch (\d+): Train Loss: \d+\.\d{4}, "
                        r"Train Accuracy: \d+\.\d{2}%$", re.M)
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+), Train Loss: \d+\.\d{4}, Train Accuracy: \d+\.\d{2}%, "
                        r"Test Loss: \d+\.\d{4}, Test Accuracy: (\d+\.\d{2})%$", re.M)


def training_objects(model, opt, sched, criterion):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return exp.Training(model, model, opt, sched, scaler, criterion, ema=None)


def test_train_one_epoch_returns_epoch_averages_and_logs_every_n_batches(tiny):
    splits, _, _, _ = exp.load_cifar10(tiny)
    model, lines = exp.Net(), []
    ds = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    loader = exp.TrainLoader(ds, 5, 0, 0, CPU.device)  # 8 batches
    opt = exp.make_optimizer(model, exp.build_parser().parse_args([]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=len(loader))
    training = training_objects(model, opt, sched, nn.CrossEntropyLoss())
    model.eval()  # as an evaluation leaves it
    statistics = model.bn1.running_mean.clone()
    loss, acc = exp.train_one_epoch(training, loader.epoch(3), CPU, 3, lines.append, 3)
    assert model.training and not torch.equal(model.bn1.running_mean, statistics)
    assert len(lines) == 2 and all(BATCH_LINE.match(line) for line in lines)
    assert [BATCH_LINE.match(line).groups() for line in lines] == [("3", "3"), ("3", "6")]
    assert 0 < loss < 5 and 0 <= acc <= 100


def test_non_finite_loss_names_epoch_and_batch(tiny):
    splits, _, _, _ = exp.load_cifar10(tiny)
    model = exp.Net()
    ds = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    loader = exp.TrainLoader(ds, 5, 0, 0, CPU.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    nan_on_batch_3 = iter([1.0, 1.0, float("nan")] + [1.0] * 10)

    def criterion(out, y):
        return nn.functional.cross_entropy(out, y) * next(nan_on_batch_3)
    with pytest.raises(exp.NonFiniteLoss, match="epoch 2, batch 3"):
        exp.train_one_epoch(training_objects(model, opt, sched, criterion), loader.epoch(2), CPU, 2,
                            print, 100)


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


def evaluated_as_logged(run, data, ema):
    """The EMA (ema) or the model's weights saved in run's last.pt, evaluated as the run did;
    and what its last epoch line logged (loss, accuracy)."""
    state = torch.load(run / "last.pt", weights_only=True)
    assert ("ema" in state) == ema
    model = exp.Net().to(memory_format=torch.channels_last)
    model.load_state_dict(state["ema"] if ema else state["model"])
    as_the_script_ran = exp.Runtime(CPU.device, exp.resolve_precision("auto", CPU.device), True)
    splits, _, _, _ = exp.load_cifar10(data)
    loss, acc, _ = exp.evaluate(model, *exp.as_tensors(*splits["test"]), as_the_script_ran)
    logged = EPOCH_LOSS.findall((run / "train.log").read_text())[-1]
    return (f"{loss:.4f}", f"{acc:.2f}"), logged


EPOCH_LOSS = re.compile(r"^Epoch \d+/\d+, .*Test Loss: (\d+\.\d{4}), Test Accuracy: (\d+\.\d{2})%$",
                        re.M)


def test_the_ema_is_what_is_evaluated_saved_and_reloaded(finished, tiny):
    state = torch.load(finished / "last.pt", weights_only=True)
    assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    evaluated, logged = evaluated_as_logged(finished, tiny, ema=True)
    assert evaluated == logged
    single, mirrored = trains(["--evaluate", finished / "last.pt", "--data-dir", tiny,
                               "--tta"]).splitlines()
    assert single.endswith(f"Test Loss: {logged[0]}, Test Accuracy: {logged[1]}%")
    assert "averaged with its mirror" in mirrored


def test_without_an_ema_the_model_is_what_is_evaluated_and_saved(tiny, tmp_path, quick):
    trains(["--data-dir", tiny, "--out", tmp_path / "run", *RUN, "--epochs", 1, "--ema", 0])
    evaluated, logged = evaluated_as_logged(tmp_path / "run", tiny, ema=False)
    assert evaluated == logged


def test_tta_averages_each_test_image_with_its_mirror(finished, tiny):
    model = exp.Net().to(memory_format=torch.channels_last)
    model.load_state_dict(torch.load(finished / "last.pt", weights_only=True)["ema"])
    splits, _, _, _ = exp.load_cifar10(tiny)
    as_the_script_ran = exp.Runtime(CPU.device, exp.resolve_precision("auto", CPU.device), True)
    loss, acc, _ = exp.evaluate(model, *exp.as_tensors(*splits["test"]), as_the_script_ran,
                                flip_average=True)
    mirrored = trains(["--evaluate", finished / "last.pt", "--data-dir", tiny,
                       "--tta"]).splitlines()[1]
    assert mirrored.endswith(f"Test Loss: {loss:.4f}, Test Accuracy: {acc:.2f}%")


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


def test_evaluation_runs_the_model_in_eval_mode_and_leaves_it_unchanged():
    torch.manual_seed(0)
    model = exp.Net()
    model(torch.randn(8, 3, 32, 32))  # BatchNorm statistics leave their defaults; train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    loss, _, preds = exp.evaluate(model, images, labels, CPU)
    with torch.no_grad():
        logits = model.eval()(exp.normalize(images))
    assert torch.equal(preds, logits.argmax(1))
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_step_minimises_the_label_smoothed_cross_entropy_with_decay_on_weights_only():
    training = exp.make_training(exp.RECIPE, CPU, 10)
    decayed, kept = training.optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and kept["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in kept["params"])
    assert len(decayed["params"]) + len(kept["params"]) == len(list(training.model.parameters()))
    x, y = CPU.prepare(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
                       torch.randint(0, 10, (8,)))
    loss, out = exp.training_step(training, CPU, x, y)
    expected = nn.functional.cross_entropy(out, y, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = exp.Net()
    model(torch.randn(8, 3, 32, 32))  # move BN running statistics off their defaults
    state = {"model": model.state_dict(), "epoch": 3, "history": [{"epoch": 1, "test_acc": 50.0}]}
    exp.save_checkpoint(tmp_path / "c.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    other = exp.Net()
    loaded = exp.read_checkpoint(tmp_path / "c.pt")
    exp.load_weights(other, loaded, tmp_path / "c.pt")
    assert loaded["epoch"] == 3 and loaded["history"] == state["history"]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), other.eval()(x))


@needs_jpeg_copy
def test_end_to_end_on_the_jpeg_copy_learns_far_above_chance(tmp_path, quick):
    out = tmp_path / "run"
    # 1000 training images, 31 steps of 32 per epoch, a line every 10
    log = trains(["--data-dir", JPEG_COPY, "--limit", 1000, "--epochs", 2, "--batch-size", 32,
                  "--log-every", 10, "--out", out])
    assert "Total trainable parameters: 86954" in log
    assert len(BATCH_LINE.findall(log)) == 2 * 3
    epochs = EPOCH_LINE.findall(log)
    assert [e[:2] for e in epochs] == [("1", "2"), ("2", "2")]
    assert float(epochs[-1][2]) > 20.0  # chance is 10%; this setting reached 30.7% here (fp32)
    for name in exp.RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "train.log").read_text().count("Test Accuracy") == 2
    assert len(metrics(out)) == 2
    ev = trains(["--evaluate", out / "last.pt", "--data-dir", JPEG_COPY, "--limit", 1000])
    assert f"Test Accuracy: {epochs[-1][2]}%" in ev


def test_benchmark_runs_on_synthetic_data_and_prints_its_line(tmp_path, brief_benchmark):
    out = trains(["--benchmark", "--data-dir", tmp_path / "none", "--limit", 64, "--batch-size", 16,
                  "--workers", 0])
    assert "synthetic" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"benchmark: step=\d+ img/s, epoch=\d+ img/s, hidden=\d+\.\d\d, "
                        r"speedup=\d+\.\dx, roofline=\d\.?\d*(e-\d+)?", last), last


def test_the_log_lines_keep_their_agreed_format(finished):
    log = (finished / "train.log").read_text()
    assert [m[:2] for m in EPOCH_LINE.findall(log)] == [("1", "3"), ("2", "3"), ("3", "3")]
    done = (r"^Done: final test accuracy \d+\.\d\d%, best \d+\.\d\d% \(epoch \d\), 85% first "
            r"reached: never, \d+\.\d s per epoch, \d+\.\d min in all$")
    assert re.search(done, log, re.M)
    assert re.search(r"^Per-class accuracy: airplane \d+\.\d%, automobile", log, re.M)


def test_the_report_gives_each_class_its_own_accuracy(tmp_path, quick):
    history = [{"epoch": 1, "test_acc": 75.0, "elapsed_s": 2.0}]
    images = np.zeros((4, 32, 32, 3), np.uint8)
    lines = []
    exp.report(tmp_path, history, "test", (images, np.array([0, 0, 1, 1])), np.array([0, 1, 1, 1]),
               lines.append)
    assert lines[1] == ("Per-class accuracy: airplane 50.0%, automobile 100.0%, bird (no images), "
                        "cat (no images), deer (no images), dog (no images), frog (no images), "
                        "horse (no images), ship (no images), truck (no images)")


def test_a_finished_run_holds_every_file_and_its_pictures(finished):
    assert sorted(p.name for p in finished.iterdir()) == sorted(exp.RUN_FILES)
    sizes = {name: Image.open(finished / name).size for name in exp.RUN_FILES if ".png" in name}
    # the figures' sizes at 110 dpi; augmentations.png: 8 columns and 10 rows of 3x images
    assert sizes == {"augmentations.png": (80 + 8 * 130, 60 + 10 * 160), "curves.png": (1210, 440),
                     "confusion.png": (770, 660), "misclassified.png": (1760, 726)}


def test_onecycle_moves_the_momentum_against_the_lr(finished):
    state = torch.load(finished / "last.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:  # what the run stepped with
        bounds = (group["base_momentum"], group["max_momentum"])
        assert bounds == (exp.MIN_MOMENTUM, exp.MAX_MOMENTUM) == (0.85, 0.95)
        assert group["nesterov"]
    args = exp.build_parser().parse_args([])
    optimizer = exp.make_optimizer(nn.Linear(2, 2), args)
    scheduler = exp.make_scheduler(optimizer, args, 100)
    steps = []
    for _ in range(99):
        group = optimizer.param_groups[0]
        steps.append((group["lr"], group["momentum"]))
        optimizer.step()
        scheduler.step()
    peak = max(range(99), key=lambda i: steps[i][0])
    assert peak == 19 and steps[peak] == (pytest.approx(0.1), pytest.approx(0.85))
    assert steps[0][1] == pytest.approx(0.95) and steps[-1][1] == pytest.approx(0.95, abs=1e-4)


def test_each_epoch_says_its_time_and_the_time_left(stopped, copy_run, tiny, tmp_path, quick):
    lines = trains(["--data-dir", tiny, "--out", tmp_path / "run", *RUN]).splitlines()
    after = [lines[i + 1] for i, line in enumerate(lines) if EPOCH_LINE.match(line)]
    assert [re.sub(r"[\d.]+ s|\d\d:\d\d", "#", line) for line in after] == [
        "epoch 1 took #; about # left (done near #)", "epoch 2 took #; about # left (done near #)",
        "epoch 3 took #"]
    assert all(line in (tmp_path / "run" / "train.log").read_text() for line in after)
    # a resumed run's estimate counts its own epochs only
    run = copy_run(stopped / "a", "resumed")
    first = next(line for line in trains(["--resume", run / "last.pt"]).splitlines()
                 if line.startswith("epoch 2 took"))
    took, left = map(float, re.match(r"epoch 2 took ([\d.]+) s; about (\d+) s", first).groups())
    assert abs(left - took) <= 0.55 and first.endswith(f" s left (done near {first[-6:-1]})")


def test_the_time_left_is_the_mean_epoch_but_the_first_times_the_epochs_left(monkeypatch):
    monkeypatch.setattr(exp.time, "time", lambda: 1_000_000.0)
    assert exp.time_left(3, 100, [40.0, 25.0, 27.0]).startswith(
        "epoch 3 took 27.0 s; about 42 min left (done near ")
    assert exp.time_left(1, 10, [5.0]).startswith("epoch 1 took 5.0 s; about 45 s left")
    assert exp.time_left(2, 200, [90.0, 60.0]).startswith("epoch 2 took 60.0 s; about 3.3 h left")
    assert exp.time_left(200, 200, [60.0]) == "epoch 200 took 60.0 s"
    # past six days no clock time: a weekday would not name the day, nor can the clock go on
    assert exp.time_left(1, 8 * 24 * 60 + 1, [60.0]) == "epoch 1 took 60.0 s; about 8 days left"
    assert exp.time_left(1, 2**63 - 1, [1.0]).endswith("; about 106751991167301 days left")
    done = exp.time.strftime("%H:%M", exp.time.localtime(1_000_000.0 + 98 * 26))
    assert exp.time_left(2, 100, [30.0, 26.0]).endswith(f"(done near {done})")


def test_the_time_left_is_estimated_from_the_unrounded_time_between_epoch_ends(tiny, tmp_path,
                                                                              quick,
                                                                              monkeypatch):
    # short epochs: a time rounded to 0.1 s made "about 0 s left" of 99,998 epochs
    real, seen = exp.time_left, []

    def recorded(epoch, epochs, times):
        seen.append(list(times))
        return real(epoch, epochs, times)
    monkeypatch.setattr(exp, "time_left", recorded)
    trains(["--data-dir", tiny, "--out", tmp_path / "run", *RUN])
    with open(tmp_path / "run" / "metrics.csv") as f:
        times, rows = seen[-1], list(csv.DictReader(f))
    assert len(times) == 3 and any(t != round(t, 1) for t in times)
    assert all(t >= float(row["epoch_s"]) - 0.05 for t, row in zip(times, rows))  # saves too
