"""Scratch check of the Affine rotation range (the script has no flag for it): the script's own main(), with
train_transform's Affine rotating by at most ROTATE degrees instead of 15. Usage, from the repo root:
    python results/tuning/rotate_check.py ROTATE --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import sys
from pathlib import Path
import albumentations as A
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

rotate, original = float(sys.argv[1]), exp.train_transform


def train_transform(*args, **kwargs):
    transform = original(*args, **kwargs)
    affine = next(t for t in transform.transforms if isinstance(t, A.Affine))
    affine.rotate = (-rotate, rotate)  # Affine draws its angle from this range on every call
    return transform


exp.train_transform = train_transform
exp.main(sys.argv[2:])
