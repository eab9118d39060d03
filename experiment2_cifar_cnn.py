"""experiment2_cifar_cnn.py: a small CNN for CIFAR-10 in one file.

An 86,954-parameter network (strided convs instead of pooling, depthwise-separable and
dilated convs, global average pooling) trained with Albumentations augmentation
(flip, affine, one 16x16 mean-filled CoarseDropout hole), SGD + Nesterov and OneCycle.

    pip install -r requirements.txt
    python experiment2_cifar_cnn.py                            # downloads CIFAR-10 to ./data
    python experiment2_cifar_cnn.py --data-dir PATH/TO/COPY    # or a local ImageFolder copy
    python experiment2_cifar_cnn.py --summary      # layer table: shapes, params, receptive field
    python experiment2_cifar_cnn.py --benchmark    # speed figures for this machine

Defaults: 85.61% +- 0.27 test accuracy over five seeds on a JPEG copy of CIFAR-10 (100 epochs); the
runs, their logs and the reasons for each default are in README.md.

Part I is the experiment, in the order the data flows: the recipe, data, augmentation, the dataset
wrapper, the network, optimizer/schedule/EMA and the loops. Part II is the run around it: settings,
machine, reading the data, the run folder, saving and resuming, pictures, other modes, stopping.
"""
import contextlib
import os
import signal
import sys

# A stop signal while the imports below take their seconds ends the process in one line; from
# main() on, the run's own handling (Stop, in Part II) takes over.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGHUP"):  # not on Windows
    STOP_SIGNALS[signal.SIGHUP] = "SIGHUP (the terminal closed)"


def stopped_while_importing(signum, frame):
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no stderr to say it on
        print(f"\ninterrupted by {STOP_SIGNALS[signum]}: nothing was written", file=sys.stderr)
    os._exit(128 + signum)


def take_stop_signals(handler):
    for sig in STOP_SIGNALS:  # an ignored SIGHUP stays ignored (nohup: to outlive the terminal)
        if sig != getattr(signal, "SIGHUP", None) or signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)


if __name__ == "__main__":
    take_stop_signals(stopped_while_importing)

import argparse
import copy
import csv
import functools
import hashlib
import io
import logging
import math
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else Albumentations asks PyPI at import

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# =============================================================================
# Part I: the experiment, in the order the data flows
# =============================================================================

# -----------------------------------------------------------------------------
# The recipe: the constants, and the training settings (the flags' defaults)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the often-copied (0.2023, 0.1994, 0.2010) is not the std
# OneCycle moves the Nesterov momentum against the LR: 0.95 at the start, 0.85 at the peak LR,
# 0.95 at the end. A constant 0.9 ended 0.5-0.7 points lower on the validation split (README)
MIN_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95
EVAL_BATCH = 1000


@dataclass(frozen=True)
class Recipe:
    """The training settings: what a run computes. The flags take their defaults from here; a
    checkpoint keeps them, and a resume takes them from there."""
    epochs: int = 100  # passes over the training set
    batch_size: int = 64  # images per step
    lr: float = 0.1  # OneCycle's peak learning rate
    warmup: float = 0.2  # share of the steps rising to the peak
    weight_decay: float = 5e-4  # on conv/linear weights, not BN or biases
    label_smoothing: float = 0.1
    ema: float = 0.999  # decay of the evaluated moving average of the weights (0: off)
    flip_p: float = 0.5  # probability of a horizontal flip
    affine_p: float = 0.5  # of the shift/scale/rotate Affine
    dropout_p: float = 0.25  # of the 16x16 CoarseDropout hole
    seed: int = 0  # of the initial weights, the batch order and the augmentations
    limit: int | None = None  # the first N images of each split, class-balanced
    val: int | None = None  # N training images held out and reported on instead of the test set


RECIPE = Recipe()


# -----------------------------------------------------------------------------
# Data: every image decoded once into a uint8 array (reading it: Part II)

def balanced_indices(labels, n):
    """The first n indices, class-balanced: n//10 per class (the remainder to the first classes)."""
    labels = np.asarray(labels)
    quota = [n // len(CLASSES) + (c < n % len(CLASSES)) for c in range(len(CLASSES))]
    picked = [np.flatnonzero(labels == c)[:quota[c]] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(picked))


def hold_out(train, val):
    """{'train', 'val'}: the last val//10 training images of each class held out (independent of
    --seed)."""
    images, labels = train
    if val >= len(labels):
        raise UserError(f"--val {val} leaves no training images "
                        f"(the train split has {len(labels)})")
    held = balanced_indices(labels[::-1], val)
    held = np.sort(len(labels) - 1 - held)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return {"train": (images[keep], labels[keep]), "val": (images[held], labels[held])}


class Loaded(NamedTuple):
    splits: dict  # {split: (uint8 NHWC images, labels)}
    kind: str  # "ImageFolder" or "torchvision CIFAR10"
    notes: dict  # {what: [paths]}: files converted, resized or skipped
    record: dict  # what a checkpoint keeps to know its data again: counts and a hash


def load_cifar10(data_dir, limit=None, val=None, splits=("train", "test")):
    """The splits asked for (with --val: 'train' and 'val'), decoded."""
    data_dir = Path(data_dir)
    if val:
        splits = ("train",)  # the test set stays untouched, not even decoded
    check_data_dir(data_dir, splits)
    notes, digest = {}, hashlib.sha256()
    if is_image_folder(data_dir, splits):
        loaded = {s: load_image_folder(data_dir / s, limit, notes, digest) for s in splits}
        kind = "ImageFolder"
    else:
        loaded = load_torchvision(data_dir, limit, splits, digest)
        kind = "torchvision CIFAR10"
    if val:
        loaded = hold_out(loaded["train"], val)
    # the hash is of the files read, not of the decoded pixels: another Pillow may decode a JPEG
    # a little differently, and that is still the same data
    counts = {s: np.bincount(labels, minlength=len(CLASSES)).tolist()
              for s, (_, labels) in loaded.items()}
    return Loaded(loaded, kind, notes, {"counts": counts, "sha256": digest.hexdigest()})


# -----------------------------------------------------------------------------
# Augmentation: uint8 in and out, per image, in the training process or in workers;
# normalisation happens per batch on the device (one table lookup per pixel)

def train_transform(flip_p=0.5, affine_p=0.5, dropout_p=0.25, save_applied_params=False):
    mean_pixel = tuple(255.0 * m for m in CIFAR10_MEAN)  # the hole is filled before normalising
    return A.Compose([
        A.HorizontalFlip(p=flip_p),
        # x and y shift ranges given apart; a test checks that the two shifts are drawn separately
        A.Affine(translate_percent={"x": (-0.1, 0.1), "y": (-0.1, 0.1)}, scale=(0.9, 1.1),
                 rotate=(-15, 15), border_mode=cv2.BORDER_REFLECT_101, p=affine_p),
        # Albumentations 2.x names; the 1.x names (max_holes, fill_value, ...) are ignored
        # with a warning
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16),
                        hole_width_range=(16, 16), fill=mean_pixel, p=dropout_p),
    ], save_applied_params=save_applied_params)


@functools.cache
def normalization_table(device):
    """Albumentations' Normalize output for each uint8 value of each channel: a (3, 256) table.
    Normalize is such a lookup inside, so a batch normalised here equals one normalised per
    image, to the last bit, while batches cross processes and the bus as uint8 (4x fewer bytes)."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1x256 image
    normalized = A.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD)(image=ramp)["image"][0]
    return torch.from_numpy(normalized.T.copy()).to(device)


def normalize(images):
    """uint8 NCHW images (any device) -> float32, normalised with the CIFAR-10 mean and std."""
    table = normalization_table(images.device)
    channel = torch.arange(3, device=images.device).view(1, 3, 1, 1)
    return table[channel, images.long()]


def as_tensors(images, labels):
    """uint8 NHWC array and labels -> a uint8 NCHW tensor (a view) and an int64 tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.as_tensor(labels)


# -----------------------------------------------------------------------------
# The dataset wrapper and its loader: whole augmented batches, seeded per epoch

class BatchRequest(NamedTuple):
    """What the loader asks the dataset for: one batch of the given epoch."""
    epoch: int
    seed: int  # of the augmentation RNG, for this epoch
    indices: list


class AugmentedBatches(torch.utils.data.Dataset):
    """Serves whole augmented batches as uint8 NCHW tensors. The augmentation RNG is reseeded
    when an epoch's first batch arrives, in the training process or in each worker, so that an
    epoch's augmentations depend on its seed alone and a resumed run repeats them."""

    def __init__(self, images, labels, augment):
        self.images, self.labels, self.augment = images, torch.as_tensor(labels), augment
        self.epoch = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, request):
        if request.epoch != self.epoch:
            worker = torch.utils.data.get_worker_info()
            seed = request.seed if worker is None else (request.seed + worker.id) % 2**32
            self.augment.set_random_seed(seed)
            self.epoch = request.epoch
        images = np.stack([self.augment(image=self.images[i])["image"] for i in request.indices])
        return torch.from_numpy(images).permute(0, 3, 1, 2), self.labels[request.indices]


class EpochBatches(torch.utils.data.Sampler):
    """The batch requests of one epoch: a shuffle and augmentation seeds that depend only on the
    run's seed and the epoch number. Full batches only."""

    def __init__(self, n, batch_size, seed, in_process):
        self.n, self.batch_size, self.seed, self.in_process = n, batch_size, seed, in_process
        self.set_epoch(1)

    def set_epoch(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        if self.in_process:
            self.augment_seed = int(torch.randint(2**31, (1,), generator=generator))
        # worker w seeds with this + w; it is drawn in the training process too, so that the
        # shuffle below comes from the same generator state whatever the worker count
        workers_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
        if not self.in_process:
            self.augment_seed = workers_seed
        self.order = torch.randperm(self.n, generator=generator).tolist()
        self.epoch = epoch

    def __len__(self):
        return self.n // self.batch_size

    def __iter__(self):
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield BatchRequest(self.epoch, self.augment_seed,
                               self.order[start:start + self.batch_size])


class TrainLoader:
    """One DataLoader for the whole run: its worker processes start once and stay (on macOS and
    Windows each new worker is sent the whole dataset). `epoch(e)` returns the loader set to e."""

    def __init__(self, dataset, batch_size, seed, workers, device):
        self.batches = EpochBatches(len(dataset), batch_size, seed, in_process=workers == 0)
        if workers:
            # more workers than CPUs is said in the run's notes (make_runtime), not by torch
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            # each worker augments on one thread: OpenCV's pool of a thread per core, in each of
            # many workers, fights for the cores. Set before they start: forked workers inherit
            # it (reconfiguring OpenCV after a fork can hang), spawned ones read the variable
            cv2.setNumThreads(1)
            os.environ["OPENCV_FOR_THREADS_NUM"] = "1"
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=self.batches, num_workers=workers,
            worker_init_fn=start_worker if workers else None, persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0))  # torch's own worker seeds; unused here

    def epoch(self, epoch):
        self.batches.set_epoch(epoch)
        return self

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        with Stop.held():  # worker processes start at the first iter() of the run
            return iter(self.loader)

    def close(self):
        self.loader = None  # ends the worker processes


