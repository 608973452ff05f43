"""tools/benchmark.py: the paper's Table 3 counting convention by hand, the release's unused weights as
PyTorch's own decoder layer counts them, and the rows that must equal the model they measure.

Everything runs on the CPU with the small random CLIP (clip.TINY).
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tools import benchmark
import checkpoint
import clip
import data
import sinkhorn
from model import OTSeg, trainable_parameters
from mpsa import MPSADecoder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    """OTSeg on the tiny random CLIP (4 prompt tokens, 64x64), VOC's 20 classes x 3 prompts."""
    torch.manual_seed(0)
    clip_model = checkpoint.build_clip("random-tiny", 4, 64, CPU)
    return OTSeg(clip_model, data.TEMPLATES["N6"][:3]).eval()


def test_paper_macs_count_linear_and_conv_outside_clip_attention(model):
    names = list(data.VOC_CLASSES)
    model.text_embeddings(names)  # computed once per class list, before counting: the text tower is not counted
    K, N, C, T, W, M, layers = 20, 3, 64, 4, 64, 16, 2  # 64x64 image: 4x4 patches of 16
    tokens = 1 + T + M
    expected = (M * 3 * 16 * 16 * W  # patch embedding
                + layers * T * W * W  # prompt_proj on every layer's prompts
                + layers * tokens * 2 * W * 4 * W  # CLIP's MLPs (its attention is not counted)
                + K * N * 2 * C * C  # relationship descriptor
                + 2 * (2 * K * N * C * C + 2 * M * C * C + 2 * K * N * C * 4 * C)  # decoder layers 1-2
                + K * N * C * C + M * C * C)  # layer 3: query and key projections
    images = torch.randn(1, 3, 64, 64)
    macs = benchmark.paper_macs(model, images, names)
    assert macs == expected, (macs, expected, macs - expected)
    with torch.no_grad():
        flops = benchmark.full_flops(lambda: model(images, names))
    assert flops > 2 * macs, (flops, 2 * macs)  # attention and the einsums are counted there


def test_release_overheads_are_pytorchs_own_decoder_layer_parts():
    """The release builds nn.TransformerDecoderLayer(512, 8, 2048) three times: self-attention and norm1
    of every layer are never called, and the last layer's value and output projections, norms and FFN
    run with their output unused. Counted here from PyTorch's layer, not from a formula."""
    d, heads, ffn, layers = 512, 8, 2048, 3
    layer = nn.TransformerDecoderLayer(d, heads, ffn)
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    cross = layer.multihead_attn
    value = (cross.in_proj_weight.numel() + cross.in_proj_bias.numel()) // 3  # the third of the packed q, k, v
    unused = (layers * count(layer.self_attn, layer.norm1)
              + value + count(cross.out_proj, layer.norm2, layer.norm3, layer.linear1, layer.linear2))

    queries, pixels = 20 * 6, 32 * 32  # VOC's classes x prompts; a 512x512 crop's patches
    memory, x = torch.randn(pixels, d), torch.randn(queries, d)
    with FlopCounterMode(display=False) as counter:  # what the last layer runs for nothing
        F.linear(memory, cross.in_proj_weight[2 * d:])
        cross.out_proj(x)
        layer.linear2(layer.linear1(x))
    head = SimpleNamespace(relationship_descriptor=nn.Linear(2 * d, d), decoder=MPSADecoder(d, ffn_dim=ffn))
    parameters, macs = benchmark.release_overheads(head, num_queries=queries, num_pixels=pixels)
    assert parameters == unused, (parameters, unused)
    assert macs == counter.get_total_flops() // 2, (macs, counter.get_total_flops() // 2)
    assert 8_039_168 + parameters == pytest.approx(13.8e6, abs=0.05e6)  # paper Table 3: 13.8M


def test_decoder_only_is_the_decoder_output_of_forward(model):
    images, names = torch.randn(2, 3, 64, 64), ["cat", "dog", "sky"]
    with torch.no_grad():
        full = model(images, names)["decoder"]
        alone = benchmark.decoder_only(model)(images, names)
    assert torch.equal(alone, full), (alone - full).abs().max()


