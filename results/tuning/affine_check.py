"""Scratch check of the Affine ranges (the script has flags for the probabilities, not the ranges): the script's
own main(), with train_transform's Affine changed by KEY=VALUE arguments given before the script's flags:
rotate=R (angle within +-R degrees, default 15), scale=S (factor within 1 +- S, default 0.1), shift=T (within
+-T of the size on each axis, default 0.1). Usage, from the repo root:
    python results/tuning/affine_check.py rotate=0 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import sys
from pathlib import Path
import albumentations as A
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

n_changes = next((i for i, arg in enumerate(sys.argv[1:]) if "=" not in arg), len(sys.argv) - 1)
changes = {key: float(value) for key, value in (arg.split("=") for arg in sys.argv[1:1 + n_changes])}
flags = sys.argv[1 + n_changes:]
original = exp.train_transform


def train_transform(*args, **kwargs):
    transform = original(*args, **kwargs)
    affine = next(t for t in transform.transforms if isinstance(t, A.Affine))
    # Affine draws its parameters from these ranges on every call
    if "rotate" in changes:
        affine.rotate = (-changes["rotate"], changes["rotate"])
    if "scale" in changes:
        affine.scale = {axis: (1 - changes["scale"], 1 + changes["scale"]) for axis in "xy"}
    if "shift" in changes:
        affine.translate_percent = {axis: (-changes["shift"], changes["shift"]) for axis in "xy"}
    return transform


exp.train_transform = train_transform
print(f"affine_check: {changes}")
exp.main(flags)