# -----------------------------------------------------------------------------
# The network

class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: ~8x fewer weights than a 3x3."""

    def __init__(self, cin, cout):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.sep_conv1, self.bn_sep1 = SeparableConv2d(16, 32), nn.BatchNorm2d(32)
        self.dil_conv1 = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.bn_dil1 = nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
        self.sep_conv2, self.bn_sep2 = SeparableConv2d(32, 32), nn.BatchNorm2d(32)
        self.dil_conv2 = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.bn_dil2 = nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64)
        self.dil_conv3 = nn.Conv2d(64, 64, 3, padding=5, dilation=5)
        self.bn_dil3 = nn.BatchNorm2d(64)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.sep_conv1, self.bn_sep1),
                (self.dil_conv1, self.bn_dil1), (self.conv2, self.bn2),
                (self.sep_conv2, self.bn_sep2), (self.dil_conv2, self.bn_dil2),
                (self.conv3, self.bn3), (self.dil_conv3, self.bn_dil3)]

    def forward(self, x):
        for conv, bn in self.conv_bn_pairs():
            x = F.relu(bn(conv(x)))
        return self.fc(self.gap(x).flatten(1))


# -----------------------------------------------------------------------------
# Optimizer, schedule, EMA, and where and how the step runs

class Runtime(NamedTuple):
    """Where and how the step runs."""
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (autocast)
    channels_last: bool
    cuda_graphs: bool = False  # the step's forward and backward replayed as CUDA graphs
    compile: bool = False  # the model torch.compile'd
    workers: int = 0  # DataLoader worker processes

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # autocast's cache of cast weights would be captured into the graphs, then stale
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.cuda_graphs)

    def prepare(self, images, labels):
        """A uint8 NCHW batch -> normalised float32 on the device, in the step's memory format."""
        x = normalize(images.to(self.device, non_blocking=True))
        y = labels.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format), y

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format


def make_optimizer(model, recipe):
    decay = [p for p in model.parameters() if p.ndim > 1]  # BN scales/shifts and biases: none
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.lr, momentum=MAX_MOMENTUM, nesterov=True)


def make_scheduler(optimizer, recipe, total_steps):
    pct_start = recipe.warmup
    # OneCycleLR divides by the length of its warm-up (ending at step warmup_end) and of its
    # decay (from there to the last step): where one would be 0 steps, it is made half a step
    warmup_end = float(recipe.warmup * total_steps) - 1
    if warmup_end in (0, total_steps - 1):
        pct_start = (recipe.warmup * total_steps - 0.5) / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=total_steps, pct_start=pct_start,
        base_momentum=MIN_MOMENTUM, max_momentum=MAX_MOMENTUM)


class EMA:
    """An exponential moving average of a model's weights and BatchNorm statistics: this is what
    gets evaluated and saved. ema = d * ema + (1 - d) * current after every step; d = decay,
    except in the first steps (d = (1 + step) / (10 + step) is smaller), so that a short run is
    not evaluated near its random start."""

    def __init__(self, model, decay):
        self.model, self.decay = copy.deepcopy(model), decay
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        # the tensors are updated in place by training, so the lists are made once
        self.averages = [a for a, c in pairs if a.is_floating_point()]
        self.currents = [c for a, c in pairs if a.is_floating_point()]
        self.counts = [(a, c) for a, c in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.averages, self.currents, 1 - d)  # one launch for all tensors
        for average, current in self.counts:  # BatchNorm's num_batches_tracked
            average.copy_(current)


class Training(NamedTuple):
    """The objects a training step uses."""
    model: nn.Module  # what is saved
    forward: nn.Module  # what is stepped: the model, its torch.compile'd wrapper, or graphed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # active for fp16 only
    criterion: nn.Module
    ema: EMA | None


def make_training(recipe, runtime, total_steps):
    """The model (seeded by --seed), its optimizer, schedule, loss and EMA, on the device."""
    torch.manual_seed(recipe.seed)
    model = Net().to(runtime.device, memory_format=runtime.memory_format)
    optimizer = make_optimizer(model, recipe)
    # the average of the weights over the last ~1/(1 - decay) steps is what gets evaluated: far
    # steadier mid-run, +0.2 points at the end of two 60-epoch validation runs (README). Copied
    # before the model is graphed, so that the copy runs its own forward
    ema = EMA(model, recipe.ema) if recipe.ema else None
    return Training(
        model=model, forward=stepped_module(model, runtime, recipe.batch_size),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, recipe, total_steps),
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16"),
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        ema=ema)


def stepped_module(model, runtime, batch_size):
    """What the training step calls. On a GPU this net's batch-64 step is bound by launching its
    ~200 small kernels, not by computing them: a CUDA graph launches each pass at once."""
    if runtime.compile:
        # on a CPU, where a CUDA toolkit is installed, torch says it found no CUDA runtime
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        return torch.compile(model, mode="reduce-overhead" if runtime.cuda_graphs else "default")
    if not runtime.cuda_graphs:
        return model
    # The graphed backward runs on the stream it was captured on, and autograd says so at every
    # run's first step (it synchronises the streams, so the gradients are right); the first
    # backward also notes that it made cuBLAS's context itself. Neither is for the user
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current")
    # capturing runs a few training passes, which move the BatchNorm statistics: put them back
    buffers = [b.clone() for b in model.buffers()]
    sample = torch.zeros(batch_size, 3, 32, 32, device=runtime.device)
    with runtime.autocast():
        graphed = torch.cuda.make_graphed_callables(
            model, (sample.contiguous(memory_format=runtime.memory_format),))
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return graphed  # the model itself: in eval mode its forward runs as before, ungraphed


# -----------------------------------------------------------------------------
# The loops: the step, an epoch, evaluation, the epochs

class NonFiniteLoss(Exception):
    pass


def training_step(training, runtime, x, y):
    with runtime.autocast():
        out = training.forward(x)
        loss = training.criterion(out, y)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.scheduler.step()
    if training.ema:  # the scheduler counts the steps, and resumes the count
        training.ema.update(training.scheduler.last_epoch)
    return loss.detach(), out


def train_one_epoch(training, loader, runtime, epoch, log, log_every):
    """One pass over the loader. Logs the loss and accuracy of every log_every batches; returns
    (mean loss, accuracy %) over the epoch's batches. A stop signal is acted on between batches."""
    training.forward.train()
    # per-batch losses and the correct count stay on the device, read (one sync) per window
    window_loss = torch.zeros(min(log_every, len(loader)), device=runtime.device)
    window_correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    window_seen, total_loss, total_correct, total_seen = 0, 0.0, 0, 0
    for batch, (x, y) in enumerate(loader, 1):
        STOP.check()
        x, y = runtime.prepare(x, y)
        loss, out = training_step(training, runtime, x, y)
        i = (batch - 1) % log_every
        window_loss[i] = loss
        window_correct += (out.argmax(1) == y).sum()
        window_seen += len(y)
        if i < log_every - 1 and batch < len(loader):
            continue
        losses = window_loss[:i + 1].tolist()
        bad = [b for b, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"loss became {losses[bad[0]]} at epoch {epoch}, "
                                f"batch {batch - i + bad[0]}")
        correct = window_correct.item()
        # full batches only, so the mean over batches is the mean over images
        total_loss += sum(losses) * len(y)
        total_correct += correct
        total_seen += window_seen
        if i == log_every - 1:
            log(f"Epoch {epoch}, Batch {batch}: Train Loss: {sum(losses) / len(losses):.4f}, "
                f"Train Accuracy: {100 * correct / window_seen:.2f}%")
        window_correct.zero_()
        window_seen = 0
    return total_loss / total_seen, 100 * total_correct / total_seen


@torch.no_grad()
def evaluate(model, images, labels, runtime, flip_average=False):
    """(mean loss, accuracy %, predictions) over uint8 NCHW images; with flip_average, of the mean
    logits of each image and its mirror image."""
    model.eval()
    loss, preds = 0.0, []
    for start in range(0, len(labels), EVAL_BATCH):
        STOP.check()  # 10,000 images take 20 s on a slow CPU: past docker stop's 10 s grace
        batch = slice(start, start + EVAL_BATCH)
        x, y = runtime.prepare(images[batch], labels[batch])
        with runtime.autocast():
            out = model(x)
            if flip_average:
                out = (out + model(x.flip(3))) / 2
        loss += F.cross_entropy(out.float(), y, reduction="sum").item()
        preds.append(out.argmax(1).cpu())
    preds = torch.cat(preds)
    return loss / len(labels), 100 * (preds == labels).float().mean().item(), preds


def train_epochs(epochs, training, runtime, data, history, log, log_every, save):
    """Trains the epochs after those in history; after each, hands the history to save (the
    checkpoints and metrics.csv, never behind the epoch's line) and logs it. Returns the last
    evaluation's predictions (None if no epoch was left)."""
    images, labels = as_tensors(*data.eval_split)
    run_start = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    preds, name, times, last_end = None, data.split.capitalize(), [], time.perf_counter()
    for epoch in range(len(history) + 1, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(training, data.loader.epoch(epoch), runtime,
                                                epoch, log, log_every)
        evaluated = training.ema.model if training.ema else training.forward
        test_loss, test_acc, preds = evaluate(evaluated, images, labels, runtime)
        now = time.perf_counter()
        is_best = all(test_acc > h["test_acc"] for h in history)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 4),
                        "train_acc": round(train_acc, 2), "test_loss": round(test_loss, 4),
                        "test_acc": round(test_acc, 2), "lr": training.scheduler.get_last_lr()[0],
                        "epoch_s": round(now - epoch_start, 1),
                        "elapsed_s": round(now - run_start, 1)})
        save(history, is_best)
        log(f"Epoch {epoch}/{epochs}, Train Loss: {train_loss:.4f}, "
            f"Train Accuracy: {train_acc:.2f}%, {name} Loss: {test_loss:.4f}, "
            f"{name} Accuracy: {test_acc:.2f}%")
        times.append(time.perf_counter() - last_end)  # unrounded, with the saves
        last_end += times[-1]
        log(time_left(epoch, epochs, times))
        STOP.check()
    return preds


def time_left(epoch, epochs, times):
    """'epoch 12 took 25.1 s; about 37 min left (done near 14:52)'. The estimate is the mean of
    this process's epochs but its first (which warms up), or the first while it is the only one."""
    line = f"epoch {epoch} took {times[-1]:.1f} s"
    if epoch == epochs:
        return line
    typical = times[1:] or times
    left = (epochs - epoch) * sum(typical) / len(typical)
    if left > 6 * 86400:  # past where a weekday names the day (and the clock's range)
        return f"{line}; about {left / 86400:.0f} days left"
    span = (f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 90 * 60
            else f"{left / 3600:.1f} h")
    now = time.time()
    done = time.localtime(now + left)
    same_day = done.tm_yday == time.localtime(now).tm_yday
    clock = time.strftime("%H:%M" if same_day else "%a %H:%M", done)
    return f"{line}; about {span} left (done near {clock})"


