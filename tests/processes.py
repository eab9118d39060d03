"""The script as a process of its own, for the tests where the process is the point: signals sent
to its process group, workers, a closed terminal, the process's exit.

Each process is forked from a server that has imported the script, torch's compiler (which the
first optimizer imports) and matplotlib once: multiprocessing's forkserver. It starts in
milliseconds instead of the ~10 s a fresh interpreter takes here, and then runs as `python
experiment2_cifar_cnn.py ARGS` does: a session and process group of its own, the stop handler
taken first, `fork` as its workers' start method, the process ended by the script's own exit.
What happens before the script is imported (its first seconds) is tested in a fresh interpreter
(test_signals.py)."""
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiment2_cifar_cnn.py"
sys.path.insert(0, str(ROOT))
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

import torch._dynamo  # noqa: E402, F401

import experiment2_cifar_cnn as exp  # noqa: E402

exp.pyplot()

SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload([__name__])
# the server finds this module through PYTHONPATH (it is started with none of this sys.path)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(Path(__file__).parent), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


class Aim(NamedTuple):
    """Where a signal is sent from: the function `target` ("module:attribute") is wrapped to send
    it at its nth call, before the call."""
    target: str
    sig: int = signal.SIGTERM
    nth: int = 1
    how: str = "group"  # "group": to the whole process group; "twice-group": two to the group,
    # one after the other; "twice": two to the process 0.2 s apart inside one C call, where the
    # handler runs once for both; "process": to the process alone


class Ended(NamedTuple):
    status: int
    out: str
    err: str


def aimed(real, aim):
    calls = 0

    def call(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == aim.nth:
            if aim.how == "twice":  # system() waits in C while the shell sends both
                pid = os.getpid()
                os.system(f"kill -{aim.sig} {pid}; sleep 0.2; kill -{aim.sig} {pid}")
            elif aim.how == "process":
                os.kill(os.getpid(), aim.sig)
            else:
                for _ in range(2 if aim.how == "twice-group" else 1):
                    os.killpg(os.getpgrp(), aim.sig)
        return real(*args, **kwargs)
    return call


PLOTS = ("plot_augmentations", "plot_curves", "plot_confusion", "plot_misclassified")


def blank_figure(*args):
    """What the tests draw instead of a picture, which takes seconds here: it is written through
    the same code, at the same moments. The real pictures are tested in test_augment.py and on
    the session's finished run."""
    return exp.pyplot().figure(figsize=(1, 1))


def script_process(argv, out, err, aim, nohup, cwd):
    """What the forked process runs."""
    os.setsid()
    os.chdir(cwd)
    multiprocessing.set_start_method("fork", force=True)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [str(SCRIPT), *argv]
    signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)
    for name in PLOTS:
        setattr(exp, name, blank_figure)
    if aim:
        module, attribute = aim.target.split(":")
        owner = sys.modules[module] if module in sys.modules else __import__(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, aimed(getattr(owner, name), aim))
    exp.STOP.start()  # as the script's first lines do
    exp.STOP.exit(exp.main(argv))


def start(argv, folder, aim=None, nohup=False, stdout=None, cwd=None):
    """Starts the script with argv in cwd; its output goes to files in folder (stdout: another
    path, such as a FIFO)."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err = stdout or folder / "stdout.txt", folder / "stderr.txt"
    process = SERVER.Process(target=script_process, args=(
        [str(a) for a in argv], str(out), str(err), aim, nohup, str(cwd or os.getcwd())))
    process.start()
    process.files = (out, err)
    return process


def finish(process, timeout=120):
    """Waits for the process, then for every process of its group (its workers) to end."""
    process.join(timeout)
    if process.exitcode is None:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the script ran past {timeout} s: killed")
    deadline = time.monotonic() + 30
    while group_alive(process.pid):
        if time.monotonic() > deadline:
            raise AssertionError("processes of the script's group are still running")
        time.sleep(0.05)
    out, err = (Path(path).read_text() if Path(path).is_file() else "" for path in process.files)
    return Ended(process.exitcode, out, err)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def run(argv, folder, aim=None, nohup=False, cwd=None):
    return finish(start(argv, folder, aim, nohup, cwd=cwd))
