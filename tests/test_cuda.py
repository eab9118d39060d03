"""The CUDA-only paths: they run where a GPU is, and are skipped elsewhere (CI has none)."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, exp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def trained(cuda_graphs, steps=5, ema=0.999):
    """A model trained a few steps on fixed random batches, with or without CUDA graphs."""
    recipe = exp.Recipe(ema=ema)
    runtime = exp.Runtime(CUDA, "fp32", False, cuda_graphs)
    training = exp.make_training(recipe, runtime, 100)
    generator, loss = torch.Generator().manual_seed(1), None
    for _ in range(steps):
        x = torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), dtype=torch.uint8,
                          generator=generator)
        y = torch.randint(0, 10, (recipe.batch_size,), generator=generator)
        loss = exp.training_step(training, runtime, *runtime.prepare(x, y))[0]
    return training, runtime, loss


def assert_close(a, b, name):
    difference = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), f"{name}: {difference:.2e}"


@needs_cuda
def test_cuda_graphs_train_as_the_plain_step_does(monkeypatch):
    # TF32 convolutions and cuDNN's choice among algorithms differ by ~1e-3 per operation between
    # any two ways of running a step; with both pinned, the graphed step must equal the plain one
    # to float32 rounding
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    graphed, _, graphed_loss = trained(cuda_graphs=True)
    plain, _, plain_loss = trained(cuda_graphs=False)
    for (name, a), b in zip(graphed.model.state_dict().items(), plain.model.state_dict().values()):
        assert_close(a, b, name)
    for (name, a), b in zip(graphed.ema.model.state_dict().items(),
                            plain.ema.model.state_dict().values()):
        assert_close(a, b, f"ema {name}")
    assert_close(graphed_loss, plain_loss, "loss")


@needs_cuda
def test_capturing_the_graphs_leaves_the_batchnorm_statistics_alone():
    training, _, _ = trained(cuda_graphs=True, steps=0)
    fresh = exp.Net()
    for (name, a), b in zip(training.model.named_buffers(), fresh.buffers()):
        assert torch.equal(a.cpu(), b), name


@needs_cuda
@pytest.mark.parametrize("ema", [0.999, 0.0])
def test_evaluation_runs_the_evaluated_weights_not_the_training_graph(ema):
    training, runtime, _ = trained(cuda_graphs=True, ema=ema)
    evaluated = training.ema.model if training.ema else training.forward
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (100,))
    _, _, preds = exp.evaluate(evaluated, images, labels, runtime)
    reference = exp.Net()
    reference.load_state_dict({k: v.cpu() for k, v in evaluated.state_dict().items()})
    _, _, expected = exp.evaluate(reference.to(CUDA), images, labels, runtime)
    assert torch.equal(preds, expected)


@needs_cuda
def test_cuda_defaults(monkeypatch):
    args = exp.parse_command_line([])[0]
    runtime = exp.make_runtime(args, lambda line: None)
    assert runtime.device.type == "cuda" and runtime.cuda_graphs and runtime.workers >= 1


@needs_cuda
def test_a_run_on_cuda_prints_nothing_on_stderr(image_folder, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiment2_cifar_cnn.py"), "--data-dir",
                           str(image_folder), "--epochs", "2", "--batch-size", "16",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "CUDA graphs" in done.stdout