# =============================================================================
# Part II: the run around the experiment
# =============================================================================

# -----------------------------------------------------------------------------
# The run from start to end: the map of Part II

def main(argv=None):
    """Runs the script on the command line argv; returns its exit status."""
    log = RunLog()
    STOP.start(log)
    try:
        args, given = parse_command_line(argv)
        run(args, given, log)
        STOP.check()  # a signal in the run's last moments still ends it as a stop
        return 0
    except SystemExit as e:  # --help
        return e.code
    except UserError as e:
        log.end(f"error: {e}")
        return 2
    except SaveFailed as e:
        log.end(f"error: {e}; {log.where_it_stopped()}")
        return SAVE_FAILED
    except Stopped as e:
        STOP.say(e)
        return e.status
    finally:
        STOP.at_once = True  # all is saved: a signal from here on ends the process at once
        STOP.remove_leftovers()
        log.close()


def run(args, given, log):
    """Chooses the mode."""
    check_flags(args, given)
    for mode in ("summary", "evaluate", "benchmark"):
        if getattr(args, mode):
            log.mode = f"--{mode}"  # a mode that writes nothing: a signal ends it at once
    if args.summary:
        return print_summary()
    with contextlib.ExitStack() as held:  # the run folder's lock, released last
        if args.resume:
            recipe, plan, resume_state, note = resumed_settings(args, given, held)
            return train(recipe, plan, plan.out, resume_state, note, log)
        recipe, plan = make_settings(vars(args), data_folder=args.data_dir,
                                     run_id=uuid.uuid4().hex[:12])
        if args.evaluate:
            return evaluate_checkpoint(args.evaluate, args.tta, recipe.limit, plan, log)
        if args.benchmark:
            runtime = make_runtime(plan, log)
            log(describe(runtime))
            return benchmark(recipe, plan, runtime, log)
        folder, note = take_run_folder(plan, held)
        return train(recipe, plan, folder, None, note, log)


def train(recipe, plan, folder, resume_state, note, log):
    """A run in its folder, locked: new, or resumed from resume_state."""
    notes = [note]
    if resume_state:  # from here on, what an interruption's message says goes there too
        log.open(folder, append=True)
    runtime, data = prepare_training(recipe, plan, log)
    training = make_training(recipe, runtime, recipe.epochs * len(data.loader))
    history = []
    if resume_state:
        notes += resume_notes(plan, resume_state, runtime, data)
        load_weights(training.model, resume_state, plan.resume)
        history = restore_training(training, resume_state, plan.resume)
    else:
        remove_run_files(folder)  # an earlier run's, with --overwrite or from a retry
        log.open(folder, append=False)
    record = run_record(recipe, plan, folder, runtime, data)
    log_header(record, runtime, data, log)
    log(f"Total trainable parameters: {count_parameters(training.model)}")
    for note in filter(None, notes):
        log(note)
    if resume_state:
        log(f"resumed from {plan.resume} after epoch {len(history)}")
    save = functools.partial(save_epoch, folder, training, record)
    train_and_report(recipe, plan.log_every, folder, training, runtime, data, history, save, log)


def save_epoch(folder, training, record, history, is_best):
    """An epoch's files: last.pt first, so that best.pt, metrics.csv and the epoch's line are
    never ahead of it."""
    STOP.at_once = False  # a save under way is finished before a stop acts
    state = checkpoint_state(training, history, record)
    save_checkpoint(folder / "last.pt", state)
    if is_best:
        save_checkpoint(folder / "best.pt", state)
    write_metrics(folder, history)


def train_and_report(recipe, log_every, folder, training, runtime, data, history, save, log):
    picture = folder / "augmentations.png"
    if not picture.exists():  # a resumed run keeps the one drawn at its start
        samples = augmentation_samples(*data.train_split, recipe)
        save_figure(plot_augmentations(samples, recipe), picture)
    # from here on a signal waits for the batch or the save under way; but while the first
    # step is compiled (~20 s), until this process saves an epoch, ending at once loses nothing
    STOP.at_once = runtime.compile
    try:
        preds = train_epochs(recipe.epochs, training, runtime, data, history, log, log_every,
                             save)
    except NonFiniteLoss as e:
        last = folder / "last.pt"
        raise UserError(f"{e}; stopped. The last good checkpoint is "
                        f"{last if last.exists() else 'none (no epoch finished)'}; "
                        "try a lower --lr or --weight-decay") from None
    finally:
        data.loader.close()
    if preds is None:  # a finished run, resumed to write its report again
        evaluated = training.ema.model if training.ema else training.model
        _, _, preds = evaluate(evaluated, *as_tensors(*data.eval_split), runtime)
    report(folder, history, data.split, data.eval_split, preds.numpy(), log)
    log.finished = True


class RunData(NamedTuple):
    loader: TrainLoader
    train_split: tuple  # (uint8 NHWC images, labels), as decoded
    split: str  # "test", or "val" with --val
    eval_split: tuple  # (uint8 NHWC images, labels)
    kind: str
    notes: dict
    record: dict  # counts per class and a hash of the files read (load_cifar10)


def prepare_training(recipe, plan, log):
    """The runtime, and the data with its checks: what can go wrong before training."""
    runtime = make_runtime(plan, log)
    splits, kind, notes, record = load_cifar10(plan.data_folder, recipe.limit, recipe.val)
    split = "val" if recipe.val else "test"
    n_train = len(splits["train"][1])
    if n_train < recipe.batch_size:
        raise UserError(f"--batch-size {recipe.batch_size} is larger than the {n_train} "
                        "training images")
    dataset = AugmentedBatches(*splits["train"],
                               train_transform(recipe.flip_p, recipe.affine_p, recipe.dropout_p))
    loader = TrainLoader(dataset, recipe.batch_size, recipe.seed, runtime.workers,
                         runtime.device)
    return runtime, RunData(loader, splits["train"], split, splits[split], kind, notes, record)


def log_header(record, runtime, data, log):
    log(f"data: {data.kind} {record['args']['data_dir']}: {len(data.train_split[1])} train / "
        f"{len(data.eval_split[1])} {data.split} images")
    for what, paths in data.notes.items():
        if paths:
            log(f"note: {len(paths)} {what} (e.g. {paths[0]})")
    log("config: " + ", ".join(f"{k}={v}" for k, v in sorted(record["args"].items())))
    log(describe(runtime, workers=True))
    log(code_version())
    log(f"run id: {record['run_id']}")


# -----------------------------------------------------------------------------
# Settings: the flags, or a checkpoint's, made into the recipe and the plan

@dataclass(frozen=True)
class Plan:
    """Where and how a run runs: the flags that are not the recipe (on --resume the checkpoint's,
    but those given anew), and what follows from them."""
    data_dir: Path  # as given: the log and the checkpoint keep it so
    data_folder: Path  # where the data is found from here (a resume may find it elsewhere)
    out: Path | None  # the run folder asked for; None: runs/<date-time>
    overwrite: bool
    log_every: int
    device: str  # the runtime as asked ("auto", ...); make_runtime resolves it
    precision: str
    channels_last: str
    cuda_graphs: str
    compile: bool
    workers: int | None
    resume: Path | None  # the checkpoint continued, where it really is
    run_id: str  # the run's own: a new one, or the resumed run's


RECIPE_FIELDS = [f.name for f in fields(Recipe)]
PLAN_FLAGS = [f.name for f in fields(Plan) if f.name not in ("data_folder", "run_id")]
# the flags of the modes that do not train: a training run's checkpoint keeps them too
TRAINING_MODES = {"evaluate": None, "tta": False, "summary": False, "benchmark": False}


# what the modes that do not train read; any other flag given with them is refused
MODE_FLAGS = {
    "evaluate": {"evaluate", "tta", "data_dir", "limit", "device", "precision", "channels_last"},
    "benchmark": {"benchmark", "data_dir", "limit", "batch_size", "ema", "flip_p", "affine_p",
                  "dropout_p", "workers", "device", "precision", "channels_last", "cuda_graphs",
                  "compile"},
    "summary": {"summary"},
}


def make_settings(flags, **plan):
    """The recipe and the plan of a run from {flag: value}; plan: the plan's other values."""
    recipe = Recipe(**{k: flags[k] for k in RECIPE_FIELDS})
    return recipe, Plan(**{**{k: flags[k] for k in PLAN_FLAGS}, **plan})


MOST_WORKERS = 256  # more would fork until forking fails


