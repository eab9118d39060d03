"""Scratch check of a constant momentum: the script's own main(), with torch's OneCycleLR told not to cycle the
momentum (the script has it swing 0.95 -> 0.85 -> 0.95 against the LR) and the Nesterov momentum held at M,
given first. Usage, from the repo root:
    python results/tuning/momentum_check.py 0.9 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
The committed val60-ema-momentum0.9 logs were made when the script still had a --momentum flag (which OneCycleLR
overrode, so it did nothing) and this wrapper took the value from it: their config line shows momentum=0.9.
"""
import functools
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

exp.MAX_MOMENTUM = float(sys.argv[1])  # what make_optimizer gives SGD, and with no cycle it stays
torch.optim.lr_scheduler.OneCycleLR = functools.partial(torch.optim.lr_scheduler.OneCycleLR, cycle_momentum=False)
print(f"momentum_check: OneCycleLR(cycle_momentum=False), momentum {exp.MAX_MOMENTUM}")
exp.main(sys.argv[2:])
