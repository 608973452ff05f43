"""common.py: the arguments of init_process_group on every torch version the requirements allow, and a
teardown of the process group that never hangs.

Run as a script, this file is the teardown's stress test on its own (two gloo processes, CYCLES times:
join, all_gather_object of a dict of tensors, leave), e.g. to compare with a bare destroy:
    python tests/test_common.py 30            # common.close_distributed
    python tests/test_common.py 30 --plain    # dist.destroy_process_group() alone
"""
import inspect
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # as a script (the test runner's pythonpath does this for the tests)
import common  # noqa: E402


# ----------------------------------------------------------------------------------------------
# init_process_group's arguments
# ----------------------------------------------------------------------------------------------

def test_init_arguments_fit_the_installed_signature():
    """Whatever this torch is, the arguments bind to its init_process_group (a TypeError otherwise)."""
    signature = inspect.signature(dist.init_process_group)
    for backend, device in (("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))):
        kwargs = common.init_process_group_kwargs(backend, device)
        signature.bind(**kwargs)
        assert kwargs["backend"] == backend
        has_device_id = "device_id" in signature.parameters
        assert ("device_id" in kwargs) == (has_device_id and backend == "nccl"), kwargs
        if "device_id" in kwargs:
            assert kwargs["device_id"] == device


def test_init_arguments_on_torch_2_1(monkeypatch):
    """torch 2.1's init_process_group (copied signature: no device_id) gets no device_id."""
    def init_process_group_2_1(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1,
                               store=None, group_name="", pg_options=None):
        pass

    monkeypatch.setattr(dist, "init_process_group", init_process_group_2_1)
    kwargs = common.init_process_group_kwargs("nccl", torch.device("cuda", 0))
    assert kwargs == dict(backend="nccl")
    inspect.signature(init_process_group_2_1).bind(**kwargs)


def test_each_torchrun_attempt_on_one_node_has_keys_of_its_own(monkeypatch):
    """Where torchrun's store outlives a restart (TORCHELASTIC_USE_AGENT_STORE, torch >= 2.4), each attempt
    on one node reads and writes the group's keys under a prefix of its own, in a real TCPStore; without
    that store, or across nodes, the arguments leave the store to torch."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # stands for torchrun's
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port), RANK="1", WORLD_SIZE="2",
                            GROUP_WORLD_SIZE="1", TORCHELASTIC_USE_AGENT_STORE="True",
                            TORCHELASTIC_RESTART_COUNT="0").items():
        monkeypatch.setenv(name, value)
    first = common.init_process_group_kwargs("gloo", torch.device("cpu"))
    inspect.signature(dist.init_process_group).bind(**first)
    assert (first["rank"], first["world_size"]) == (1, 2)
    first["store"].set("address_of_rank_1", "before the restart")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = common.init_process_group_kwargs("gloo", torch.device("cpu"))
    second["store"].set("address_of_rank_1", "after the restart")
    assert first["store"].get("address_of_rank_1") == b"before the restart"
    assert second["store"].get("address_of_rank_1") == b"after the restart"  # not the stale one
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "False"), ("GROUP_WORLD_SIZE", "2")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert common.init_process_group_kwargs("gloo", torch.device("cpu")) == dict(backend="gloo")


@pytest.mark.parametrize("torch_version", ["installed", "2.1"])
def test_setup_on_gpus_binds_each_process_to_its_gpu(torch_version, monkeypatch):
    """torchrun's variables for the second process of a node -> cuda:1, set as the current device, and
    an init_process_group call that this torch's signature (or torch 2.1's) accepts. No GPU needed."""
    real = inspect.signature(dist.init_process_group)
    if torch_version == "2.1":
        def signature_2_1(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1,
                          store=None, group_name="", pg_options=None):
            pass
        real = inspect.signature(signature_2_1)
    calls = []
    init = lambda *args, **kwargs: calls.append(real.bind(*args, **kwargs).arguments)  # noqa: E731
    init.__signature__ = real  # what init_process_group_kwargs inspects
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert common.setup_distributed("cuda") == (1, 2, torch.device("cuda", 1))
    assert calls[0] == ("set_device", torch.device("cuda", 1))  # before the group: NCCL uses it
    expected = dict(backend="nccl")
    if "device_id" in real.parameters:
        expected["device_id"] = torch.device("cuda", 1)
    assert calls[1] == expected


def test_one_process_on_another_gpu_makes_it_the_current_device(monkeypatch):
    """`--device cuda:1` without torchrun: GPU 1 becomes current, so that what reads the current device
    (the CUDA random state of a checkpoint, peak memory) reads GPU 1, not GPU 0. No GPU needed."""
    monkeypatch.delenv("RANK", raising=False)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    assert common.setup_distributed("cuda:1") == (0, 1, torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
    calls.clear()
    assert common.setup_distributed("cuda") == (0, 1, torch.device("cuda"))  # no index: the current one stays
    assert calls == []


def test_setup_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert common.setup_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert not dist.is_initialized()
    common.close_distributed()  # nothing to leave: no error


# ----------------------------------------------------------------------------------------------
# Leaving the process group: torch < 2.8 could hang in destroy_process_group (see close_distributed)
# ----------------------------------------------------------------------------------------------

def exit_cycles(rank: int, cycles: int, port: int, plain: bool) -> None:
    """One of two processes: join, gather random states as train.py's checkpoints do, leave; repeat."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)  # the launcher's; a fresh prefix per cycle
    for cycle in range(cycles):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"cycle{cycle}", store), rank=rank, world_size=2)
        states = [None, None]
        dist.all_gather_object(states, dict(torch=torch.get_rng_state(), numbers=torch.arange(1000 + rank),
                                            more=[torch.randn(64), torch.zeros(3, dtype=torch.int64)]))
        assert states[1 - rank]["numbers"].numel() == 1001 - rank
        if plain:
            dist.destroy_process_group()
        else:
            common.close_distributed()
        if rank == 0:
            print(f"cycle {cycle + 1} of {cycles} left", flush=True)


def run_exit_cycles(cycles: int, plain: bool = False, timeout: float = 120.0) -> tuple[bool, str, float]:
    """-> (finished, output, seconds): the two processes in a session of their own, killed on timeout."""
    command = [sys.executable, os.path.abspath(__file__), str(cycles)] + (["--plain"] if plain else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode == 0, output, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
        output, _ = process.communicate()
        return False, output, time.perf_counter() - start


def test_leaving_the_process_group_never_hangs():
    """50 cycles (the hang showed within 15 two-process runs on torch 2.1.2) under one timeout."""
    finished, output, seconds = run_exit_cycles(50)
    last = output.strip().splitlines()[-1:] or ["(no output)"]
    assert finished, f"hung or failed after {seconds:.0f} s; last line: {last[0]}\n{output[-2000:]}"
    assert "cycle 50 of 50 left" in output


if __name__ == "__main__":
    cycles, plain = int(sys.argv[1]), "--plain" in sys.argv
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: any free port
    start = time.perf_counter()
    mp.start_processes(exit_cycles, args=(cycles, server.port, plain), nprocs=2, start_method="spawn")
    print(f"{cycles} cycles in {time.perf_counter() - start:.1f} s "
          f"({'destroy_process_group' if plain else 'close_distributed'}, torch {torch.__version__})")