def build_parser():
    p = OneLineParser(prog="experiment2_cifar_cnn.py", description=__doc__.split("\n\n")[0],
                      formatter_class=HelpFormatter,
                      epilog=f"exit status: 0 done; 2 a mistake to fix, said in one line; "
                      f"{SAVE_FAILED} a file of the run could not be written (a full disk), the "
                      "line says what is saved; 130, 143 or 129 stopped by Ctrl-C, SIGTERM or a "
                      "closed terminal (SIGHUP), the line says what is saved and how to continue")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=number(int, zero_ok=False), default=RECIPE.epochs,
                   help="passes over the training set")
    g.add_argument("--batch-size", type=number(int, zero_ok=False), default=RECIPE.batch_size,
                   help="images per step")
    g.add_argument("--lr", type=number(float, zero_ok=False), default=RECIPE.lr,
                   help="OneCycle peak learning rate (the momentum "
                   f"falls from {MAX_MOMENTUM} to {MIN_MOMENTUM} meanwhile)")
    g.add_argument("--warmup", type=number(float, high=1), default=RECIPE.warmup,
                   help="share of steps rising to the peak LR")
    g.add_argument("--weight-decay", type=number(float), default=RECIPE.weight_decay,
                   help="on conv/linear weights, not BN or biases")
    g.add_argument("--label-smoothing", type=number(float, high=1), default=RECIPE.label_smoothing,
                   help="of the cross-entropy targets")
    g.add_argument("--ema", type=number(float, high=1, high_ok=False), default=RECIPE.ema,
                   help="decay of the moving average of the weights, updated every step, "
                   "that is evaluated and saved (0: off)")
    g.add_argument("--flip-p", type=number(float, high=1), default=RECIPE.flip_p,
                   help="probability of a horizontal flip")
    g.add_argument("--affine-p", type=number(float, high=1), default=RECIPE.affine_p,
                   help="probability of the shift/scale/rotate Affine")
    g.add_argument("--dropout-p", type=number(float, high=1), default=RECIPE.dropout_p,
                   help="probability of the 16x16 CoarseDropout hole")
    g.add_argument("--seed", type=number(int, high=2**32 - 1), default=RECIPE.seed,
                   help="of the initial weights, the batch order and the augmentations")
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags that say where the data is, where and how the run runs, and in which mode."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="ImageFolder copy (DIR/train/<class>, DIR/test/<class>) or where "
                   "torchvision's CIFAR-10 lives / is downloaded")
    g.add_argument("--limit", type=number(int, zero_ok=False),
                   help="use only the first N images of each split, class-balanced")
    g.add_argument("--val", type=number(int, zero_ok=False),
                   help="hold out N training images and report on them instead of the test set")
    g.add_argument("--workers", type=number(int, high=MOST_WORKERS),
                   help="DataLoader worker processes for augmentation (default: 0 on CPU, "
                   "where the step already uses every core and in-process augmentation "
                   "measured faster; else min(8, usable cores/2): on a 16-core H200 host 4, 8 "
                   "and 15 workers trained equally fast)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto: CUDA, else Apple MPS, else CPU")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CPUs with native bf16, else fp32 "
                   "(on CUDA too: bf16 made this small net's step no faster on an H200)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="auto: on for the CPU, off for CUDA and MPS")
    g.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay the step's forward and backward as CUDA graphs instead of "
                   "launching each kernel; auto: on for CUDA (3.1 instead of 5.3 s per epoch "
                   "on an H200)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (opt-in; with CUDA graphs in its "
                   "reduce-overhead mode)")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=False,
                   help="do not compile (for --resume of a run started with --compile)")
    g.add_argument("--out", type=run_folder, help="run folder (default: runs/<date-time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results in an existing --out folder; with --resume: "
                   "allow resuming from an earlier epoch than the run's latest")
    g.add_argument("--log-every", type=number(int, zero_ok=False), default=100,
                   help="batches between train log lines; after each epoch's line, one more "
                   "gives its time and the time left")
    g = p.add_argument_group("modes")
    modes = g.add_mutually_exclusive_group()
    modes.add_argument("--resume", type=Path, metavar="CKPT",
                       help="continue the run saved in CKPT, in CKPT's folder, on the run's own "
                       "data, with the settings it was started with (and 'auto' and the CPU "
                       "threads as it resolved them); only --data-dir (a moved copy), --device, "
                       "--precision, --channels-last, --cuda-graphs, --compile, --workers, "
                       "--log-every and --overwrite may be given anew, and OMP_NUM_THREADS (a new "
                       "precision, layout, worker or thread count changes the numbers: the log "
                       "says so)")
    modes.add_argument("--evaluate", type=Path, metavar="CKPT",
                       help="only evaluate CKPT on the test set")
    g.add_argument("--tta", action="store_true",
                   help="with --evaluate: also report the accuracy with each test image's "
                   "mirror image averaged in (2 views; every other figure is single view)")
    modes.add_argument("--summary", action="store_true", help="print the layer table and exit")
    modes.add_argument("--benchmark", action="store_true",
                       help="measure speed on this machine and exit")


class OneLineParser(argparse.ArgumentParser):
    where = "(see --help)"  # what a mistake points to: the flags, or a checkpoint's settings

    def error(self, message):
        raise UserError(f"{message} {self.where}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help only where X says something (not None or a
    switch's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def number(kind, zero_ok=True, high=None, high_ok=True):
    """An argparse type: a number of kind (int or float), >= 0 (> 0 unless zero_ok) and at most
    high (below it unless high_ok): by default the most that the step's float32, or an int64,
    holds."""
    high = high if high is not None else FLOAT32_MAX if kind is float else 2**63 - 1

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value >= 0 if zero_ok else value > 0):  # false for nan too
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero_ok else '>'} 0, got {text}")
        if value > high or (value == high and not high_ok):
            shown = high if kind is int else f"{high:.3g}"  # 3.4e+38, not 39 digits
            bound = "at most" if high_ok else "below"
            raise argparse.ArgumentTypeError(f"must be {bound} {shown}, got {text}")
        return value
    return parse


def run_folder(text):
    if not text.strip():  # an unset shell variable: not the current directory
        raise argparse.ArgumentTypeError("is empty")
    return Path(text)


def parse_command_line(argv):
    """(args, the names of the flags given): argparse alone cannot tell a flag given with its
    default value from one left out, and --resume must know. Parsed again with no defaults,
    the flags given are what is left."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def check_flags(args, given):
    """Flag combinations that cannot work, and flags a mode does not use, refused before anything
    is read or written."""
    if args.tta and not args.evaluate:
        raise UserError("--tta applies to --evaluate CKPT only "
                        "(training runs report single-view accuracy)")
    for mode, uses in MODE_FLAGS.items():
        unused = [f"--{k.replace('_', '-')}" for k in sorted(given) if k not in uses]
        if getattr(args, mode) and unused:
            raise UserError(f"--{mode} does not use {', '.join(unused)}")
    if args.resume:
        # a resume takes anew where and how to run (the plan), but never the folder
        fixed = [f"--{k.replace('_', '-')}" for k in sorted(given)
                 if k in RECIPE_FIELDS or k == "out"]
        if "--epochs" in fixed:
            raise UserError("--epochs cannot change on --resume: the OneCycle schedule of the run "
                            "was laid out for its epochs; to train longer, start a new run")
        if fixed:
            raise UserError(f"{', '.join(fixed)} cannot be given with --resume: the run keeps "
                            "the settings it was started with (see --help for what may change)")


def resumed_settings(args, given, held):
    """The run's recipe and plan from the checkpoint, with the flags given anew; the checkpoint,
    and the lock's note. The run folder is locked (by `held`) before anything in it is read."""
    # the folder the checkpoint really is in (through a symbolic link too) is the run's
    resume = Path(os.path.realpath(args.resume))
    note = lock_folder(resume.parent, held) if os.path.isfile(resume) else None
    state = read_checkpoint(args.resume)
    check_training_state(state, args.resume)
    flags = {**vars(checkpoint_settings(state, args.resume)),
             **{name: getattr(args, name) for name in given}}
    data_folder = flags["data_dir"]
    splits = ("train",) if flags["val"] else ("train", "test")
    if "data_dir" not in given and not holds_cifar10(data_folder, splits):
        # a relative --data-dir, resumed from another directory: found through its absolute path
        data_folder = Path(state.get("data_dir_resolved", data_folder))
        if not holds_cifar10(data_folder, splits):
            raise UserError(f"the run's data (--data-dir {flags['data_dir']}) is not found from "
                            "here; give --data-dir with where it is now")
    # a checkpoint of an older version has no run id: the run gets one from here on
    recipe, plan = make_settings(flags, data_folder=data_folder, out=resume.parent, resume=resume,
                                 run_id=state.get("run_id") or uuid.uuid4().hex[:12])
    check_out_folder(plan.out, plan.data_folder, named="run folder")
    check_folder_holds_the_run(plan.out, resume, state)
    check_rewind(plan, state)
    remove_run_files(plan.out, temporaries_only=True)
    threads = state.get("resolved", {}).get("threads")
    if threads and not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        torch.set_num_threads(threads)  # the run's own: on a CPU the count changes the numbers
    return recipe, plan, state, note


def checkpoint_settings(state, path):
    """The settings a checkpoint keeps, each checked as the parser checks its flag (a value
    edited by hand is refused in one line), with 'auto' as the run resolved it."""
    parser = build_parser()
    parser.where = f"(a setting kept in {path})"
    saved = {**state["args"], **state.get("resolved", {})}
    skipped = ("help", "resume", "overwrite", *TRAINING_MODES)  # not settings of the run
    argv = []
    for action in parser._actions:
        if action.dest in skipped or action.dest not in saved:
            continue
        value = saved[action.dest]
        if action.nargs == 0:  # a switch, as --compile and --no-compile
            if not isinstance(value, bool):
                raise UserError(f"{path} holds a damaged setting: {action.dest}={value!r}")
            if value == action.const:
                argv.append(action.option_strings[0])
        elif value is not None or action.default is not None:
            argv.append(f"{action.option_strings[0]}={value}")
    return parser.parse_args(argv)


def check_rewind(plan, state):
    """Resuming from an earlier epoch than the run's latest would rewrite the later ones."""
    with contextlib.suppress(OSError, ValueError, csv.Error):  # the checkpoint is what counts
        with open(plan.out / "metrics.csv") as f:
            latest = max(len(list(csv.DictReader(f))), state["epoch"])
        if latest > state["epoch"] and not plan.overwrite:
            last = plan.out / "last.pt"
            other = "" if last.resolve() == plan.resume else f"resume from {last}, or "
            raise UserError(f"{plan.resume} holds epoch {state['epoch']}, but {plan.out} holds "
                            f"epochs up to {latest}: resuming from it would rewrite them; "
                            f"{other}add --overwrite to rewind the run")


def resolved_settings(runtime):
    """The settings that change the numbers, as this run resolved them ('auto' made concrete,
    the CPU threads): a resumed run keeps them."""
    return {"precision": runtime.precision, "channels_last": "on" if runtime.channels_last
            else "off", "workers": runtime.workers, "threads": torch.get_num_threads()}


# -----------------------------------------------------------------------------
# The machine: device, precision, layout, workers

def nvidia_driver_present():
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def resolve_device(name):
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (try --device auto)")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available here (try --device auto)")
    return torch.device(name)


