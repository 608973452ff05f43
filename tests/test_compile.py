"""Tests of the sync-free Sinkhorn (sinkhorn.py, `sync_free=True`) where it matters: under torch.compile
(one graph, forward and backward, on a CPU with the non-generating backends) and on the host (no
operator that makes the CPU wait for the device). Its numbers against the eager loop: test_sinkhorn.py."""
import collections

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from clip import CLIP, TINY
from conftest import assert_close
from losses import count_masks, otseg_loss
from model import OTSeg, trainable_parameters
from sinkhorn import CHECK_EVERY, sinkhorn_log, sinkhorn_log_block, sinkhorn_naive

aten = torch.ops.aten
# Operators after which the host must wait for the device: a value read on the host (item(), bool(),
# float(), tolist()), and outputs whose size is data (nonzero and boolean-mask indexing).
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class HostReads(TorchDispatchMode):
    """Counts every operator that dispatches, and those of HOST_READS by name (on a CPU they run
    without the wait, but they are the same operators)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        boolean_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in HOST_READS or boolean_index:
            self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


def cost_matrix(batch=3, m=20, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.nn.functional.normalize(torch.randn(batch, m, 16, generator=g), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(batch, n, 16, generator=g), dim=-1)
    return 1 - pixels @ prompts.transpose(1, 2)  # (batch, M, N)


@pytest.fixture(scope="module")
def tiny_model():
    """A random-tiny OTSeg (2 templates, 10 Sinkhorn iterations: two blocks, so the freeze runs), with
    its text embeddings for 3 classes computed outside any compiled region, as OTSeg.forward does."""
    torch.manual_seed(0)
    model = OTSeg(CLIP(**TINY, prompt_tokens=4), ["a photo of a {}.", "a part of a {}."], n_iters=10,
                  sync_free=True)
    return model, model.text_embeddings(["cat", "dog", "sky"])  # (K, N, C)


# ----------------------------------------------------------------------------------------------
# torch.compile: one graph
# ----------------------------------------------------------------------------------------------

def test_block_of_iterations_compiles_as_one_graph():
    # fullgraph=True raises at the first graph break; the "eager" backend checks the capture only
    # (no code generation), so this stays fast on a CPU.
    cost = cost_matrix()
    log_mu, log_nu = torch.full((3, 1, 20), 1 / 20).log(), torch.full((3, 4, 1), 1 / 4).log()
    args = (log_mu, log_nu, (-cost / 0.05).mT.contiguous(), CHECK_EVERY)  # the block's layout, (..., N, M)
    torch._dynamo.reset()
    compiled = torch.compile(sinkhorn_log_block, fullgraph=True, backend="eager")(*args)
    for name, got, expected in zip(("log-plan", "err"), compiled, sinkhorn_log_block(*args)):
        assert_close(got, expected, what=f"compiled block, {name}")
    # the block is the loop's work: CHECK_EVERY of its iterations are sinkhorn_log's first CHECK_EVERY
    log_plan, _ = sinkhorn_log_block(*args)
    assert_close(torch.exp(log_plan).mT, sinkhorn_log(cost, 0.05, n_iters=CHECK_EVERY, tol=0),
                 what="block vs sinkhorn_log")


@pytest.mark.parametrize("solver", [sinkhorn_naive, sinkhorn_log])
def test_only_the_sync_free_loop_is_one_graph(solver):
    """The eager loop breaks the graph at each convergence test it reads; the sync-free one does not,
    and its compiled plan is the eager loop's."""
    cost = cost_matrix()
    torch._dynamo.reset()
    eager = torch._dynamo.explain(solver)(cost, 0.05, n_iters=20)
    assert eager.graph_break_count > 0  # what sync_free removes: one break per test read
    torch._dynamo.reset()
    free = torch._dynamo.explain(solver)(cost, 0.05, n_iters=20, sync_free=True)
    assert (free.graph_count, free.graph_break_count) == (1, 0), [str(b.reason) for b in free.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(solver, fullgraph=True, backend="eager")(cost, 0.05, n_iters=20, sync_free=True)
    assert_close(compiled, solver(cost, 0.05, n_iters=20), 
                 what=f"compiled sync-free {solver.__name__} vs eager")


@pytest.mark.parametrize("implicit_grad", [False, True])
def test_sync_free_sinkhorn_backward_compiles_with_the_forward(implicit_grad):
    # aot_eager traces the backward as a graph too (AOTAutograd), without generating code; the
    # implicit gradient's autograd.Function must be traceable for fullgraph to pass.
    cost = cost_matrix().double().requires_grad_()
    weights = torch.randn(3, 20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(c):
        plan = sinkhorn_log(c, 0.05, n_iters=20, implicit_grad=implicit_grad, sync_free=True)  # (3, M, N)
        return (plan * weights).sum()

    torch._dynamo.reset()
    grad_compiled, = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(cost), cost)
    grad_eager, = torch.autograd.grad(loss(cost), cost)
    assert_close(grad_compiled, grad_eager, rtol=1e-12,
                 what=f"compiled vs eager gradient (implicit_grad={implicit_grad})")


def test_otseg_forward_is_one_graph(tiny_model):
    """torch._dynamo.explain over OTSeg's tensor program (what train.py --compile compiles): CLIP's image
    tower with prompts, the relationship descriptor, MPS and the three MPSA layers, in one graph."""
    model, text = tiny_model
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train().segment)(images, text)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_otseg_backward_compiles_with_the_forward(tiny_model):
    """fullgraph=True with AOTAutograd (aot_eager: the backward traced as a graph, no code generated):
    a training step's forward and backward as one compiled graph, with eager's gradients."""
    model, text = tiny_model
    model.eval()  # no dropout: the same computation in both runs
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    params = [p for _, p in trainable_parameters(model)]

    def gradients(segment):
        losses = otseg_loss(segment(images, text), labels, count_masks(labels, 3))
        return torch.autograd.grad(losses["total"], params)

    torch._dynamo.reset()
    compiled = gradients(torch.compile(model.segment, fullgraph=True, backend="aot_eager"))
    eager = gradients(model.segment)
    for (name, _), got, expected in zip(trainable_parameters(model), compiled, eager):
        assert_close(got, expected, atol=1e-6, rtol=1e-4, what=f"compiled vs eager gradient of {name}")


