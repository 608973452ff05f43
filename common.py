"""common.py -- what every program of the project shares: processes, printing, mixed precision, data-loading
workers under stop signals, saving.

train.py, evaluate.py and the benchmarks run as one process (`python train.py ...`) or as many under
torchrun (`torchrun --nproc_per_node 4 train.py ...`). torchrun tells each process who it is through
environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); this file reads them,
joins the process group (NCCL on CUDA GPUs, gloo on the CPU so that two processes can run on a
laptop), and leaves it again. Multi-node runs are the same programs with torchrun's own flags.

Nothing here is specific to OTSeg; a reader copying a chapter does not need it.
"""
import inspect
import os
import signal
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist


def print0(*args, **kwargs):
    """print on the first process only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def init_process_group_kwargs(backend: str, device: torch.device) -> dict:
    """Arguments of dist.init_process_group for this torch version and this launch.

    `device_id` (bind the NCCL communicator to this process's GPU at once, instead of guessing it at
    the first collective) exists from torch 2.3 on; requirements.txt allows torch 2.1, whose
    init_process_group has no such argument, so it is passed only where the signature has it.
    Under torchrun the group's keys go to `attempt_store` (below) where torchrun's own store needs it.
    """
    kwargs = dict(backend=backend)
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device
    store = attempt_store()
    if store is not None:
        kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return kwargs


def attempt_store() -> dist.Store | None:
    """torchrun's key-value store seen through a prefix of this attempt, where torchrun needs one; else None.

    torchrun --max-restarts N restarts every worker when one fails. From torch 2.4 on, the workers'
    process group keeps its keys (each process's address, among them) in the launcher's own store,
    which outlives a restart (TORCHELASTIC_USE_AGENT_STORE=True), and torch reuses the same key names
    at every attempt. A restarted worker may then read its peer's address of the attempt before and
    fail ("Connection refused") or wait forever (pytorch issues 135712 and 167288). Putting the keys
    under the restart count gives each attempt keys of its own. On one node every worker of an attempt
    sees the same count; across nodes each launcher counts its own restarts, so there this is left to
    torch (README: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for multi-node restarts).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timedelta(minutes=30))  # init_process_group's default
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """-> (rank, world size, device) from torchrun's environment variables; NCCL on CUDA, gloo on CPU.

    Plain `python train.py` (or evaluate.py) is rank 0 of 1 with no process group. With
    `--device cuda:N` that GPU becomes the current device, as LOCAL_RANK's does under torchrun: what
    follows without a device index (the CUDA random state a checkpoint saves and restores, peak
    memory) is then this GPU's, not GPU 0's.
    """
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(**init_process_group_kwargs("nccl", device))
    else:
        device = torch.device("cpu")
        dist.init_process_group(**init_process_group_kwargs("gloo", device))
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """Leave the process group at the end of a program (nothing to do without one).

    Not a bare destroy_process_group: on torch before 2.8 it can hang forever at exit, because it
    holds the interpreter lock while it waits for gloo's background threads, and one of them may
    still be freeing the tensors of the last collective (here the random states that
    all_gather_object gathered for the checkpoint), which needs that lock. Fixed in torch 2.8
    (pytorch PR 154976). Neither a plain barrier nor another collective before destroying helps;
    waiting on an asynchronous barrier, destroying the group, and only then dropping the barrier's
    work handle does (tests/test_common.py repeats it).
    """
    if not dist.is_initialized():
        return
    work = dist.barrier(async_op=True)
    work.wait()
    dist.destroy_process_group()
    del work  # only after the group is gone (see above)


# SIGTERM (what a scheduler sends every process of a job before it preempts it) and ^C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader's worker_init_fn: data-loading workers leave SIGTERM and ^C to the process they
    serve. A scheduler signals every process of a job; a worker killed by it would end the training
    process's last step and final save (train.py's StopSignal), or the evaluation in progress, with
    "DataLoader worker is killed by signal". A worker whose main process has gone ends by itself
    (torch's watchdog looks every 5 s)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def stop_workers(batches) -> None:
    """End a DataLoader iterator's workers now (nothing with 0 workers), in a `finally` of the loop.

    Workers that ignore SIGTERM must not outlive the loop: where the loop's exception is still held (a
    notebook, a test, or a program's own `except ... as error` that keeps the traceback in a reference
    cycle), Python's exit ends leftover workers with SIGTERM and then waits for them, for ever.
    `_shutdown_workers` is torch's own clean shutdown, the one it runs when the iterator is freed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked, else nothing; Sinkhorn runs in fp32 inside it (sinkhorn.py)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def atomic_save(path: str):
    """Yields a temporary path beside `path` to write the file to; renamed to `path` once written.

        with atomic_save("runs/ckpt.pt") as tmp:
            torch.save(ckpt, tmp)

    A crash, an interrupt or a full disk never leaves half a file at `path`, nor the temporary file.
    The temporary name keeps the extension (PIL reads the format from it) and holds the process id, so
    that processes writing the same file never share one.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