def resolve_precision(name, device):
    if name == "auto":
        native_bf16 = any(getattr(torch.cpu, f, lambda: False)()
                          for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        # a CPU with native bf16 (emulated bf16 is slower than fp32): faster, same accuracy;
        # CUDA: with CUDA graphs, bf16 made this net's batch-64 step no faster (README)
        name = "bf16" if device.type == "cpu" and native_bf16 else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32")
    return name


def make_runtime(plan, log):
    """The Runtime the plan asks for, 'auto' resolved for this machine."""
    device = resolve_device(plan.device)
    if device.type == "cpu" and plan.device == "auto" and nvidia_driver_present():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        log(f"note: an NVIDIA driver is present but torch {torch.__version__} ({build}) cannot "
            "use it, so this runs on the CPU; install the torch build that matches the driver")
    workers = plan.workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(8, usable_cpus() // 2)
    if workers > usable_cpus():
        log(f"note: {workers} workers on {usable_cpus()} usable CPUs: more workers than "
            "CPUs only slow the run")
    precision = resolve_precision(plan.precision, device)
    channels_last = plan.channels_last == "on" or (plan.channels_last == "auto"
                                                   and device.type == "cpu")
    if plan.cuda_graphs == "on" and device.type != "cuda":
        raise UserError("--cuda-graphs on needs CUDA")
    cuda_graphs = plan.cuda_graphs != "off" and device.type == "cuda"
    return Runtime(device, precision, channels_last, cuda_graphs, plan.compile, workers)


def usable_cpus():
    """The CPUs this process may run on (taskset, a container's cpuset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 2


def code_version():
    """The commit the script ran at, so that a run spanning code changes (a resume after an
    update) says so in its log."""
    def git(*command):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *command],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "code: not a git checkout, commit unknown"
    return f"code: commit {commit}" + (", with uncommitted changes" if changed else "")


def describe(runtime, workers=False):
    graphs = ", CUDA graphs" if runtime.cuda_graphs else ""
    line = (f"device: {runtime.device}, precision: {runtime.precision}, "
            f"channels_last: {runtime.channels_last}{graphs}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    return f"{line}, {runtime.workers} workers" if workers else line


# -----------------------------------------------------------------------------
# Reading the data: an ImageFolder copy, or torchvision's archive

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def to_rgb(im, path, notes):
    """An RGB PIL image. 16-bit grayscale is scaled to 8 bits first: PIL's own conversion clips
    it, which turns most 16-bit pictures white."""
    if im.mode == "RGB":
        return im
    notes.setdefault("converted to RGB", []).append(path)
    if im.mode == "P" and "transparency" in im.info:  # through RGBA, as Pillow asks
        im = im.convert("RGBA")
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
        wide = np.asarray(im, dtype=np.float64) * (255 / 65535)
        im = Image.fromarray(np.rint(wide).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def read_image(path, notes, digest=None):
    """An RGB 32x32 uint8 array. Other modes are converted and other sizes resized, with a note.
    The file's bytes go into digest, if given: the record of the data a run trained on."""
    try:
        data = path.read_bytes()
        if digest:
            digest.update(f"{path.parent.name}/{path.name}:{len(data)}:".encode() + data)
        with warnings.catch_warnings():  # a decompression bomb is one error, not also a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
            im = to_rgb(im, path, notes)
            if im.size != (32, 32):
                notes.setdefault("resized to 32x32", []).append(path)
                im = im.resize((32, 32), Image.BILINEAR, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except Image.UnidentifiedImageError:
        what = "the file is empty" if not data else "not an image Pillow can read, or damaged"
        raise UserError(f"cannot read image {path}: {what}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def is_image_file(entry):
    name = entry.name
    return (entry.is_file() and not name.startswith(".")
            and Path(name).suffix.lower() in IMAGE_EXTENSIONS)


def list_class_folder(folder, notes):
    """The sorted image paths in one class folder; other files are noted and skipped."""
    images = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_image_file(entry):
                images.append(Path(entry.path))
            elif entry.is_dir():
                notes.setdefault("subfolders of class folders skipped", []).append(
                    Path(entry.path))
            else:
                notes.setdefault("non-image files skipped", []).append(Path(entry.path))
    if not images:
        raise UserError(f"class folder {folder} holds no images")
    return sorted(images)


def list_image_folder(split_dir, notes):
    """(paths, labels) of DIR/<class>/*, checking that the classes are exactly the CIFAR-10 ten."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    missing, extra = sorted(set(CLASSES) - set(found)), sorted(set(found) - set(CLASSES))
    if missing or extra:
        wrong = [f"{what}: {', '.join(names)}"
                 for what, names in (("missing", missing), ("unexpected", extra)) if names]
        raise UserError(f"{split_dir} must hold exactly the ten CIFAR-10 class folders "
                        f"({', '.join(CLASSES)}); {'; '.join(wrong)}")
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        images = list_class_folder(split_dir / name, notes)
        paths += images
        labels += [label] * len(images)
    return paths, np.array(labels, dtype=np.int64)


def load_image_folder(split_dir, limit, notes, digest):
    try:
        paths, labels = list_image_folder(split_dir, notes)
    except OSError as e:  # an unreadable folder, a class "folder" that is a file, ...
        raise UserError(f"cannot read the data folder {split_dir}: {e}") from None
    keep = balanced_indices(labels, limit) if limit else np.arange(len(paths))
    images = np.stack([read_image(paths[i], notes, digest) for i in keep])
    return images, labels[keep]


def load_torchvision(data_dir, limit, splits, digest):
    """torchvision's official CIFAR-10 archive, downloaded into data_dir when absent. What the
    user had in data_dir is left as it was; what a failed download made is removed."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity
    archive = data_dir / CIFAR10.filename
    if (archive.exists() and not (data_dir / CIFAR10.base_folder).exists()
            and not check_integrity(str(archive), CIFAR10.tgz_md5)):
        raise UserError(f"{archive} is damaged or not the official archive (its checksum "
                        "differs); remove it to download it again")
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # folders to be made
    had_archive = archive.exists()
    try:
        loaded = {s: CIFAR10(str(data_dir), train=s == "train", download=True) for s in splits}
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive a RuntimeError
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        elif not had_archive:
            archive.unlink(missing_ok=True)  # a partial download
        raise UserError(f"no CIFAR-10 in {data_dir} and downloading it failed ({e}); point "
                        "--data-dir at a local copy: an ImageFolder tree DIR/train/<class>/*.jpg "
                        "+ DIR/test/<class>/*.jpg, or a folder holding cifar-10-batches-py"
                        ) from None
    out = {}
    for split, ds in loaded.items():
        labels = np.array(ds.targets, dtype=np.int64)
        keep = balanced_indices(labels, limit) if limit else np.arange(len(labels))
        out[split] = (ds.data[keep], labels[keep])
        digest.update(out[split][0].tobytes())
    return out


def is_image_folder(data_dir, splits=("train", "test")):
    return all((data_dir / split).is_dir() for split in splits)


def holds_cifar10(data_dir, splits=("train", "test")):
    """An ImageFolder copy with these splits, or torchvision's files."""
    return (is_image_folder(data_dir, splits) or (data_dir / "cifar-10-batches-py").is_dir()
            or (data_dir / "cifar-10-python.tar.gz").is_file())


def check_data_dir(data_dir, splits):
    """Refuses a --data-dir that is neither a CIFAR-10 copy nor a place to download one."""
    try:
        if holds_cifar10(data_dir, splits):
            return
        if data_dir.is_file() or (data_dir.is_dir() and any(data_dir.iterdir())):
            raise UserError(f"{data_dir} is not a CIFAR-10 folder: expected DIR/train/<class>/ "
                            "and DIR/test/<class>/ (ImageFolder layout) or "
                            "DIR/cifar-10-batches-py/ (torchvision)")
        nearest_folder(data_dir, "--data-dir")  # where the download makes it
    except OSError as e:
        raise UserError(f"cannot read the data folder {data_dir}: {e}") from None


def nearest_folder(path, named):
    """path, or the nearest folder above it where path can be made; refuses a file on the way."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{named} {path} is a symbolic link that leads nowhere, or in a loop")
    existing = next(p for p in (path, *path.parents, Path(".")) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{named} {path}: {existing} is a file, not a folder")
    return existing


# -----------------------------------------------------------------------------
# The run folder and its lock

RUN_FILES = ("train.log", "metrics.csv", "best.pt", "last.pt", "augmentations.png",
             "curves.png", "confusion.png", "misclassified.png")


def check_out_folder(out, data_folder, named="--out"):
    """The run folder must be, or be able to become, a folder this user can write to, outside
    the data, with nothing but regular files where the run writes its files (a FIFO would hang
    it)."""
    data, real_out = Path(os.path.realpath(data_folder)), Path(os.path.realpath(out))
    if real_out == data or data in real_out.parents:  # realpath: a link loop is said below
        how = "give --out a folder elsewhere" if named == "--out" else "move it elsewhere"
        raise UserError(f"run folder {out} is inside the data folder {data_folder}: its files "
                        f"would be read as data by later runs; {how}")
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{named} {out} is a file, not a folder")
        existing = nearest_folder(out, named)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{named} {out}: {existing} is not writable")
        odd = [out / name for name in RUN_FILES
               if (out / name).exists() and not (out / name).is_file()]
        if odd:
            what = "a folder" if odd[0].is_dir() else "not a regular file"
            raise UserError(f"{odd[0]} is {what}, where the run writes a file; move it away")
    except OSError as e:
        raise UserError(f"{named} {out}: {e}") from None


def make_run_folder(plan):
    """Creates the run folder: --out, or runs/<date-time>."""
    try:
        if plan.out is None:
            stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
            for n in range(1, 1000):  # two runs started in the same second get two folders
                out = stamp.with_name(f"{stamp.name}-{n}") if n > 1 else stamp
                with contextlib.suppress(FileExistsError):
                    out.mkdir(parents=True)
                    return out
            raise UserError(f"no free run folder name in runs/ for {stamp.name}; give --out")
        plan.out.mkdir(parents=True, exist_ok=True)
        return plan.out
    except OSError as e:
        raise UserError(f"cannot make the run folder {plan.out or 'runs/'}: {e}") from None


def take_run_folder(plan, held):
    """Makes a new run's folder and locks it for the whole run (released by `held`), and only
    then checks what it holds: of two runs given one folder, the second is refused rather than
    both passing the check. Returns the folder, and the lock's note."""
    out = plan.out or Path("runs")
    check_out_folder(out, plan.data_folder)
    missing = [p for p in (out, *out.parents) if not p.exists()]
    folder = make_run_folder(plan)
    note = lock_folder(folder, held, other="give another --out, or ")
    # the folders made for the run go again if it ends having written nothing in them: before
    # the lock is released (held runs this first), so never from under another run
    STOP.leftovers += reversed(([folder] if plan.out is None else []) + missing)
    held.callback(STOP.remove_leftovers)
    if not plan.overwrite:
        check_nothing_is_replaced(folder)
    return folder, note


def lock_folder(folder, held, other=""):
    """Locks folder until `held` ends; returns a note where this filesystem cannot lock."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
        held.callback(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        return "note: run folders are not locked on this system"
    except BlockingIOError:
        raise UserError(f"run folder {folder} is in use by another run; {other}wait for that "
                        "run to end") from None
    except OSError as e:  # some network filesystems cannot lock
        return f"note: the run folder cannot be locked here ({e.strerror}); running without a lock"
    return None


def check_nothing_is_replaced(folder):
    """A new run replaces the files in folder that carry its files' names only with --overwrite,
    or where they are of an earlier start of this script that finished no epoch (a retry)."""
    log = folder / "train.log"
    try:
        logged = read_log(log) if log.is_file() else ""
        if (any((folder / name).exists() for name in ("metrics.csv", "best.pt", "last.pt"))
                or re.search(r"^Epoch \d+/\d+,", logged, re.M)):  # an epoch finished there
            last = folder / "last.pt"
            how = f"use --resume {last} to continue or " if last.exists() else ""
            raise UserError(f"run folder {folder} already holds results; "
                            f"{how}--overwrite to start over")
        if run_ids_in_log(log):
            return  # the earlier start's own files
        in_the_way = [path.name for path in run_files_in(folder)]
    except OSError as e:
        raise UserError(f"cannot read the run folder {folder}: {e}") from None
    if in_the_way:
        raise UserError(f"run folder {folder} holds files the run would replace: "
                        f"{', '.join(in_the_way)}; move them away, or add --overwrite to replace "
                        "them")


def run_files_in(folder, temporaries_only=False):
    """The files in folder that a run writes, and the temporaries of them that a run killed
    while writing left behind (write_atomically's NAME.XXXXXXXX.tmp)."""
    found = []
    for path in sorted(folder.iterdir()):
        temporary = path.suffix == ".tmp" and any(path.name.startswith(name + ".")
                                                  for name in RUN_FILES)
        if not path.is_dir() and (temporary or path.name in RUN_FILES and not temporaries_only):
            found.append(path)
    return found


def remove_run_files(folder, temporaries_only=False):
    for path in run_files_in(folder, temporaries_only):
        with contextlib.suppress(OSError):
            path.unlink()


def check_folder_holds_the_run(folder, checkpoint, state):
    """Refuses to resume into a folder whose files belong to another run: they would be
    overwritten."""
    if "run_id" not in state:
        return  # an older checkpoint: said in the log
    others = set()
    for name in ("last.pt", "best.pt"):
        path = folder / name
        if path.is_file() and not path.samefile(checkpoint):
            with contextlib.suppress(Exception):  # not a checkpoint: not a run's
                others.add(torch.load(path, map_location="cpu", weights_only=True)["run_id"])
    others.update(run_ids_in_log(folder / "train.log"))
    others.discard(state["run_id"])
    if others:
        raise UserError(f"{folder} holds the files of another run (run id {sorted(others)[0]}) "
                        f"than {checkpoint.name} (run id {state['run_id']}): resuming would "
                        f"overwrite them; move {checkpoint.name} into a folder of its own first")


def run_ids_in_log(log):
    """The run ids a train.log names: none where it is not a run's log (or not a file)."""
    return re.findall(r"^run id: (\w+)$", read_log(log), re.M) if log.is_file() else []


def read_log(path):
    try:
        return path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


# -----------------------------------------------------------------------------
# Saving and resuming: plain tensors and numbers only, written atomically, loaded with
# weights_only=True

def write_atomically(path, data):
    """Writes bytes to a temporary file beside path and renames it onto path: a kill at any moment
    leaves the old file or the new one, never part of one (the next run in the folder removes a
    temporary left behind). A file that cannot be written (a full disk) raises SaveFailed."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        STOP.leftovers.append(tmp)  # a process ended at once while writing removes it
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp's file is private; the run's files follow umask
                os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave it empty
        os.replace(tmp, path)
    except OSError as e:
        raise SaveFailed(path, e) from None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            STOP.leftovers.remove(tmp)


@functools.cache
def umask():
    mask = os.umask(0o022)  # reading the umask means setting it; it is set straight back
    os.umask(mask)
    return mask


def save_checkpoint(path, state):
    buffer = io.BytesIO()  # in memory first: torch.save on a full disk fails with a RuntimeError
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def run_record(recipe, plan, folder, runtime, data):
    """What each checkpoint of the run keeps besides its training state: the flags as the log
    shows them ("args": --data-dir as given, the folder and worker count as the run took them),
    and what a resume checks."""
    flags = {**asdict(recipe), **{k: getattr(plan, k) for k in PLAN_FLAGS}, **TRAINING_MODES,
             "out": folder, "workers": runtime.workers}
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()},
            # --data-dir as given is kept for the logs; this finds it from another directory
            "data_dir_resolved": str(Path(plan.data_folder).resolve()),
            # what a resume checks: that it continues this run, on its data, as it ran
            "run_id": plan.run_id, "data": data.record, "resolved": resolved_settings(runtime)}


def checkpoint_state(training, history, record):
    state = {"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
             "scheduler": training.scheduler.state_dict(), "scaler": training.scaler.state_dict(),
             "rng": torch.get_rng_state(), "epoch": history[-1]["epoch"], "history": history,
             **record}
    if training.ema:
        state["ema"] = training.ema.model.state_dict()
    return state


def read_checkpoint(path):
    """The checkpoint's dict, or one line saying why the file is not one of this network."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as e:  # a name too long, ...
        raise UserError(f"checkpoint {path}: {e.strerror}") from None
    if not exists:
        raise UserError(f"checkpoint {path} does not exist")
    if not is_file:
        raise UserError(f"checkpoint {path} is not a file")
    try:
        if zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch does not check
            with zipfile.ZipFile(path) as archive:  # its CRCs, so a flipped bit would load
                if archive.testzip() is not None:
                    raise zipfile.BadZipFile("a CRC check fails")
        with warnings.catch_warnings():  # an old pickle: torch warns before it refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for files that are not checkpoints
        raise UserError(f"{path} is not a loadable checkpoint: {unloadable(path, e)}") from None
    if (not isinstance(state, dict) or not isinstance(state.get("model"), dict)
            or not isinstance(state.get("ema", {}), dict)):
        raise UserError(f"{path} is not a checkpoint of this script")
    check_network(state, path)
    return state


def unloadable(path, error):
    """Why torch.load refused path, in words."""
    text = str(error).lower()
    if "weights_only" in text or "unsupported global" in text:
        return "it holds objects other than tensors and numbers, refused for safety"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") and zipfile.is_zipfile(path):  # torch.save writes a zip archive
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "it is a zip archive, not a PyTorch file"
        return "the file is damaged"
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # a zip or pickle, cut short
        return "the file is cut short or damaged"
    return "it is not a PyTorch file"


def check_network(state, path):
    """Refuses a checkpoint whose weights are not those of this network."""
    expected = {k: tuple(v.shape) for k, v in Net().state_dict().items()}
    for key in ("model", "ema"):
        entry = state.get(key, state["model"])
        found = {k: tuple(getattr(v, "shape", ())) for k, v in entry.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()), key=str)[:3]
            raise UserError(f"{path} holds a different network (first differences: {diff})")
        if not all(torch.isfinite(v).all() for v in entry.values() if v.is_floating_point()):
            raise UserError(f"{path} holds weights that are not finite numbers (NaN or infinity)")


def load_weights(model, state, path, weights="model"):
    """Loads a checkpoint's state[weights] (or state["model"] where it has no such entry) into
    model."""
    try:
        model.load_state_dict(state.get(weights, state["model"]))
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path} holds weights this network cannot load: "
                        f"{str(e).splitlines()[0]}") from None


# what a resume reads of a checkpoint, by type; those of LATER_STATE are missing from
# checkpoints of older versions, and only from those (their run has no run id)
TRAINING_STATE = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": torch.Tensor,
                  "epoch": int, "history": list, "args": dict}
LATER_STATE = {"run_id": str, "data": dict, "resolved": dict}
HISTORY = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_s",
           "elapsed_s")


