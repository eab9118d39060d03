"""Scratch check of sharpness-aware minimisation (SAM, Foret et al. 2021): the script's own main(), with each SGD step
taken with the gradient at w + rho * g / ||g|| (g: the batch's gradient at w) instead of at w. That costs a second
forward and backward pass on the same batch; the BatchNorm running statistics are not updated by it.
Usage, from the repo root:
    python results/tuning/sam_check.py 0.05 --data-dir ../shared/cifar10-jpeg --val 5000 --out DIR
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp

rho = float(sys.argv[1])
batch = {}  # the training step's model, input, targets, criterion and cfg, read by SAMSGD.step


class SAMSGD(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        shifts = [p.grad * (rho / (norm + 1e-12)) for p in params]
        torch._foreach_add_(params, shifts)
        model, bns = batch["model"], [m for m in batch["model"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.momentum = 0.0  # running statistics stay as the first pass left them
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), exp.autocast(batch["cfg"][0], batch["cfg"][1]):
            loss = batch["criterion"](model(batch["x"]), batch["y"])
        loss.backward()
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        torch._foreach_sub_(params, shifts)
        return super().step()


def make_optimizer(model, args):
    plain = make_optimizer_plain(model, args)
    return SAMSGD(plain.param_groups, lr=args.lr, momentum=exp.MAX_MOMENTUM, nesterov=True)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, cfg, *rest, **kw):
    def recording_criterion(out, y):
        batch["y"] = y
        return criterion(out, y)
    batch.update(model=model, criterion=criterion, cfg=cfg)
    hook = model.register_forward_pre_hook(lambda m, inputs: batch.__setitem__("x", inputs[0]) if m.training else None)
    try:
        return train_one_epoch_plain(model, loader, optimizer, scheduler, scaler, recording_criterion, cfg, *rest, **kw)
    finally:
        hook.remove()


make_optimizer_plain, train_one_epoch_plain = exp.make_optimizer, exp.train_one_epoch
exp.make_optimizer, exp.train_one_epoch = make_optimizer, train_one_epoch
print(f"sam_check: SAM with rho {rho}")
exp.main(sys.argv[2:])
