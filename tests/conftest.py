"""Shared pytest set-up: CUDA-marked tests are skipped on machines without a GPU; the helpers every test
file means the same by (`assert_close`, `run_main`, `expect_error`, `raw_label`: `from conftest import
...`) and the fixtures that several test files use (generated datasets, a small checkpoint in train.py's
format), and one rule for every test: it leaves no child process behind."""
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
from tools import datasets
from model import OTSeg, trainable_parameters


def assert_close(actual, expected, atol: float = 0.0, rtol: float = 0.0, what: str = "",
                 equal_nan: bool = False) -> None:
    """Pass when the largest difference is at most atol + rtol * (largest |expected|); the failure says both.

    One yardstick for every test: rtol is relative to the largest entry of the reference (so a plan
    whose entries are all about 1/(M N) is compared at its own scale), atol absolute. equal_nan: NaNs
    must stand at the same places in both, and the other entries are compared.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if equal_nan:
        assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN at other places"
        actual, expected = actual[~expected.isnan()], expected[~expected.isnan()]
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * scale
    assert diff <= bound, f"{what}: largest difference {diff:.3e} > {bound:.3e} (largest |expected| {scale:.3e})"


def files_under(folder) -> dict[str, tuple[int, int]]:
    """{path: (size, modification time)} of every file and folder below `folder`."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


def run_main(program, *argv) -> None:
    """A program's main in this process, as its command line runs it. program: a module with
    get_args_parser() and main(args) (train, evaluate); argv: values of any type, passed as strings."""
    program.main(program.get_args_parser().parse_args([str(a) for a in argv]))


def expect_error(program, match: str | tuple[str, ...], *argv, unchanged=None) -> str:
    """run_main(program, *argv) stops with one line `error: ...` holding match (every part of a tuple), a
    non-zero exit; nothing below the folder `unchanged` is written, removed or changed. Returns the line."""
    before = files_under(unchanged) if unchanged is not None else None
    with pytest.raises(SystemExit) as stop:
        run_main(program, *argv)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert all(part in message for part in ((match,) if isinstance(match, str) else match)), message
    if before is not None:
        assert files_under(unchanged) == before, "a file was written"
    return message


def raw_label(path) -> np.ndarray:
    """The values stored in a label PNG, int64 (H, W)."""
    return np.asarray(Image.open(path)).astype(np.int64)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """What Python's exit does to the child processes a test leaves (a DataLoader worker whose loader is
    still held by a caught exception): SIGTERM, then wait. One that outlives SIGTERM (a worker that
    ignores it, as train.py's do) would keep the whole test run from ever ending: it is killed here and
    the test fails, by name."""
    yield
    left = multiprocessing.active_children()
    for process in left:
        process.terminate()
    stuck = []
    for process in left:
        process.join(timeout=10)
        if process.is_alive():
            stuck.append(process)
            process.kill()
            process.join()
    assert not stuck, f"the test left {len(stuck)} child process(es) that SIGTERM does not end: {stuck}"


def pytest_sessionfinish(session, exitstatus):
    """The last guard of the run's end: a child process still alive now (one a module's fixture left,
    which no test's check above saw) is killed, since Python's exit would wait for it."""
    for process in multiprocessing.active_children():
        process.kill()
        process.join()


@pytest.fixture(scope="module")
def one_thread():
    """The transforms run in DataLoader workers, which use one thread each; so do the data tests (on a busy
    2-core machine two threads make the per-pixel HSV work ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_voc(tmp_path):
    """A fresh tiny VOC that a test may break."""
    return datasets.make_fake_dataset("voc", str(tmp_path), num_train=2, num_val=1, size=(32, 48))


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory):
    """Every dataset of data.py generated in its real on-disk layout: {name: root}."""
    base = tmp_path_factory.mktemp("fake")
    return {name: datasets.make_fake_dataset(name, str(base), seed=i) for i, name in enumerate(data.DATASETS)}


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory):
    """make(prompt_tokens, num_templates, random_head) -> (path, model): a random-tiny OTSeg saved in
    train.py's checkpoint format, VOC inductive at 64 px. random_head draws the trained weights from
    N(0, 1), far from any initialisation, so that a loading mistake cannot go unseen."""
    def make(prompt_tokens: int = 4, num_templates: int = 3, random_head: bool = False):
        torch.manual_seed(0)
        preset = data.get_preset("voc", 64)
        clip_model = checkpoint.build_clip("random-tiny", prompt_tokens, 64, torch.device("cpu"))
        model = OTSeg(clip_model, preset["templates"][:num_templates]).eval()
        if random_head:
            for _, p in trainable_parameters(model):
                p.data.normal_()
        ckpt = checkpoint.make_checkpoint(
            checkpoint.trainable_state_dict(model), checkpoint.describe_clip(clip_model, "random-tiny"),
            model.templates, "sinkhorn", "voc", "inductive", preset["classes"], preset["unseen"], 64,
            dict(crop=[64, 64], stride=[40, 40]), step=0, args={}, schedule={})
        path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
        checkpoint.save(ckpt, str(path))
        return str(path), model
    return make
