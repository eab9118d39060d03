"""The runtime choices (device, precision, layout, workers) and the pieces that make a step
cheaper: they change the speed, never the numbers."""
import argparse

import numpy as np
import pytest
import torch

from conftest import exp


def runtime_for(monkeypatch, cuda, **flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = exp.parse_command_line([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])[0]
    lines = []
    return exp.make_runtime(args, lines.append), lines


def test_cuda_defaults_to_fp32_nchw_and_cpu_to_channels_last(monkeypatch):
    runtime, _ = runtime_for(monkeypatch, cuda=True)
    assert runtime[:4] == exp.Runtime(torch.device("cuda"), "fp32", False, cuda_graphs=True)[:4]
    assert runtime.workers >= 1
    runtime, _ = runtime_for(monkeypatch, cuda=True, cuda_graphs="off")
    assert not runtime.cuda_graphs
    runtime, _ = runtime_for(monkeypatch, cuda=True, precision="bf16", channels_last="on")
    assert (runtime.precision, runtime.channels_last) == ("bf16", True)
    runtime, _ = runtime_for(monkeypatch, cuda=False)
    assert runtime.device.type == "cpu" and runtime.channels_last and runtime.workers == 0
    assert not runtime.cuda_graphs
    with pytest.raises(exp.UserError, match="needs CUDA"):
        runtime_for(monkeypatch, cuda=False, cuda_graphs="on")


def test_the_default_worker_count_follows_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(exp.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(exp.os, "cpu_count", lambda: 16)
    runtime, _ = runtime_for(monkeypatch, cuda=True)
    assert runtime.workers == 1


@pytest.mark.parametrize("driver", [True, False])
def test_a_gpu_that_torch_cannot_use_is_said_in_one_line(monkeypatch, driver):
    monkeypatch.setattr(exp, "nvidia_driver_present", lambda: driver)
    runtime, lines = runtime_for(monkeypatch, cuda=False)
    assert runtime.device.type == "cpu"
    assert len(lines) == driver
    if driver:
        assert "NVIDIA driver is present" in lines[0] and torch.__version__ in lines[0]


def test_the_ema_update_is_one_lerp_per_tensor_to_the_last_bit():
    torch.manual_seed(0)
    model = exp.Net()
    ema = exp.EMA(model, 0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(4, 3, 32, 32))  # BatchNorm statistics and counts move
    expected = {k: v.clone() for k, v in ema.model.state_dict().items()}
    d = min(0.999, (1 + 500) / (10 + 500))
    for k, current in model.state_dict().items():
        if current.is_floating_point():
            expected[k].lerp_(current, 1 - d)
        else:
            expected[k].copy_(current)
    ema.update(step=500)
    for k, v in ema.model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_a_persistent_loader_gives_each_epoch_what_a_fresh_one_would(image_folder):
    # what makes a resumed run with workers repeat an uninterrupted one
    splits, _, _, _ = exp.load_cifar10(image_folder)

    def epoch_batches(loader, epoch):
        return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]
    dataset = exp.AugmentedBatches(*splits["train"], exp.train_transform())
    kept = exp.TrainLoader(dataset, 20, 3, 2, torch.device("cpu"))
    first, second = epoch_batches(kept, 1), epoch_batches(kept, 2)
    fresh = exp.TrainLoader(dataset, 20, 3, 2, torch.device("cpu"))
    again = epoch_batches(fresh, 2)
    kept.close()
    fresh.close()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(second, again))
    assert not torch.equal(first[0][0], second[0][0])


def test_the_schedule_of_one_step_per_phase_and_of_full_warmup(monkeypatch):
    model = torch.nn.Linear(2, 2)
    for warmup, steps in [(0.2, 5), (1.0, 7), (1.0, 1), (0.5, 2), (0.0, 3)]:
        args = argparse.Namespace(warmup=warmup, lr=0.1, weight_decay=0.0)
        optimizer = exp.make_optimizer(model, args)
        scheduler = exp.make_scheduler(optimizer, args, steps)
        lrs = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
        assert all(np.isfinite(lrs)) and max(lrs) <= 0.1 + 1e-12, (warmup, steps, lrs)