def test_efficiency_table_rows(model):
    names = list(data.VOC_CLASSES)
    table = benchmark.efficiency_table(model, names, 64, CPU, repeats=1)
    rows = {row[0]: row for row in table.rows}
    assert set(rows) == {"OTSeg (decoder only)", "OTSeg+ (MPSA)", "softmax cross-attention"}
    learnable = sum(p.numel() for _, p in trainable_parameters(model))
    extra, _ = benchmark.release_overheads(model, len(names) * 3, 16)
    for name, row in rows.items():
        assert row[1] == pytest.approx(learnable / 1e6), name  # the softmax model has the same weights
        assert row[2] - row[1] == pytest.approx(extra / 1e6), name
        assert row[6] > 0 and math.isfinite(row[6]), name
    assert rows["softmax cross-attention"][7] == pytest.approx(1.0)


def test_bare_tower_is_the_same_clip_without_prompts(model):
    bare = benchmark.bare_tower(model.clip)
    assert not any(n.startswith("visual.prompt") for n, _ in bare.named_parameters())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        difference = (bare.encode_image(images) - model.clip.encode_image(images)).abs().max()
    assert difference == 0, difference
    table = benchmark.backbone_table(model, ["cat", "dog"], 64, 2, CPU, repeats=1)
    assert [row[0] for row in table.rows] == ["bare CLIP image tower", "OTSeg+"]
    assert table.rows[1][2] == pytest.approx(table.rows[1][1] / table.rows[0][1])


def test_count_host_syncs_counts_bool_and_item_and_puts_the_methods_back():
    x = torch.tensor([1.0, 2.0])
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item
    with benchmark.count_host_syncs() as syncs:
        assert torch.Tensor.__bool__ is not original_bool and torch.Tensor.item is not original_item
        bool(x.sum() > 0)
        x[0].item()
        x + 1  # no synchronisation
    assert syncs["n"] == 2
    assert torch.Tensor.__bool__ is original_bool and torch.Tensor.item is original_item
    with pytest.raises(RuntimeError), benchmark.count_host_syncs():  # put back after an error too
        raise RuntimeError
    assert torch.Tensor.__bool__ is original_bool and torch.Tensor.item is original_item


def test_host_syncs_are_counted_by_the_line_that_asks_and_cpu_work_is_not():
    x = torch.arange(10.0)
    with benchmark.HostSyncs() as syncs:
        x[x > 4]                                   # boolean-mask indexing: its size is data
        bool(x.sum() > 3)                          # a value read on the host
        torch.bincount(x.long())                   # reads the largest value first
        x.nonzero()
        optimizer = torch.optim.AdamW([torch.nn.Parameter(x.clone())])
        optimizer.step()                           # AdamW's step counters live on the CPU by design
        list(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5))  # CPU work
    kinds = sorted(kind for kind, where in syncs.counts)
    assert kinds == ["bincount", "boolean-mask indexing", "item()/bool()/float()", "nonzero"], syncs.counts
    assert all(where.startswith("tests/test_benchmark.py:") for _, where in syncs.counts)
    assert sum(syncs.counts.values()) == 4


def test_a_training_step_and_an_evaluated_image_wait_for_the_device_only_in_sinkhorn():
    """The hot paths' host synchronisations, as `tools/benchmark.py --only syncs` counts them: Sinkhorn's
    convergence tests and nothing else (the confusion matrix used to ask for 6 per image)."""
    table = benchmark.bench_syncs(torch.device("cpu"), quick=True)
    where = [row[0] for row in table.rows[:-1]]
    assert all(w.startswith("sinkhorn.py:") for w in where), table.rows
    assert table.rows[-1][0] == "total" and table.rows[-1][3] <= 4 * 19  # 4 solves of at most 19 tests