def check_training_state(state, path):
    """Refuses a checkpoint that has no training state, or one with a part that is not what a
    resume reads (edited or forged by hand), before anything of it is used."""
    if not set(TRAINING_STATE) <= set(state):
        raise UserError(f"{path} holds weights but no training state to resume; see --evaluate")
    parts = {**TRAINING_STATE, **(LATER_STATE if "run_id" in state else {})}
    wrong = [k for k, kind in parts.items() if not isinstance(state.get(k), kind)]
    if not wrong:  # the parts are of their types: now what a resume reads inside them
        scheduler, history = state["scheduler"], state["history"]
        inside = {"epoch": is_count(state["epoch"]),
                  "history": all(isinstance(h, dict) and all(type(h.get(k)) in (int, float)
                                                             for k in HISTORY) for h in history),
                  "scheduler": is_count(scheduler.get("total_steps"), low=1)
                  and is_count(scheduler.get("last_epoch")),
                  "args.epochs": "epochs" in state["args"],  # its value: the parser's check
                  "resolved.threads": is_count(state.get("resolved", {}).get("threads", 1),
                                               low=1, high=4096),
                  "data_dir_resolved": isinstance(state.get("data_dir_resolved", ""), str)}
        wrong = [k for k, right in inside.items() if not right]
    if wrong:
        raise UserError(f"{path} holds a damaged training state (its {wrong[0]})")


def is_count(value, low=0, high=2**62):
    """A whole number (not a bool) from low to high."""
    return type(value) is int and low <= value <= high


