"""Scratch check, after the fact: the final weights (current and EMA) of two finished 60-epoch validation runs
evaluated as saved, and again with their BatchNorm statistics re-estimated over 200 batches of 128 training images
(without and with the training augmentation). Usage, from the repo root:
    python results/tuning/precise_bn_check.py RUN_DIR [RUN_DIR ...]
"""
import copy
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

torch.set_num_threads(2)
splits, _, _ = exp.load_cifar10("../shared/cifar10-jpeg", val=5000)
cpu = torch.device("cpu")
cfg = (cpu, "bf16", True)  # as the validation runs evaluated
val_loader = exp.make_loader(exp.AugmentedCIFAR10(*splits["val"], exp.test_transform()), 1000, False, 0, 0, cpu)


def reestimate_bn(model, transform, batches=200, batch_size=128):
    loader = exp.make_loader(exp.AugmentedCIFAR10(*splits["train"], transform), batch_size, True, 0, 123, cpu)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches seen
    model.train()
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i == batches:
                break
            with exp.autocast(cpu, "bf16"):
                model(exp.to_device(x, y, cpu, True)[0])


for run in sys.argv[1:]:
    state = torch.load(f"{run}/last.pt", weights_only=True)
    result = {}
    for key in ("model", "ema"):
        model = exp.Net()
        model.load_state_dict(state[key])
        model.to(memory_format=torch.channels_last)
        result[key] = exp.evaluate(model, val_loader, cfg)[1]
        for name, transform in (("clean", exp.test_transform()), ("aug", exp.train_transform())):
            reestimated = copy.deepcopy(model)
            reestimate_bn(reestimated, transform)
            result[f"{key}+bn-{name}"] = exp.evaluate(reestimated, val_loader, cfg)[1]
    print(run, {k: round(v, 2) for k, v in result.items()}, flush=True)
