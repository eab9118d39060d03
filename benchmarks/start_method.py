"""Seconds per epoch with DataLoader workers started by fork (Linux's default) and by spawn (the
default on macOS and Windows, where every new worker process is sent the whole dataset).

    python benchmarks/start_method.py --data-dir PATH/TO/COPY
    python benchmarks/start_method.py --data-dir PATH/TO/COPY --script OLD/experiment2_cifar_cnn.py

Trains 3 epochs on 10,000 images with 2 workers once per start method and prints the mean time
per epoch of each, as the run's own Done line gives it. --script times another version of the
script (for example one taken from the repository's history).
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import multiprocessing, sys
multiprocessing.set_start_method({method!r})
sys.path.insert(0, {folder!r})
import {module} as script
script.main({args!r})
"""


def seconds_per_epoch(script, method, data_dir, out):
    args = ["--data-dir", str(data_dir), "--limit", "10000", "--epochs", "3", "--workers", "2",
            "--out", str(out)]
    code = RUN.format(method=method, folder=str(script.parent), module=script.stem, args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) s per epoch", done.stdout).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--script", type=Path,
                        default=Path(__file__).resolve().parents[1] / "experiment2_cifar_cnn.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fork", "spawn"):
            s = seconds_per_epoch(args.script.resolve(), method, args.data_dir.resolve(),
                                  Path(tmp) / method)
            print(f"{args.script.name}, 2 workers started by {method}: {s:.1f} s per epoch")


if __name__ == "__main__":
    main()
