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
import experiment2_cifar_cnn as E
torch.set_num_threads(2)
splits, _, _ = E.load_cifar10('../shared/cifar10-jpeg', val=5000)
dev = torch.device('cpu'); cfg = (dev, 'bf16', True)
val = E.AugmentedCIFAR10(*splits['val'], E.test_transform())
vl = E.make_loader(val, 1000, False, 0, 0, dev)
def recompute(model, tf, n_batches=200, bs=128):
    ds = E.AugmentedCIFAR10(*splits['train'], tf)
    ld = E.make_loader(ds, bs, True, 0, 123, dev)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d): m.reset_running_stats(); m.momentum = None
    model.train()
    with torch.no_grad():
        for i, (x, y) in enumerate(ld):
            if i == n_batches: break
            x, _ = E.to_device(x, y, dev, True)
            with E.autocast(dev, 'bf16'): model(x)
for run in sys.argv[1:]:
    s = torch.load(f'{run}/last.pt', weights_only=True)
    res = {}
    for key in ('model', 'ema'):
        m = E.Net(); m.load_state_dict(s[key]); m.to(memory_format=torch.channels_last)
        res[key] = E.evaluate(m, vl, cfg)[1]
        for name, tf in (('clean', E.test_transform()), ('aug', E.train_transform())):
            m2 = copy.deepcopy(m); recompute(m2, tf)
            res[f'{key}+bn-{name}'] = E.evaluate(m2, vl, cfg)[1]
    print(run, {k: round(v, 2) for k, v in res.items()}, flush=True)