def restore_training(training, state, path):
    """Puts a checkpoint's optimizer, schedule, scaler, EMA and RNG back; returns its history."""
    planned, now = state["scheduler"].get("total_steps"), training.scheduler.total_steps
    if planned != now:
        raise UserError(f"{path} is from a run of {planned} steps, but its settings on this data "
                        f"make {now}: this is not the data it trained on")
    try:
        if training.ema:  # a checkpoint from before the EMA starts it from its weights
            training.ema.model.load_state_dict(state.get("ema", state["model"]))
        training.optimizer.load_state_dict(state["optimizer"])
        training.scheduler.load_state_dict(state["scheduler"])
        training.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        history = list(state["history"])
        steps_per_epoch = now // state["args"]["epochs"]
        if (len(history) != state["epoch"] or [h["epoch"] for h in history] != list(
                range(1, len(history) + 1)) or state["scheduler"]["last_epoch"] != state["epoch"]
                * steps_per_epoch):
            raise ValueError("its epoch, history and schedule do not agree")
        return history
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise UserError(f"{path} holds a damaged training state ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def resume_notes(plan, state, runtime, data):
    """Refuses a resume on other data than the run's; notes what could not be checked (a
    checkpoint of an older version) and run settings given anew that change the numbers."""
    if "run_id" not in state:
        return [f"note: {plan.resume} was written by an older version of this script: it holds "
                f"no run id and no record of its data, so neither that {plan.out} holds only this "
                "run nor that the data is the run's own could be checked"]
    check_same_data(state["data"], data.record, plan)
    kept, now = state["resolved"], resolved_settings(runtime)
    notes = []
    for k in [k for k in now if k in kept and now[k] != kept[k]]:
        flag = "OMP_NUM_THREADS=" if k == "threads" else f"--{k.replace('_', '-')} "
        notes.append(f"note: {flag}{now[k]} given anew (the run had {kept[k]}): from here on the "
                     "numbers differ from those of an uninterrupted run")
    return notes


def check_same_data(saved, record, plan):
    if not (isinstance(saved.get("counts"), dict) and isinstance(saved.get("sha256"), str)):
        raise UserError(f"{plan.resume} holds a damaged record of its data")
    for split, counts in saved["counts"].items():
        found = record["counts"].get(split)
        if found != counts:
            raise UserError(f"{plan.data_dir} is not the data this run trained on: its {split} "
                            f"split has {found} images per class, the run's had {counts}")
    if saved["sha256"] != record["sha256"]:
        raise UserError(f"{plan.data_dir} is not the data this run trained on: the same number "
                        "of images per class, but other image files (another copy, or changed "
                        "images)")


# -----------------------------------------------------------------------------
# Pictures and the final report

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


FIGURE_DPI = 110
ZOOM = 3  # augmentations.png shows each image pixel as a ZOOM x ZOOM block
CELL_WIDTH, CELL_HEIGHT, MARGIN_LEFT, MARGIN_TOP = 130, 32 * ZOOM + 64, 80, 60


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    pyplot().close(fig)
    write_atomically(path, buffer.getvalue())


class AugmentationSample(NamedTuple):
    """One training image as decoded, and augmented draws of it with what each applied."""
    label: int
    image: np.ndarray  # uint8 HWC
    draws: list  # of (uint8 HWC image, text of what was applied)


def augmentation_samples(images, labels, recipe, draws=7):
    """The first training image of each class present and `draws` augmentations of it by the
    run's pipeline settings. A pipeline of its own, seeded by --seed, draws them: the training's
    augmentation streams are not touched."""
    augment = train_transform(recipe.flip_p, recipe.affine_p, recipe.dropout_p,
                              save_applied_params=True)
    augment.set_random_seed(recipe.seed)
    samples = []
    for label in np.unique(labels):
        image = images[np.flatnonzero(labels == label)[0]]
        drawn = [augment(image=image) for _ in range(draws)]
        samples.append(AugmentationSample(int(label), image, [
            (d["image"], describe_applied(d["applied_transforms"])) for d in drawn]))
    return samples


def describe_applied(applied):
    """What Albumentations reports it applied, in a few words per transform."""
    parts = []
    for name, params in applied:
        if name == "HorizontalFlip":
            parts.append("flip")
        elif name == "Affine":
            # rotation and scale are about the image centre: where it moves is the shift
            centre = np.array([15.5, 15.5, 1.0])
            dx, dy = np.round((params["matrix"] @ centre)[:2] - centre[:2], 1) + 0.0  # not -0.0
            scale = params["scale"]
            parts += [f"rotate {params['rotate']:+.1f}°", f"shift {dx:+.1f}, {dy:+.1f} px",
                      f"scale {scale['x']:.2f} x {scale['y']:.2f}"]
        elif name == "CoarseDropout":
            x1, y1, x2, y2 = params["holes"][0]
            parts.append(f"{x2 - x1}x{y2 - y1} hole at {x1}, {y1}")
    return "\n".join(parts) or "nothing"


def augmentation_cell(row, column):
    """(x, y) of the top-left pixel of a cell's image in augmentations.png, from its top-left."""
    return (MARGIN_LEFT + column * CELL_WIDTH + (CELL_WIDTH - 32 * ZOOM) // 2,
            MARGIN_TOP + row * CELL_HEIGHT)


def plot_augmentations(samples, recipe):
    """Each class's image as decoded, then its draws, each labelled with what was applied. The
    images are placed pixel for pixel (figimage, no resampling or smoothing)."""
    columns = 1 + len(samples[0].draws)
    width, height = MARGIN_LEFT + columns * CELL_WIDTH, MARGIN_TOP + len(samples) * CELL_HEIGHT
    fig = pyplot().figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    fig.text(0.5, 1 - 12 / height, f"what the network sees: flip p={recipe.flip_p}, affine "
             f"p={recipe.affine_p}, hole p={recipe.dropout_p} (seed {recipe.seed}; before "
             "normalising)",
             ha="center", va="top", fontsize=10)
    for row, sample in enumerate(samples):
        cells = [(sample.image, "as decoded")] + sample.draws
        for column, (image, text) in enumerate(cells):
            x, y = augmentation_cell(row, column)
            fig.figimage(image.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1), xo=x,
                         yo=height - y - 32 * ZOOM, origin="upper")
            fig.text((x + 16 * ZOOM) / width, 1 - (y + 32 * ZOOM + 3) / height, text,
                     ha="center", va="top", fontsize=6.5, linespacing=1.1)
        fig.text(6 / width, 1 - (y + 16 * ZOOM) / height, CLASSES[sample.label], va="center",
                 fontsize=9)
    return fig


def plot_curves(history, split):
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy (%)")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train (augmented)")
        ax.plot(epochs, [h[f"test_{key}"] for h in history], label=split)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(confusion, split):
    fig, ax = pyplot().subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    for t in range(10):
        for p in range(10):
            dark = confusion[t, p] > confusion.max() / 2
            ax.text(p, t, confusion[t, p], ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"confusion matrix ({split})")
    ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    ax.set_yticklabels(CLASSES)
    fig.tight_layout()
    return fig


def plot_misclassified(images, labels, preds, split):
    """The first three mistakes of each true class, one class per column."""
    fig, axes = pyplot().subplots(3, 10, figsize=(16, 6.6))
    for c, column in enumerate(axes.T):
        wrong = np.flatnonzero((labels == c) & (preds != labels))[:3]
        for ax, i in zip(column, wrong):
            ax.imshow(images[i])
            ax.set_title(f"{CLASSES[labels[i]]}\n-> {CLASSES[preds[i]]}", fontsize=9)
        for ax in column:
            ax.axis("off")
    fig.suptitle(f"misclassified {split} images: true class -> predicted")
    fig.tight_layout()
    return fig


def write_metrics(out, history):
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    write_atomically(out / "metrics.csv", text.getvalue().encode())


def report(out, history, split, eval_split, preds, log):
    """The final lines of the log and the three pictures."""
    final, top = history[-1], max(history, key=lambda h: h["test_acc"])
    reached = next((h for h in history if h["test_acc"] >= 85.0), None)
    reached = f"epoch {reached['epoch']} after {reached['elapsed_s']:.0f} s" if reached else "never"
    log(f"Done: final {split} accuracy {final['test_acc']:.2f}%, best {top['test_acc']:.2f}% "
        f"(epoch {top['epoch']}), 85% first reached: {reached}, "
        f"{final['elapsed_s'] / len(history):.1f} s per epoch, "
        f"{final['elapsed_s'] / 60:.1f} min in all")
    images, labels = eval_split
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    pictures = {"curves.png": lambda: plot_curves(history, split),
                "confusion.png": lambda: plot_confusion(confusion, split),
                "misclassified.png": lambda: plot_misclassified(images, labels, preds, split)}
    for name, draw in pictures.items():
        save_figure(draw(), out / name)
        STOP.check()
    per_class = [f"{c} {100 * confusion[i, i] / confusion[i].sum():.1f}%" if confusion[i].sum()
                 else f"{c} (no images)" for i, c in enumerate(CLASSES)]
    log("Per-class accuracy: " + ", ".join(per_class))
    log(f"run folder: {out} ({', '.join(n for n in RUN_FILES if (out / n).exists())})")


# -----------------------------------------------------------------------------
# The other modes: evaluate a checkpoint, the layer table, the benchmark

def evaluate_checkpoint(checkpoint, tta, limit, plan, log):
    model = Net()
    load_weights(model, read_checkpoint(checkpoint), checkpoint, weights="ema")
    runtime = make_runtime(plan, log)
    splits, kind, _, _ = load_cifar10(plan.data_dir, limit, splits=("test",))
    model.to(runtime.device, memory_format=runtime.memory_format)
    images, labels = as_tensors(*splits["test"])
    views = {False: "", True: ", each image averaged with its mirror"}
    for flip_average in ([False, True] if tta else [False]):
        loss, acc, _ = evaluate(model, images, labels, runtime, flip_average)
        log(f"{checkpoint} on {kind} {plan.data_dir} test{views[flip_average]}: "
            f"Test Loss: {loss:.4f}, Test Accuracy: {acc:.2f}%")


def print_summary():
    model = Net()
    print(summary_text(model))
    print(f"Total trainable parameters: {count_parameters(model):,}")


def forward_once(model, modules, hook):
    """Runs one blank 32x32 image through model with a forward hook on each of modules."""
    hooks = [m.register_forward_hook(hook) for m in modules]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()


def output_shapes(model):
    """{child module: its output shape for one 32x32 image}."""
    shapes = {}

    def record(module, inputs, output):
        shapes[module] = tuple(output.shape[1:])
    forward_once(model, model.children(), record)
    return shapes


def layer_table(model):
    """Rows of (layer, output shape, params, receptive field in pixels), computed from the model."""
    shapes, names = output_shapes(model), {m: n for n, m in model.named_children()}
    rows, rf, jump = [], 1, 1
    for conv, bn in model.conv_bn_pairs():
        for c in (m for m in conv.modules() if isinstance(m, nn.Conv2d)):
            rf += (c.kernel_size[0] - 1) * c.dilation[0] * jump
            jump *= c.stride[0]
        params = sum(p.numel() for m in (conv, bn) for p in m.parameters())
        rows.append((f"{names[conv]} + {names[bn]}", shapes[bn], params, rf))
    fc_params = sum(p.numel() for p in model.fc.parameters())
    rows.append(("gap + fc", shapes[model.fc], fc_params, None))  # None: it sees the whole image
    return rows


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary_text(model):
    lines = ["| layer | output | params | receptive field |", "|---|---|---:|---:|"]
    for name, shape, params, rf in layer_table(model):
        field = f"{rf}x{rf}" if rf else "whole image"
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {params:,} | {field} |")
    lines.append(f"| **total** | | **{count_parameters(model):,}** | |")
    return "\n".join(lines)


def train_flops_per_image(model):
    """Forward multiply-adds x 2 FLOPs x 3 (forward, input grad, weight grad) per training image."""
    macs = []

    def count(conv, inputs, output):
        macs.append(output[0].numel() * conv.in_channels // conv.groups
                    * math.prod(conv.kernel_size))
    forward_once(model, [m for m in model.modules() if isinstance(m, nn.Conv2d)], count)
    return 6 * (sum(macs) + model.fc.in_features * model.fc.out_features)


def rate(fn, device, seconds=3.0, warmup=3):
    """Calls of fn per second."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        fn()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def benchmark_data(data_dir, limit):
    """Real images where --data-dir holds CIFAR-10, else random ones."""
    if holds_cifar10(data_dir):
        splits, kind, _, _ = load_cifar10(data_dir, limit=limit or 10_000)
        return splits, f"{kind} {data_dir}"
    g = np.random.default_rng(0)
    n = limit or 2_000
    splits = {s: (g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10)
              for s in ("train", "test")}
    return splits, "synthetic random images (no CIFAR-10 found at --data-dir)"


def benchmark_steps(recipe, variants):
    """{name: training step rate in img/s} on one ready batch, the variants alternated; and the
    configured variant's Training."""
    trainings, steps = {}, {}
    for name, runtime in variants.items():
        x = torch.randn(recipe.batch_size, 3, 32, 32, device=runtime.device)
        y = torch.randint(0, 10, (recipe.batch_size,), device=runtime.device)
        x = x.contiguous(memory_format=runtime.memory_format)
        trainings[name] = make_training(recipe, runtime, 10**7)  # a schedule longer than needed
        steps[name] = functools.partial(training_step, trainings[name], runtime, x, y)
    rates = dict.fromkeys(steps, 0.0)
    for _ in range(3):  # alternate, best of three: a noisy machine slows both alike
        for name, step in steps.items():
            images_per_s = rate(step, variants[name].device, 1.5) * recipe.batch_size
            rates[name] = max(rates[name], images_per_s)
    return rates, trainings["configured"]


