"""Scratch check of longer EMA horizons: the script's own main() (EMA 0.999 at the defaults), with EMAs of other
decays kept beside its own, updated by the same update_ema after every step and evaluated on the same split
after every epoch, so each is compared with the very same training run. Usage, from the repo root:
    python results/tuning/ema_decay_check.py 0.9995,0.9998 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import copy
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

decays = [float(d) for d in sys.argv[1].split(",")]
others = {}  # decay -> model, copied from the script's EMA model before its first update (both are the initial weights)
update_ema, evaluate = exp.update_ema, exp.evaluate


def update_all(ema_model, model, decay, step):
    if not others:
        others.update({d: copy.deepcopy(ema_model) for d in decays})
    for d, average in others.items():
        update_ema(average, model, d, step)
    update_ema(ema_model, model, decay, step)


def evaluate_all(model, loader, cfg):
    result = evaluate(model, loader, cfg)
    print("ema_decay_check: ema " + ", ".join([f"{d} {evaluate(m, loader, cfg)[1]:.2f}" for d, m in others.items()]
                                              + [f"script's own {result[1]:.2f}"]), flush=True)
    return result


exp.update_ema, exp.evaluate = update_all, evaluate_all
print(f"ema_decay_check: extra EMA decays {decays}")
exp.main(sys.argv[2:])
