"""Scratch check of the OneCycle shape: the script's own main() with torch's OneCycleLR told to move the LR (and the
momentum against it) along straight lines, up to the peak and down to ~0, instead of its default cosine halves.
Usage, from the repo root:
    python results/tuning/schedule_check.py --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import functools
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

torch.optim.lr_scheduler.OneCycleLR = functools.partial(torch.optim.lr_scheduler.OneCycleLR, anneal_strategy="linear")
print("schedule_check: OneCycleLR(anneal_strategy='linear')")
exp.main(sys.argv[1:])
