"""Tests of sinkhorn.py against POT, against each other, and against identities that must hold
(the sync-free form under torch.compile and its host syncs: test_compile.py)."""
import pytest
import torch

from conftest import assert_close
from sinkhorn import CHECK_EVERY, mps, sinkhorn_log, sinkhorn_log_block, sinkhorn_naive


def random_marginal(*shape, dtype=torch.float64):
    w = torch.rand(*shape, dtype=dtype) + 0.2
    return w / w.sum(-1, keepdim=True)


def otseg_like_sim(batch, m, n, dim=16, seed=0):
    """Cosine similarities of random unit vectors, (batch, M, N), as pixels x prompts."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.nn.functional.normalize(torch.randn(batch, m, dim, generator=g), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(batch, n, dim, generator=g), dim=-1)
    return pixels @ prompts.transpose(1, 2)                               # (batch, M, N)


def test_log_domain_matches_pot():
    ot = pytest.importorskip("ot")
    torch.manual_seed(0)
    for m, n, eps in [(7, 5, 0.1), (12, 3, 0.05), (4, 9, 0.2)]:
        cost = torch.rand(m, n, dtype=torch.float64)
        a, b = random_marginal(m), random_marginal(n)
        # POT solves min <T, C> + reg * sum T log T, the same problem as ours with reg = eps.
        expected = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log",
                               numItermax=100_000, stopThr=1e-15, warn=False)
        plan = sinkhorn_log(cost, eps, a, b, n_iters=500, tol=0)
        assert_close(plan, expected, rtol=1e-8, what=f"log vs POT (M={m}, N={n}, eps={eps})")


def test_naive_matches_log_and_marginals():
    torch.manual_seed(1)
    cost = torch.rand(3, 20, 6, dtype=torch.float64)
    a, b = random_marginal(3, 20), random_marginal(3, 6)
    naive = sinkhorn_naive(cost, 0.1, a, b, n_iters=500, tol=0)
    log = sinkhorn_log(cost, 0.1, a, b, n_iters=500, tol=0)
    assert_close(naive, log, rtol=1e-10, what="naive vs log")
    assert_close(log.sum(-1), a, rtol=1e-10, what="row marginals")
    assert_close(log.sum(-2), b, rtol=1e-12, what="column marginals")


def test_log_survives_where_naive_underflows():
    torch.manual_seed(2)
    cost = 2 * torch.rand(2, 64, 6)                                        # float32, costs in [0, 2]
    naive = sinkhorn_naive(cost, 0.01)
    assert not torch.isfinite(naive).all(), "the naive kernel was expected to underflow here"
    plan = sinkhorn_log(cost, 0.01, n_iters=1000, tol=1e-7)  # small eps converges slowly
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert_close(plan.sum(-1), torch.full((2, 64), 1 / 64), rtol=1e-3, what="row marginals")
    assert_close(plan.sum(-2), torch.full((2, 6), 1 / 6), rtol=1e-5, what="column marginals")


@pytest.mark.parametrize("solver", [sinkhorn_naive, sinkhorn_log])
def test_gradcheck(solver):
    torch.manual_seed(3)
    cost = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    a = random_marginal(2, 5).requires_grad_()
    b = random_marginal(2, 3).requires_grad_()
    fn = lambda c, a_, b_: solver(c, 0.3, a_, b_, n_iters=20, tol=0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (cost, a, b))


@pytest.mark.parametrize("solver", [sinkhorn_naive, sinkhorn_log])
def test_autocast_computes_in_float32(solver):
    torch.manual_seed(8)
    cost = torch.rand(3, 32, 4).bfloat16()
    expected = solver(cost.float(), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = solver(cost, 0.1)
    assert plan.dtype == torch.float32
    assert_close(plan, expected, rtol=1e-6, what="under bf16 autocast vs float32")


def test_mps_gradients_under_bf16_autocast():
    torch.manual_seed(4)
    pixels = torch.randn(2, 64, 16, requires_grad=True)
    prompts = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = torch.nn.functional.normalize(pixels, dim=-1) @ \
            torch.nn.functional.normalize(prompts, dim=-1).transpose(1, 2)  # (2, M, N), bf16
        assert sim.dtype == torch.bfloat16
        score = mps(sim)
    assert score.dtype == torch.float32 and torch.isfinite(score).all()
    # computed in float32 from the bf16 similarities: 1 - sim must not be rounded to bf16 first
    assert_close(score, mps(sim.float()), rtol=1e-5, what="bf16 input vs its float32 copy")
    score.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_batch_equals_problems_one_by_one():
    torch.manual_seed(5)
    cost = torch.rand(2, 3, 10, 4)
    a, b = random_marginal(2, 3, 10, dtype=torch.float32), random_marginal(2, 3, 4, dtype=torch.float32)
    for solver in (sinkhorn_naive, sinkhorn_log):
        batch = solver(cost, 0.1, a, b, n_iters=30, tol=0)
        for i in range(2):
            for j in range(3):
                single = solver(cost[i, j], 0.1, a[i, j], b[i, j], n_iters=30, tol=0)
                assert_close(batch[i, j], single, rtol=1e-6, what=f"{solver.__name__} problem ({i}, {j})")


def test_mps_single_prompt_against_pot():
    # N = 1 skips the solver (the plan is known: 1/M); POT's solver must agree with what it returns.
    ot = pytest.importorskip("ot")
    sim = otseg_like_sim(3, 50, 1).double()
    score, plan = mps(sim, return_plan=True)
    for i in range(3):
        expected = ot.sinkhorn(torch.full((50,), 1 / 50, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                               1 - sim[i], 0.05, method="sinkhorn_log", numItermax=1000, stopThr=1e-15)
        assert_close(plan[i], expected, rtol=1e-12, what=f"N = 1 plan vs POT, problem {i}")
        assert_close(score[i], (50 * expected * sim[i]).sum(-1), rtol=1e-12, what=f"N = 1 score vs POT, problem {i}")


def test_mps_equal_prompts_give_sum_over_prompts():
    # If every prompt has the same similarity to a pixel, each cost row is constant, the plan is
    # mu nu^T = 1/(M N) and S* = sum_n sim = N * sim.
    sim = otseg_like_sim(2, 40, 1).expand(2, 40, 5)                       # (2, M, N) equal columns
    assert_close(mps(sim), 5 * sim[..., 0], rtol=1e-5, what="equal prompts")


def release_sinkhorn(cost, eps, n_iters=100, tol=1e-6, a=None, b=None, return_error=False):
    """The release's rule, written independently: log domain, potentials u and v in cost units, test
    every iteration (its `decode_seg.py`, `Sinkhorn_log_exp_sum`; uniform marginals unless given).
    Returns the plan and the iterations run, and if asked the last mean |u - u_prev|."""
    m, n = cost.shape[-2:]
    log_mu = torch.tensor(1 / m, dtype=cost.dtype).log() if a is None else a.log()
    log_nu = torch.tensor(1 / n, dtype=cost.dtype).log() if b is None else b.log()
    u = cost.new_zeros(cost.shape[:-1])
    v = cost.new_zeros(cost.shape[:-2] + (n,))
    for it in range(n_iters):
        u_prev = u
        u = u + eps * (log_mu - torch.logsumexp((-cost + u[..., :, None] + v[..., None, :]) / eps, -1))
        v = v + eps * (log_nu - torch.logsumexp((-cost + u[..., :, None] + v[..., None, :]) / eps, -2))
        error = (u - u_prev).abs().mean()
        if error.item() < tol:
            break
    plan = torch.exp((-cost + u[..., :, None] + v[..., None, :]) / eps)
    return (plan, it + 1, error) if return_error else (plan, it + 1)


@pytest.mark.parametrize("n_iters", [1, 3, 7, 23])
def test_iterates_and_error_equal_the_release_loop_with_marginals(n_iters):
    """Iteration by iteration, with non-uniform marginals: our log-plan loop (alternating log_softmax)
    gives the release's plan after n iterations, and a block of n iterations reports the release's
    error of the n-th (mean |u - u_prev|, in units of eps)."""
    torch.manual_seed(9)
    cost = torch.rand(3, 20, 6, dtype=torch.float64)
    a, b = random_marginal(3, 20), random_marginal(3, 6)
    expected, _, release_error = release_sinkhorn(cost, 0.1, n_iters, tol=0, a=a, b=b, return_error=True)
    assert_close(sinkhorn_log(cost, 0.1, a, b, n_iters=n_iters, tol=0), expected, rtol=1e-12,
                 what=f"plan after {n_iters} iterations vs release loop")
    log_mu, log_nu = a.log()[:, None, :], b.log()[:, :, None]              # the block's layout
    log_plan_t, error = sinkhorn_log_block(log_mu, log_nu, (cost / -0.1).mT, n_iters)
    assert_close(torch.exp(log_plan_t).mT, expected, rtol=1e-12, what="the block's plan")
    assert_close(0.1 * error, release_error, rtol=1e-10, what=f"error of iteration {n_iters}")


@pytest.mark.parametrize("solver", [sinkhorn_naive, sinkhorn_log])
@pytest.mark.parametrize("side", ["row", "column"])
def test_a_zero_mass_entry_gets_a_zero_plan_and_leaves_the_rest_unchanged(solver, side):
    """Identity: a pixel (row) or prompt (column) of zero mass takes nothing, and the plan of the other
    entries is that of the problem without it (log 0 must not turn the log-domain loop into NaN)."""
    torch.manual_seed(10)
    cost = torch.rand(2, 12, 5, dtype=torch.float64)
    marginals = [random_marginal(2, 12), random_marginal(2, 5)]        # a (rows), b (columns)
    side_dim = 0 if side == "row" else 1
    cost_dim = side_dim - 2                                              # its dimension in the cost
    marginals[side_dim][:, 2] = 0
    keep = torch.tensor([i for i in range(cost.shape[cost_dim]) if i != 2])
    plan = solver(cost, 0.1, *marginals, n_iters=300, tol=0)
    reduced_marginals = list(marginals)
    reduced_marginals[side_dim] = marginals[side_dim][:, keep]
    reduced = solver(cost.index_select(cost_dim, keep), 0.1, *reduced_marginals, n_iters=300, tol=0)
    zero, rest = plan.select(cost_dim, 2), plan.index_select(cost_dim, keep)
    assert torch.isfinite(plan).all() and zero.abs().max() < 1e-250, zero.abs().max()
    assert_close(rest, reduced, rtol=1e-10, what=f"{solver.__name__}: the plan without the zero {side}")


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("seed", [1, 5])  # seeds where the release stops between two of our checks
def test_defaults_agree_with_release_rule(seed, sync_free):
    sim = otseg_like_sim(16, 128, 6, seed=seed)
    expected, release_iters = release_sinkhorn(1 - sim, 0.05)
    plan, iters = sinkhorn_log(1 - sim, 0.05, return_iters=True, sync_free=sync_free)
    assert release_iters <= int(iters) < release_iters + CHECK_EVERY, (release_iters, iters)
    assert_close(128 * 6 * plan, 128 * 6 * expected, rtol=1e-3,
                 what=f"defaults vs release rule ({int(iters)} vs {release_iters} iterations)")


@pytest.mark.parametrize("solver", [sinkhorn_naive, sinkhorn_log])
@pytest.mark.parametrize("n_iters, tol, stops_early",
                         [(100, 1e-6, True), (23, 0.0, False), (12, 1e-9, False)])
def test_sync_free_freezes_where_the_eager_loop_breaks(solver, n_iters, tol, stops_early):
    """The identity the sync-free form rests on: keeping the iterate from the block where the test
    holds is breaking there. Same plan bit for bit and the same count, whether the eager loop stops
    early, runs a last short block (23 = 4 x 5 + 3), or stops at the cap."""
    cost = 1 - otseg_like_sim(4, 48, 5, seed=3)
    plan, iters = solver(cost, 0.05, n_iters=n_iters, tol=tol, return_iters=True)
    assert (iters < n_iters) == stops_early, (iters, n_iters)
    plan_free, iters_free = solver(cost, 0.05, n_iters=n_iters, tol=tol, return_iters=True, sync_free=True)
    assert isinstance(iters, int) and iters_free.shape == () and iters_free.item() == iters
    assert_close(plan_free, plan, what=f"sync-free vs eager plan ({iters} iterations)")


@pytest.mark.parametrize("implicit_grad", [False, True])
def test_sync_free_gradients_equal_the_eager_ones(implicit_grad):
    # A problem that stops early (at 45 of 100): the frozen blocks after it must add nothing.
    sim = otseg_like_sim(3, 40, 5, seed=1).double().requires_grad_()
    weights = torch.randn(3, 40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for sync_free in (False, True):
        plan, iters = sinkhorn_log(1 - sim, 0.05, return_iters=True, implicit_grad=implicit_grad,
                                   sync_free=sync_free)
        assert int(iters) < 100
        grads.append(torch.autograd.grad((plan * weights).sum(), sim)[0])
    assert_close(grads[1], grads[0], rtol=1e-13,
                 what=f"sync-free vs eager gradient (implicit_grad={implicit_grad})")


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_mps_dtype_contract(n, dtype, expected):
    """float32 for every input but float64, one prompt or several; the values those of sim in float32."""
    sim = otseg_like_sim(2, 30, n).to(dtype)
    score, plan = mps(sim, return_plan=True)
    assert score.dtype == plan.dtype == expected, (score.dtype, plan.dtype)
    reference = mps(sim.to(expected), return_plan=True)
    assert_close(score, reference[0], what="score vs the same similarities converted first")
    assert_close(plan, reference[1], what="plan vs the same similarities converted first")


@pytest.mark.parametrize("m, n", [(6, 4), (5, 2), (7, 1)])
def test_implicit_gradient_matches_converged_unrolled(m, n):
    torch.manual_seed(6)
    cost = torch.rand(2, m, n, dtype=torch.float64, requires_grad=True)
    a, b = random_marginal(2, m), random_marginal(2, n)
    weights = torch.randn(2, m, n, dtype=torch.float64)  # a random upstream gradient dL/dT
    grads = []
    for implicit in (False, True):
        plan = sinkhorn_log(cost, 0.1, a, b, n_iters=300, tol=0, implicit_grad=implicit)
        grads.append(torch.autograd.grad((plan * weights).sum(), cost)[0])
    unrolled, implicit = grads
    assert_close(implicit, unrolled, atol=1e-10, rtol=1e-10, what="implicit vs converged unrolled gradient")


def test_implicit_gradient_gradcheck():
    torch.manual_seed(7)
    cost = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    a, b = random_marginal(2, 5), random_marginal(2, 3)
    fn = lambda c: sinkhorn_log(c, 0.2, a, b, n_iters=200, tol=0, implicit_grad=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (cost,))


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass of fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_implicit_gradient_is_memory_light():
    cost = torch.rand(8, 256, 6, requires_grad=True)
    plan_bytes = cost.numel() * cost.element_size()
    unrolled = saved_bytes(lambda: sinkhorn_log(cost, 0.05, n_iters=20, tol=0))
    implicit = saved_bytes(lambda: sinkhorn_log(cost, 0.05, n_iters=20, tol=0, implicit_grad=True))
    assert implicit <= plan_bytes < 20 * plan_bytes <= unrolled, (implicit, plan_bytes, unrolled)
    with pytest.raises(ValueError):
        sinkhorn_log(cost, 0.05, a=torch.full((256,), 1 / 256, requires_grad=True), implicit_grad=True)


def test_unrolled_gradient_matches_release_loop():
    # Our loop on the log-plan (alternating log_softmax) against the release's form of it (potentials
    # u, v in cost units, u + v - C in every log-sum-exp): same plan and same unrolled gradient.
    sim = otseg_like_sim(3, 40, 5).double().requires_grad_()
    weights = torch.randn(3, 40, 5, dtype=torch.float64)  # a random upstream gradient dL/dT
    ours = sinkhorn_log(1 - sim, 0.05, n_iters=15, tol=0)
    release, _ = release_sinkhorn(1 - sim, 0.05, n_iters=15, tol=0)
    assert_close(ours, release, rtol=1e-12, what="plan vs release loop")
    grad_ours, = torch.autograd.grad((ours * weights).sum(), sim)
    grad_release, = torch.autograd.grad((release * weights).sum(), sim)
    assert_close(grad_ours, grad_release, rtol=1e-10, what="gradient vs autograd through the release loop")


@pytest.mark.parametrize("n_iters, rtol", [(5, 2e-6), (100, 2e-5), (1000, 2e-5)])
def test_float32_close_to_float64(n_iters, rtol):
    # At VOC's size (M = 1024 pixels, N = 6). The log-plan reaches C/eps = 40 here, so float32 rounding
    # alone gives ~1e-6 of the largest entry; the log-plan carries each iteration's rounding forward, to a
    # plateau near 1e-5 (sinkhorn.py's docstring).
    cost = 1 - otseg_like_sim(16, 1024, 6)
    plan32 = sinkhorn_log(cost, 0.05, n_iters=n_iters, tol=0)
    plan64 = sinkhorn_log(cost.double(), 0.05, n_iters=n_iters, tol=0)
    assert_close(plan32, plan64, rtol=rtol, what=f"float32 vs float64, {n_iters} iterations")


@pytest.mark.cuda
@pytest.mark.parametrize("implicit_grad", [False, True])
def test_cuda_matches_cpu_with_gradients_and_autocast(implicit_grad):
    sim = otseg_like_sim(4, 256, 6).requires_grad_()
    weights = torch.randn(4, 256, 6)  # a random upstream gradient dL/dS*
    score = mps(sim, implicit_grad=implicit_grad)
    grad, = torch.autograd.grad((score * weights[..., 0]).sum(), sim)
    sim_cuda = sim.detach().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        score_cuda = mps(sim_cuda, implicit_grad=implicit_grad)
    assert score_cuda.dtype == torch.float32
    grad_cuda, = torch.autograd.grad((score_cuda * weights[..., 0].cuda()).sum(), sim_cuda)
    assert_close(score_cuda.cpu(), score, rtol=1e-4, what="score, CUDA vs CPU")
    assert_close(grad_cuda.cpu(), grad, rtol=1e-3, what="gradient, CUDA vs CPU")
