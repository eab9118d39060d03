"""Scratch check of a whitening initialisation of conv1 (as in Keller Jordan's airbench): the script's own main(),
with conv1's 16 filters set, before training starts, to the top 8 eigenvectors of the covariance of 3x3 patches
of 10,000 normalised training images, each scaled by 1/sqrt(eigenvalue + 5e-4), and their negatives; bias 0.
conv1 stays trainable; every other layer keeps the script's initialisation. Usage, from the repo root:
    python results/tuning/whiten_check.py --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

train_images = []
original_load, original_optimizer = exp.load_cifar10, exp.make_optimizer


def load_cifar10(*args, **kwargs):
    splits, source, notes = original_load(*args, **kwargs)
    train_images.append(splits["train"][0])
    return splits, source, notes


@torch.no_grad()
def make_optimizer(model, args):
    x = torch.as_tensor(train_images[-1][:10000]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(exp.CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(exp.CIFAR10_STD).view(1, 3, 1, 1)
    patches = F.unfold(x, 3).transpose(1, 2).reshape(-1, 27).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    top = eigenvectors[:, -8:].flip(1).T / torch.sqrt(eigenvalues[-8:].flip(0) + 5e-4).unsqueeze(1)
    weight = torch.cat([top, -top]).reshape(16, 3, 3, 3).float()
    model.conv1.weight.copy_(weight.to(model.conv1.weight))
    model.conv1.bias.zero_()
    print(f"whiten_check: conv1 filter norms {weight.flatten(1).norm(dim=1)[:8].tolist()}")
    return original_optimizer(model, args)


exp.load_cifar10, exp.make_optimizer = load_cifar10, make_optimizer
exp.main(sys.argv[1:])