def benchmark_pipeline(loader):
    """img/s of the loader alone, timed on the second of two passes (the first starts workers)."""
    for epoch in (1, 2):
        start = time.perf_counter()
        seen = sum(len(y) for _, y in loader.epoch(epoch))
        pipeline = seen / (time.perf_counter() - start)
    return pipeline


def benchmark_epoch(loader, runtime, training, test_split):
    """(training epoch img/s, evaluation img/s), each timed on the second of two passes: the
    first warms caches up and compiles."""
    test_images, test_labels = as_tensors(*test_split)
    for epoch in (1, 2):
        start = time.perf_counter()
        train_one_epoch(training, loader.epoch(epoch), runtime, 1, lambda line: None, 100)
        epoch_rate = len(loader) * loader.batches.batch_size / (time.perf_counter() - start)
        start = time.perf_counter()
        evaluate(training.forward, test_images, test_labels, runtime)
        eval_rate = len(test_labels) / (time.perf_counter() - start)
    return epoch_rate, eval_rate


def benchmark(recipe, plan, runtime, log):
    splits, source = benchmark_data(plan.data_dir, recipe.limit)
    if len(splits["train"][1]) < recipe.batch_size:
        raise UserError(f"--benchmark needs at least --batch-size ({recipe.batch_size}) training "
                        f"images; it has {len(splits['train'][1])}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.precision, torch.float32)
    a = torch.randn(2048, 2048, device=runtime.device, dtype=dtype)
    matmul = rate(lambda: a @ a, runtime.device) * 2 * 2048**3 / 1e9
    log(f"matmul 2048x2048 {runtime.precision}: {matmul:.0f} GFLOP/s")
    log(f"data: {source}, {len(splits['train'][1])} train images")

    flops = train_flops_per_image(Net())
    variants = {"configured": runtime,
                "plain NCHW fp32": Runtime(runtime.device, "fp32", False)}
    steps, training = benchmark_steps(recipe, variants)
    for name, r in variants.items():
        compiled = ", compiled" if r.compile else ""
        graphs = ", CUDA graphs" if r.cuda_graphs else ""
        log(f"train step, {name} ({r.precision}, channels_last={r.channels_last}{graphs}"
            f"{compiled}), "
            f"batch {recipe.batch_size}: {steps[name]:.0f} img/s, "
            f"{steps[name] * flops / 1e9:.0f} GFLOP/s")

    dataset = AugmentedBatches(*splits["train"],
                               train_transform(recipe.flip_p, recipe.affine_p, recipe.dropout_p))
    loader = TrainLoader(dataset, recipe.batch_size, 0, runtime.workers, runtime.device)
    log(f"data pipeline alone (decoded arrays -> augment -> uint8 batches, "
        f"{runtime.workers} workers): {benchmark_pipeline(loader):.0f} img/s")
    epoch, evaluation = benchmark_epoch(loader, runtime, training, splits["test"])
    loader.close()
    log(f"training epoch end to end ({len(loader) * recipe.batch_size} images): "
        f"{epoch:.0f} img/s")
    log(f"evaluation: {evaluation:.0f} img/s")
    step = steps["configured"]
    # roofline: the step's FLOP/s over a big matmul's; a net this small is far from it on a CPU
    # and farther on a GPU, where a batch of 64 leaves most of the chip idle
    log(f"benchmark: step={step:.0f} img/s, epoch={epoch:.0f} img/s, hidden={epoch / step:.2f}, "
        f"speedup={step / steps['plain NCHW fp32']:.1f}x, "
        f"roofline={step * flops / 1e9 / matmul:.2g}")


# -----------------------------------------------------------------------------
# Stopping: Ctrl-C, SIGTERM (docker stop, Slurm, systemd) and a closed terminal (SIGHUP),
# sent to this process or its whole group, from main() to the exit

class Stopped(Exception):
    """A stop signal, acted on at a point where the run can stop cleanly."""

    def __init__(self, signum):
        self.name, self.status = STOP_SIGNALS[signum], 128 + signum  # 130 Ctrl-C, 143 SIGTERM
        super().__init__(self.name)


class Stop:
    """The handler only notes a signal; the run acts on it where it chooses (`check`: between
    batches, evaluation batches, pictures and saves), so nothing is ever raised inside a library's
    callback or a DataLoader's set-up, and a save under way is finished. A second signal ends the
    process at once; so does the first while nothing is under way that must finish (`at_once`:
    the imports, decoding data, a download, the modes that write nothing, the end). Ending at
    once removes the `leftovers`: the temporary of a file being written, a run folder made for a
    run that wrote nothing."""

    arrivals = None  # the read end of the wakeup pipe: one byte per signal delivered

    def __init__(self, log=None):
        self.log, self.noted, self.at_once, self.leftovers = log, None, True, []
        self.owner, self.said = os.getpid(), False

    def start(self, log=None):
        """Takes the stop signals for this process, with the log of the run that begins."""
        self.__init__(log)
        take_stop_signals(self.note)
        if self.arrivals is None:
            with contextlib.suppress(ValueError):  # only the main thread may set the pipe
                read, write = os.pipe()
                os.set_blocking(read, False)
                os.set_blocking(write, False)
                signal.set_wakeup_fd(write, warn_on_full_buffer=False)
                Stop.arrivals = read

    def note(self, signum, frame):
        if os.getpid() != self.owner:  # a worker process, forked before it ignores the signals
            return
        second = self.noted is not None or self.deliveries() > 1
        self.noted = signum
        if self.at_once or second:
            self.end_now(signum)

    def deliveries(self):
        """Signals delivered since the last call. Two presses of Ctrl-C during one long C call
        run the handler once, but each writes a byte to the wakeup pipe."""
        with contextlib.suppress(OSError, TypeError):  # none pending, or no pipe
            return len(os.read(self.arrivals, 64))
        return 1

    def check(self):
        if self.noted is not None:
            raise Stopped(self.noted)

    def end_now(self, signum):
        self.remove_leftovers()
        stopped = Stopped(signum)
        self.say(stopped)
        # not through exit(): flushing a stdout that nobody reads (a paused `| less`) would wait
        # forever, and every line the log printed was flushed as it was printed
        os._exit(stopped.status)

    def say(self, stopped):
        """The line that ends a stopped process, said once: what is saved, and how to
        continue."""
        with self.held():  # a second signal meanwhile ends the process after the line
            if not self.said:
                self.said = True
                log = self.log or RunLog()  # the imports: no run's log yet
                log.end(f"interrupted by {stopped.name}: {log.where_it_stopped()}",
                        after_a_signal=True)

    def remove_leftovers(self):
        for path in reversed(self.leftovers):
            with contextlib.suppress(OSError):  # a folder goes only if nothing was written in it
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.remove(path)
        self.leftovers.clear()

    @staticmethod
    def exit(status):
        """Ends the process at once rather than through the interpreter's shutdown: seconds of
        torch's teardown, during which the default handlers are back and a signal would end the
        process without a line."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # None: closed (>&-)
                stream.flush()
        os._exit(status)

    @staticmethod
    @contextlib.contextmanager
    def held():
        """The stop signals blocked, this process getting them when the block ends: while the
        line of a stop is said, and while worker processes start, which inherit the block, set
        the signals to be ignored (start_worker) and only then unblock them, so that a signal to
        the whole group never reaches a worker before that (it would also count in the wakeup
        pipe they share, as a second signal)."""
        if not hasattr(signal, "pthread_sigmask"):  # Windows
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


STOP = Stop()


def start_worker(worker_id):
    """Worker processes leave the stop signals to the training process (a terminal, docker stop
    or Slurm signal every process of the job), and end with it even when it is killed outright:
    else they would hold its run folder's lock, which they inherit, for seconds."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# -----------------------------------------------------------------------------
# The log and errors

SAVE_FAILED = 74  # exit status when a file of the run cannot be written (sysexits' EX_IOERR)


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, exit status 2."""


class SaveFailed(Exception):
    """A file of the run could not be written (a full disk, a quota): one line saying what is
    saved, exit status SAVE_FAILED."""

    def __init__(self, path, error):
        super().__init__(f"cannot write {path}: {error.strerror or error}")


class RunLog:
    """Prints each line and appends it to the run folder's train.log once that is open. The
    terminal may go away (`| head`): the run goes on and the log keeps being written."""

    def __init__(self):
        self.file, self.folder, self.mode, self.finished = None, None, "train", False

    def __call__(self, line):
        line = printable(line)
        self.say(line, sys.stdout)
        self.write(line)

    def say(self, line, stream):
        if stream is None:  # closed from the start (>&-, a daemon): train.log has the line
            return
        try:
            print(line, file=stream, flush=True)
        except OSError:  # a closed pipe: its output goes nowhere from now on
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    def write(self, line):
        if self.file:
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError:  # a full disk: the checkpoint writes will say so
                pass

    def open(self, folder, append):
        """From here on the lines go to folder/train.log too, and an interruption's message
        reads what the folder holds."""
        self.folder = folder
        try:
            self.file = open(folder / "train.log", "a" if append else "w")
        except OSError as e:  # no inode left, a train.log this user may not write
            raise SaveFailed(folder / "train.log", e) from None

    def end(self, line, after_a_signal=False):
        """The line that ends the run: on stderr, and in train.log where it can still be written.
        After a signal it starts on a line of its own (a terminal has echoed ^C)."""
        line = printable(line)
        self.say("\n" * after_a_signal + line, sys.stderr)
        self.write(line)

    def close(self):
        if self.file:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def where_it_stopped(self):
        """What the run folder holds, read from disk, and how to continue."""
        if self.mode != "train":
            return f"{self.mode} stopped; it writes nothing"
        if self.folder is None:  # the run folder is not yet this run's
            return "nothing was written"
        last = self.folder / "last.pt"
        saved = saved_epochs(last)
        if not saved:
            return "no epoch had finished, nothing to resume"
        epoch, epochs = saved
        resume = resume_command(last)
        if epoch < epochs:
            return (f"last completed epoch is saved in {last} (epoch {epoch} of {epochs}); "
                    f"continue with: {resume}")
        if not self.finished:
            return (f"all {epochs} epochs are saved in {last}, the final report was cut short; "
                    f"to write it: {resume}")
        return f"the run had finished: its {epochs} epochs and report are in {self.folder}"


def printable(line):
    """line with what would break the log's one line per line escaped: control characters (a
    newline in a folder's name) and bytes of a name that are not UTF-8."""
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x1f\x7f]", lambda char: repr(char.group())[1:-1], line)


def saved_epochs(last):
    """(epochs saved in a last.pt, epochs of its run), or None where there is none to read."""
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        return int(state["epoch"]), int(state["args"]["epochs"])
    except Exception:  # no file, or not one to resume from: nothing saved
        return None


def resume_command(last):
    """The command that continues the run, as it can be pasted into a shell in any folder."""
    script = sys.argv[0] if os.path.isfile(sys.argv[0]) else __file__
    return shlex.join([sys.executable, os.path.abspath(script), "--resume",
                       os.path.abspath(last)])


if __name__ == "__main__":
    STOP.exit(main())
