"""Scratch check of the momentum schedule: the script's own main(), with torch's OneCycleLR told not to cycle the
momentum (by default it swings it 0.95 -> 0.85 -> 0.95 against the LR and overrides --momentum), so that the
script's --momentum holds for the whole run. Usage, from the repo root:
    python results/tuning/momentum_check.py --momentum 0.9 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import functools
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

torch.optim.lr_scheduler.OneCycleLR = functools.partial(torch.optim.lr_scheduler.OneCycleLR, cycle_momentum=False)
print("momentum_check: OneCycleLR(cycle_momentum=False)")
exp.main(sys.argv[1:])
