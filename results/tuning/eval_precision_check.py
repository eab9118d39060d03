"""Scratch check: the validation accuracy of finished --val 5000 runs' EMA weights, evaluated under bf16 autocast
(as the script does on a CPU with native bf16) and in fp32. Usage, from the repo root:
    python results/tuning/eval_precision_check.py RUN/last.pt [RUN/last.pt ...]
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

cpu = torch.device("cpu")
splits, _, _ = exp.load_cifar10("../shared/cifar10-jpeg", val=5000)
val_set = exp.AugmentedCIFAR10(*splits["val"], exp.test_transform())
for checkpoint in sys.argv[1:]:
    model = exp.Net()
    exp.load_checkpoint(Path(checkpoint), model, weights="ema")
    model.to(memory_format=torch.channels_last)
    accuracy = {precision: exp.evaluate(model, exp.make_loader(val_set, 1000, False, 0, 0, cpu), (cpu, precision, True))[1]
                for precision in ("bf16", "fp32")}
    print(checkpoint, ", ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