def test_kernel_launches_count_the_operators_that_do_work_and_not_views_or_allocations():
    """By hand: a linear layer is one addmm, a layer norm one kernel, views and empty tensors none."""
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    with benchmark.KernelLaunches() as launches:
        y = torch.nn.functional.linear(x, w, b)        # addmm (w.t() is a view)
        y = y.view(2, 6).transpose(0, 1).unsqueeze(0)  # views: nothing
        torch.empty(5)                                 # an allocation: nothing
        torch.nn.functional.layer_norm(x, (8,))        # native_layer_norm
        x.add_(1)                                      # in place: one kernel
    assert launches.n == 3, launches.n


def test_an_operator_of_several_kernels_counts_what_the_profiler_sees_it_run():
    """logsumexp's ATen function calls other operators (amax, sub, exp_, ...): the profiler records them
    below it. The distinct ones that do work are its kernels: not allocations, views, the out= variant
    a functional operator calls (the same name again), nor the CPU's output fills and scalar copies,
    which a CUDA reduction or comparison does inside its one kernel. (Which event holds which differs
    between torch versions and runs: the profiler nests them by time, so the names are collected at
    every depth below every logsumexp event.)"""
    x = torch.randn(4, 16, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch.logsumexp(x, dim=-1, keepdim=True)
    def below(event):
        for child in event.cpu_children:
            yield child.name
            yield from below(child)
    bookkeeping = {"aten::logsumexp", "aten::empty", "aten::empty_strided", "aten::real", "aten::as_strided",
                   "aten::fill_", "aten::to", "aten::_to_copy", "aten::copy_"}
    kernels = {name for event in profiler.events() if event.name == "aten::logsumexp"
               for name in below(event)} - bookkeeping
    assert len(kernels) == benchmark.SEVERAL_KERNELS[torch.ops.aten.logsumexp.default], sorted(kernels)
    with benchmark.KernelLaunches() as launches:
        torch.logsumexp(x, dim=-1, keepdim=True)
    assert launches.n == len(kernels)


def test_a_log_domain_sinkhorn_iteration_is_six_kernels_forward_and_backward():
    """By hand: per iteration, two log_softmax and two additions of the log-marginals forward, two
    log_softmax backward (an addition's gradient passes through unchanged): 6. Counted as the
    difference between blocks of 4 and 3 iterations, so that what a block does once cancels."""
    cost = torch.rand(2, 10, 4, requires_grad=True)
    log_mu, log_nu = torch.full((2, 1, 10), 0.1).log(), torch.full((2, 4, 1), 0.25).log()

    def count(n: int) -> int:
        with benchmark.KernelLaunches() as launches:
            log_plan, _ = sinkhorn.sinkhorn_log_block(log_mu, log_nu, (cost / -0.05).mT, n)
            torch.autograd.grad(log_plan.sum(), cost)
        return launches.n
    assert count(4) - count(3) == 6, (count(3), count(4))


def test_run_every_iteration_makes_sinkhorn_run_all_of_its_iterations():
    cost = 1 - benchmark.similarity_problems(4, 32, 3)
    _, stopped = sinkhorn.sinkhorn_log(cost, 0.05, return_iters=True)
    with benchmark.KernelLaunches(run_every_iteration=True):
        _, iterations = sinkhorn.sinkhorn_log(cost, 0.05, n_iters=40, return_iters=True)
    assert stopped < 40 and int(iterations) == 40, (stopped, iterations)


def test_the_kernels_table_puts_otseg_beside_softmax_and_the_tower():
    """Tiny CLIP: the rows' ratios are their counts over the softmax model's, Sinkhorn's 100 iterations
    cost more launches than its first test, and OTSeg+ contains the tower (more kernels per window)."""
    table = benchmark.bench_kernels(CPU, quick=True, sizes=clip.TINY, size=32)
    rows = {(row[0], row[1]): row for row in table.rows}
    softmax = rows["softmax matching", "-"]
    for row in table.rows:
        assert row[3] == pytest.approx(row[2] / softmax[2]) and row[5] == pytest.approx(row[4] / softmax[4]), row
    assert rows["OTSeg+ (Sinkhorn)", "100 iterations"][2] > rows["OTSeg+ (Sinkhorn)", "first test"][2] > softmax[2]
    assert rows["bare image tower", "-"][4] < softmax[4]
    assert "Goal: OTSeg+'s eager step within 1.5x" in table.note
