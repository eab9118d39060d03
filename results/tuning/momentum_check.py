"""Scratch check of the momentum: the script's own main() with another momentum, given first. M holds the Nesterov
momentum at M (torch's OneCycleLR is told not to cycle it; the script has it swing 0.95 -> 0.85 -> 0.95 against
the LR); LOW-HIGH keeps the cycle with those bounds. Usage, from the repo root:
    python results/tuning/momentum_check.py 0.9 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
    python results/tuning/momentum_check.py 0.85-0.98 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
The committed val60-ema-momentum0.9 logs were made when the script still had a --momentum flag (which OneCycleLR
overrode, so it did nothing) and this wrapper took the value from it: their config line shows momentum=0.9.
"""
import functools
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

low, _, high = sys.argv[1].partition("-")
if high:
    exp.MIN_MOMENTUM, exp.MAX_MOMENTUM = float(low), float(high)  # read by make_optimizer and make_scheduler at call time
else:
    exp.MAX_MOMENTUM = float(low)  # what make_optimizer gives SGD, and with no cycle it stays
    torch.optim.lr_scheduler.OneCycleLR = functools.partial(torch.optim.lr_scheduler.OneCycleLR, cycle_momentum=False)
print(f"momentum_check: {'cycle' if high else 'constant'} {sys.argv[1]}")
exp.main(sys.argv[2:])