# ----------------------------------------------------------------------------------------------
# Host synchronisations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sync_free, reads", [(False, 3), (True, 0)])
def test_sinkhorn_host_reads(sync_free, reads):
    # 20 iterations: the eager loop reads its test after blocks 1, 2 and 3 (not after the last).
    with HostReads() as counter:
        plan = sinkhorn_log(cost_matrix(), 0.05, n_iters=20, tol=1e-12, sync_free=sync_free)
    assert sum(counter.reads.values()) == reads, dict(counter.reads)
    assert torch.isfinite(plan).all()


def test_otseg_training_step_and_inference_read_nothing_on_the_host(tiny_model):
    """Forward, losses (Eq. 18) and backward of a training step, then an inference pass with the
    ensemble (Eq. 17): not one operator that waits for the device. The eager Sinkhorn reads its
    test 1 time per call (10 iterations: after the first block), 4 calls (MPS and 3 MPSA layers)."""
    model, text = tiny_model
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    labels[0, :4] = 255
    model.train()
    with HostReads() as counter:
        losses = otseg_loss(model.segment(images, text), labels, count_masks(labels, 3))
        losses["total"].backward()
        with torch.no_grad():
            out = model.eval().segment(images, text)
            OTSeg.ensemble(out["decoder"], out["score"], seen=torch.tensor([True, False, True]))
    assert counter.ops[aten.threshold_backward.default] > 0  # the backward ran under the counter
    assert not counter.reads, dict(counter.reads)

    eager = OTSeg(model.clip, model.templates, n_iters=10).eval()  # the contrast, seen by the same counter
    with HostReads() as counter, torch.no_grad():
        eager.segment(images, text)
    assert sum(counter.reads.values()) == 4, dict(counter.reads)
