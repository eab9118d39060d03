"""Scratch check behind the --ema default (run at commit 448a62b, before --ema existed; one torch thread):
the default training loop, built from the script's own functions, on the --val 5000 split, with EMAs of
the weights evaluated beside the raw weights after every epoch. Usage, from the repo root:
    OMP_NUM_THREADS=1 python results/tuning/ema_check.py SEED EPOCHS > results/tuning/val60-ema-seedSEED.txt
"""
import sys, copy, torch, torch.nn as nn
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import experiment2_cifar_cnn as exp
seed = int(sys.argv[1]); epochs = int(sys.argv[2]); decays = (0.99, 0.995, 0.998, 0.999)
args = exp.build_parser().parse_args(["--seed", str(seed), "--epochs", str(epochs), "--val", "5000"])
torch.manual_seed(args.seed)
model = exp.Net()
splits, _, _ = exp.load_cifar10("../shared/cifar10-jpeg", None, 5000)
dev = torch.device("cpu"); cfg = (dev, "bf16", True)
train_set = exp.AugmentedCIFAR10(*splits["train"], exp.train_transform(args.flip_p, args.affine_p, args.dropout_p))
val_loader = exp.make_loader(exp.AugmentedCIFAR10(*splits["val"], exp.test_transform()), 1000, False, 0, 0, dev)
model.to(memory_format=torch.channels_last)
opt = exp.make_optimizer(model, args)
spe = len(train_set) // args.batch_size
sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, epochs=epochs, steps_per_epoch=spe, pct_start=args.warmup)
emas = {d: copy.deepcopy(model) for d in decays}
class Shim:
    def step(self):
        sched.step()
        with torch.no_grad():
            for d, e in emas.items():
                for pe, pm in zip(e.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
                for be, bm in zip(e.buffers(), model.buffers()):
                    be.copy_(bm) if be.dtype == torch.long else be.lerp_(bm, 1 - d)
crit = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
scaler = torch.amp.GradScaler("cpu", enabled=False)
for epoch in range(1, epochs + 1):
    loader = exp.make_loader(train_set, args.batch_size, True, 0, args.seed * 1000 + epoch, dev)
    tl, ta = exp.train_one_epoch(model, loader, opt, Shim(), scaler, crit, cfg, epoch, 100, lambda l: None)
    raw = exp.evaluate(model, val_loader, cfg)[1]
    print(f"epoch {epoch} train {ta:.2f} raw {raw:.2f} " + " ".join(f"ema{d} {exp.evaluate(e, val_loader, cfg)[1]:.2f}" for d, e in emas.items()), flush=True)
