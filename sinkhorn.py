"""Entropic optimal transport as OTSeg uses it: Sinkhorn in two forms, and Multi-Prompts Sinkhorn.

OTSeg (Kim, Oh & Ye, ECCV 2024) matches the M pixel embeddings of an image to the N text-prompt
embeddings of a class with an optimal transport plan instead of a softmax. This chapter holds the
solver and the score it builds; `mpsa.py` and `model.py` call it for every (image, class) pair.

The problem (paper Eq. 2-3). Given a cost C (M, N) and two histograms mu (M,) and nu (N,) that
each sum to 1, find the transport plan

    T* = argmin_T  <T, C> + eps * sum_ij T_ij (log T_ij - 1)    s.t.  T 1_N = mu,  T^T 1_M = nu.

(The paper writes the regulariser as "- eps H(T)" with H the entropy; it is the same problem.
Entropic OT: Cuturi 2013, "Sinkhorn distances"; Peyre & Cuturi 2019, "Computational Optimal
Transport", ch. 4.) The solution has the Gibbs form

    T* = diag(alpha) exp(-C/eps) diag(beta)      (paper Eq. 4)
       = exp((u 1^T + 1 v^T - C) / eps)          with potentials u = eps log alpha, v = eps log beta,

and Sinkhorn's algorithm finds the scalings by matching the two marginals in turn, starting from
beta = 1 (v = 0):

    alpha <- mu / (K beta),      beta <- nu / (K^T alpha),         K = exp(-C/eps)   (scaling form)
    u <- u + eps (log mu - LSE_n((u + v - C)/eps)),
    v <- v + eps (log nu - LSE_m((u + v - C)/eps))                                   (log domain)

The two forms produce the same iterates in exact arithmetic (alpha = exp(u/eps)). In floating
point the scaling form fails when eps is small against the cost range: exp(-C/eps) underflows to 0
(in float32 for C/eps > ~104, e.g. eps 0.01 and C > 1.04; in fp16 already for C/eps > ~17, i.e.
C > 0.83 at OTSeg's eps 0.05), a row of K becomes 0 and the plan gets NaN rows. The log-domain form
(Schmitzer 2019, "Stabilized sparse scaling algorithms"; Peyre & Cuturi Sec. 4.4) works with
log-sum-exp and never leaves the representable range. OTSeg uses the log-domain form; both are
here side by side so the difference can be seen (`python sinkhorn.py`).

In the code the iterate is neither u nor v but the log-plan itself,
P = log T = (u 1^T + 1 v^T - C)/eps, which starts at P = -C/eps (u = v = 0). The row update adds
eps (log mu - LSE_n(P)) to u, that is log mu - LSE_n(P) to every entry of a row of P, and the
column update does the same over columns:

    P <- P - LSE_n(P) + log mu = log_softmax_n(P) + log mu        (now the rows sum to mu)
    P <- log_softmax_m(P) + log nu                                 (now the columns sum to nu)

Log-domain Sinkhorn is normalising the rows and the columns of T in turn, in logarithms. These are
the potentials' iterates in exact arithmetic, and cheaper ones to run: a half-step is 3 kernels on
a GPU (a log_softmax and an addition forward, the log_softmax backward), where the potentials' form,
a log-sum-exp of (u + v - C)/eps with the additions around it, is about 17 (docs/benchmarks.md,
"CUDA kernels"). The rounding differs: the potentials' form rebuilds (u + v - C)/eps from the exact
C at every step, while P carries the rounding of each step forward. In float32 the plan stays within
about 1e-6 of its largest entry (against float64) after 5 iterations; the difference grows with the
iterations to a plateau near 1e-5 at OTSeg's sizes (2e-6 throughout for the potentials' form).

Multi-Prompts Sinkhorn (paper Eq. 9-10): with sim (M, N) the cosine similarities between pixels
and prompts, C = 1 - sim, uniform marginals 1/M and 1/N and eps = 0.05,

    S*_m = sum_n (M N T*_mn) sim_mn.

The factor M N (from the authors' release, its `models/decode_heads/decode_seg.py`) makes each row
of M N T* sum to N, like the all-ones weights of a plain sum over prompts: S* is a reweighted
sum_n sim_mn (and equals sim for N = 1).

Conventions shared by every function here:
- shapes are batched over any leading dimensions: cost (..., M, N) -> plan (..., M, N);
  a (..., M) and b (..., N) default to the uniform histograms;
- `n_iters` caps the iterations; `tol` stops once the row potentials move by less than `tol` on
  average (in cost units, over the whole batch, as the release); `tol=0` runs exactly `n_iters`;
- half-precision inputs and autocast regions are computed in float32 (float64 stays float64);
- gradients flow through the unrolled iterations, as in the release (`implicit_grad=True` offers a
  memory-light implicit backward instead).

Why a sync-free form (`sync_free=True`). To stop, the loop must read the convergence test on the
host; on a GPU that read is a synchronisation (the CPU waits for the GPU, then the GPU waits for
the CPU's next launches), and under torch.compile it ends the graph. The sync-free form runs every
block of iterations, evaluates the same test on the device, and from the block where it holds keeps
the iterate unchanged with torch.where: the plan, the iteration count and both gradients are
the eager loop's, exactly. The price: every call computes all `n_iters` iterations (the ones
after convergence are discarded), the unrolled gradient keeps them all for the backward pass, and
torch.compile unrolls them all into its graph (compiling takes minutes). Use it where launches and
syncs cost more than that: under torch.compile or CUDA graphs on a GPU (`train.py --compile`). The
eager loop stays the default, to read and to debug.

Run `python sinkhorn.py` for a side-by-side demonstration (a few seconds on a CPU).
"""
import time
from typing import Callable

import torch
from torch import Tensor

# How often the stopping rule looks at the error. Reading the error on the host (`bool(err < tol)`)
# is a host-device synchronisation on CUDA: the CPU waits for the GPU to finish everything queued,
# then the GPU idles while the CPU queues the next kernels; it also ends a CUDA graph or a
# torch.compile graph. The release syncs every iteration; we look every CHECK_EVERY iterations, so at
# most n_iters / CHECK_EVERY syncs (none with sync_free=True), and the iterations in between
# (`sinkhorn_log_block`) are pure tensor code. The price is at most CHECK_EVERY - 1 extra
# iterations, each of which only moves the plan closer to the fixed point. On real embeddings the
# release stops after 4-5 iterations, so 5 usually stops where it does.
CHECK_EVERY = 5

# A block: (*fixed inputs, *iterate, n) -> (*iterate, err) after n iterations; the iterate is the
# log-plan P for the log form, the scalings (alpha, beta) for the scaling form; err is the mean
# |f - f_prev| of the last iteration's row potential f = u/eps, as a tensor (what the stopping rule reads).
Block = Callable[..., tuple[Tensor, ...]]


# ----------------------------------------------------------------------------- helpers

def working_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 are all computed in float32.

    (torch.promote_types(x.dtype, torch.float32) says the same, but breaks a torch.compile graph
    on older torch.)"""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _marginals(cost: Tensor, a: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """The histograms (..., M) and (..., N), uniform where not given, in the cost's dtype."""
    *batch, m, n = cost.shape
    if a is None:
        a = cost.new_full((*batch, m), 1.0 / m)
    if b is None:
        b = cost.new_full((*batch, n), 1.0 / n)
    return a.to(cost.dtype), b.to(cost.dtype)


def _converged(err: Tensor, eps: float, tol: float) -> Tensor:
    """The release's stopping rule, mean |u - u_prev| < tol with u = eps f: a 0-d bool on the device."""
    return eps * err < tol


def _iterate(block: Block, inputs: tuple[Tensor, ...], state: tuple[Tensor, ...], eps: float, n_iters: int,
             tol: float, sync_free: bool) -> tuple[tuple[Tensor, ...], int | Tensor]:
    """Up to n_iters iterations from `state` as `block(*inputs, *state, n)` calls of CHECK_EVERY each,
    stopping by `_converged` after a block: the loop of both forms. Returns (state, iterations run).

    Eager: the test is read on the host after every block but the last (one sync each; none when
    tol = 0, which never stops) and the loop breaks; the count is an int. Sync-free: every block
    runs; the test stays on the device as `done`, and once it holds torch.where keeps the state as
    it was, so the result is the eager one; the count is a 0-d tensor.
    """
    if not sync_free:
        it = 0
        while it < n_iters:  # the last block may be shorter
            n = min(CHECK_EVERY, n_iters - it)
            *state, err = block(*inputs, *state, n)
            it += n
            if tol > 0 and it < n_iters and bool(_converged(err, eps, tol)):  # one host sync per block
                break
        return tuple(state), it
    done = torch.zeros((), dtype=torch.bool, device=state[0].device)
    iters = torch.zeros((), dtype=torch.long, device=state[0].device)
    for start in range(0, n_iters, CHECK_EVERY):
        n = min(CHECK_EVERY, n_iters - start)
        *new, err = block(*inputs, *state, n)
        # converged: keep the state, as a break would
        state = tuple(torch.where(done, old, x) for old, x in zip(state, new))
        iters = iters + n * (~done).long()
        done = done | _converged(err, eps, tol)
    return state, iters


# ----------------------------------------------------------------------------- the two forms

def _naive_block(kernel: Tensor, mu: Tensor, nu: Tensor, alpha: Tensor, beta: Tensor,
                 n: int) -> tuple[Tensor, Tensor, Tensor]:
    """n scaling iterations: K (..., M, N), mu and alpha (..., M), nu and beta (..., N) -> alpha, beta,
    and mean |log alpha - log alpha_prev| of the last one (alpha = exp(f): the log form's error)."""
    for _ in range(n):
        alpha_prev = alpha
        alpha = mu / (kernel @ beta.unsqueeze(-1)).squeeze(-1)                   # (..., M)
        beta = nu / (kernel.transpose(-2, -1) @ alpha.unsqueeze(-1)).squeeze(-1)  # (..., N)
    return alpha, beta, (alpha.log() - alpha_prev.log()).abs().mean()


def sinkhorn_naive(cost: Tensor, eps: float, a: Tensor | None = None, b: Tensor | None = None,
                   n_iters: int = 100, tol: float = 1e-6, return_iters: bool = False,
                   sync_free: bool = False):
    r"""Entropic OT plan by Sinkhorn's matrix scaling (Cuturi 2013; paper Eq. 4).

    .. math::
        K = e^{-C/\epsilon},\quad \alpha^t = \mu / (K \beta^{t-1}),\quad
        \beta^t = \nu / (K^\top \alpha^t),\quad \beta^0 = 1,\quad
        T = \mathrm{diag}(\alpha) K \mathrm{diag}(\beta)

    Simple and fast, but K underflows when C/eps is large (see the module docstring): use
    `sinkhorn_log` for OTSeg's eps. The stopping rule is the log form's, on u = eps log alpha, so
    both forms run the same iterations.

    Args:
        cost: (..., M, N) cost matrix C.
        eps: entropic regularisation epsilon (> 0), in cost units.
        a, b: (..., M) and (..., N) marginals mu and nu; uniform if None.
        n_iters: maximum number of iterations.
        tol: stop when mean |u - u_prev| < tol (checked every CHECK_EVERY iterations); 0 runs
            exactly n_iters iterations.
        return_iters: also return the number of iterations run.
        sync_free: test convergence on the device, never on the host (module docstring).
    Returns:
        plan T (..., M, N) in float32 (float64 for float64 input), and the iteration count if asked
        (an int; a 0-d tensor when sync_free).
    """
    dtype = working_dtype(cost)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost = cost.to(dtype)
        mu, nu = _marginals(cost, a, b)
        kernel = torch.exp(cost / -eps)                                  # (..., M, N)
        alpha, beta = torch.ones_like(mu), torch.ones_like(nu)           # alpha^0 = 1, i.e. u = 0
        (alpha, beta), iters = _iterate(_naive_block, (kernel, mu, nu), (alpha, beta), eps, n_iters, tol,
                                        sync_free)
        plan = alpha.unsqueeze(-1) * kernel * beta.unsqueeze(-2)         # (..., M, N)
    return (plan, iters) if return_iters else plan


def sinkhorn_log_block(log_mu: Tensor, log_nu: Tensor, log_plan_t: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """n log-domain iterations from the log-plan: the work between two convergence tests.

    The log-plan is held transposed, P^T (..., N, M), with log mu (..., 1, M) and log nu (..., N, 1):
    both normalisations then run over memory laid out in rows of M numbers, several times faster on
    a CPU than over runs of N = 6 or 8 (and coalesced on a GPU). Returns the new P^T, and the error
    the stopping rule reads, as a tensor: mean |f - f_prev| of the last iteration, f = u/eps the row
    potential, which that iteration's row update moves by log mu - LSE_n(P) (module docstring). The
    error is computed once (n >= 1), before the last iteration, without a graph (the test is not
    differentiated). Pure tensor code with no host synchronisation, so torch.compile captures the n
    unrolled iterations as one graph.
    """
    for i in range(n):
        if i == n - 1:  # the only iteration whose error the test reads
            with torch.no_grad():
                err = (log_mu - torch.logsumexp(log_plan_t, dim=-2, keepdim=True)).abs().mean()
        log_plan_t = torch.log_softmax(log_plan_t, dim=-2) + log_mu  # rows of T sum to mu,    (..., N, M)
        log_plan_t = torch.log_softmax(log_plan_t, dim=-1) + log_nu  # columns sum to nu,      (..., N, M)
    return log_plan_t, err


class _PlanWithImplicitGradient(torch.autograd.Function):
    r"""T = exp(P) at the converged log-plan P, differentiated implicitly in the cost C.

    The memory-light alternative to backpropagating through the unrolled iterations, which keeps
    every iterate alive. At the fixed point the plan satisfies its marginal constraints
    T 1 = a and T^T 1 = b. Differentiating T = exp((u + v - C)/eps) and the constraints (for fixed
    a, b) gives, with H = [[diag(a), T], [T^T, diag(b)]] (rows then columns),

    .. math::
        dT = T \odot (du\,1^\top + 1\,dv^\top - dC)/\epsilon,\qquad
        H \begin{bmatrix} du \\ dv \end{bmatrix} =
        \begin{bmatrix} (T \odot dC) 1 \\ (T \odot dC)^\top 1 \end{bmatrix}.

    For an upstream gradient G = dL/dT, let r = (G T) 1 and c = (G T)^T 1 (G T elementwise) and
    solve H [x; y] = [r; c]. Then (Luise et al. 2018; Eisenberger et al. 2022, "A unified
    framework for implicit Sinkhorn differentiation")

    .. math::
        \frac{\partial L}{\partial C} = T \odot (x 1^\top + 1 y^\top - G) / \epsilon .

    H is singular along (1, -1) (adding t to u and subtracting it from v leaves T unchanged), and
    [r; c] is orthogonal to that direction, so any solution does; we fix y_N = 0. Eliminating x
    (x = (r - T y) / a) leaves an N x N system with the Schur complement
    S = diag(b) - T^T diag(1/a) T; for OTSeg (N prompts, at most 8) that is a tiny solve per
    problem. a and b are taken as the plan's own sums, so that S 1 = 0 holds exactly. The result
    is the limit of the unrolled gradient as the iterations converge; it is exact only at the
    fixed point.
    """

    @staticmethod
    def forward(ctx, cost: Tensor, log_plan: Tensor, eps: float) -> Tensor:
        # log_plan (..., M, N): sinkhorn_log's iterations from this cost, run without a graph; the cost
        # is an input so that the gradient below reaches it (the plan has log_plan's strides)
        plan = torch.exp(log_plan)                                         # (..., M, N)
        ctx.save_for_backward(plan)
        ctx.eps = eps
        return plan

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        (plan,) = ctx.saved_tensors
        with torch.autocast(device_type=plan.device.type, enabled=False):  # a solve wants fp32
            grad_plan = grad_plan.to(plan.dtype)
            a = plan.sum(-1)                                               # (..., M)
            b = plan.sum(-2)                                               # (..., N)
            weighted = grad_plan * plan                                    # (..., M, N)
            r, c = weighted.sum(-1), weighted.sum(-2)                      # (..., M), (..., N)
            plan_a = plan / a.unsqueeze(-1)                                # diag(1/a) T, (..., M, N)
            schur = torch.diag_embed(b) - plan.transpose(-2, -1) @ plan_a  # (..., N, N)
            rhs = c - (plan_a.transpose(-2, -1) @ r.unsqueeze(-1)).squeeze(-1)  # (..., N)
            y = torch.zeros_like(b)                                        # y_N = 0 fixes the gauge
            if b.shape[-1] > 1:
                # solve_ex: linalg.solve would read an error flag back from the GPU (a host sync)
                y[..., :-1] = torch.linalg.solve_ex(schur[..., :-1, :-1], rhs[..., :-1])[0]
            x = (r - (plan @ y.unsqueeze(-1)).squeeze(-1)) / a             # (..., M)
            grad_cost = plan * (x.unsqueeze(-1) + y.unsqueeze(-2) - grad_plan) / ctx.eps
        return grad_cost, None, None


def sinkhorn_log(cost: Tensor, eps: float, a: Tensor | None = None, b: Tensor | None = None,
                 n_iters: int = 100, tol: float = 1e-6, return_iters: bool = False,
                 implicit_grad: bool = False, sync_free: bool = False):
    r"""Entropic OT plan by log-domain Sinkhorn (Schmitzer 2019; Peyre & Cuturi 2019, Sec. 4.4).

    .. math::
        u \leftarrow u + \epsilon\,(\log\mu - \mathrm{LSE}_n((u + v - C)/\epsilon)),\quad
        v \leftarrow v + \epsilon\,(\log\nu - \mathrm{LSE}_m((u + v - C)/\epsilon)),\quad
        T = e^{(u 1^\top + 1 v^\top - C)/\epsilon}

    with u = v = 0 at the start, computed on the log-plan P = log T as alternating row and column
    log_softmax (module docstring). Each update is an exact maximisation of the dual objective over
    one potential; since v is updated last, the column sums of T equal nu to rounding and the row
    sums approach mu. This is the form OTSeg uses (eps 0.05, at most 100 iterations, tol 1e-6).

    Args:
        cost: (..., M, N) cost matrix C.
        eps: entropic regularisation epsilon (> 0), in cost units.
        a, b: (..., M) and (..., N) marginals mu and nu (positive); uniform if None.
        n_iters: maximum number of iterations.
        tol: stop when mean |u - u_prev| < tol over the whole batch (checked every CHECK_EVERY
            iterations); 0 runs exactly n_iters iterations.
        return_iters: also return the number of iterations run.
        implicit_grad: instead of backpropagating through the iterations (the release's way),
            run them without a graph and differentiate the converged plan implicitly
            (`_PlanWithImplicitGradient`): memory no longer grows with the iterations. Gradients
            reach `cost` only, so a and b must not require them.
        sync_free: test convergence on the device, never on the host: the same plan and
            gradients, for torch.compile and CUDA graphs (module docstring).
    Returns:
        plan T (..., M, N) in float32 (float64 for float64 input), laid out transposed in memory as
        the iterations ran (`.contiguous()` or `.reshape` before a `.view`), and the iteration count
        if asked (an int; a 0-d tensor when sync_free).
    """
    dtype = working_dtype(cost)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost = cost.to(dtype)
        mu, nu = _marginals(cost, a, b)
        # The release adds 1e-8 inside these logs (a ~1e-5 relative change). Here only zero entries
        # are lifted, to the smallest normal number: a zero-mass row or column then gets a plan of
        # zeros, where log 0 = -inf would make the next log_softmax of that row NaN.
        tiny = torch.finfo(dtype).tiny
        log_mu = mu.clamp_min(tiny).log().unsqueeze(-2)                  # (..., 1, M)
        log_nu = nu.clamp_min(tiny).log().unsqueeze(-1)                  # (..., N, 1)
        if implicit_grad and (log_mu.requires_grad or log_nu.requires_grad):
            raise ValueError("implicit_grad differentiates the cost only; a and b must not require grad")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not implicit_grad):  # implicit: no graph
            # The release's start and order (its `decode_seg.py`): both potentials 0, so P = -C/eps,
            # then rows before columns. -C/eps is written C/(-eps): the same bits (IEEE division is
            # sign-symmetric) in one kernel instead of two, forward and backward. P is held
            # transposed (sinkhorn_log_block says why): one copy here, none in the loop.
            log_plan_t = (cost / -eps).transpose(-2, -1).contiguous()      # P^T, (..., N, M)
            (log_plan_t,), iters = _iterate(sinkhorn_log_block, (log_mu, log_nu), (log_plan_t,), eps,
                                            n_iters, tol, sync_free)
        log_plan = log_plan_t.transpose(-2, -1)                            # P, (..., M, N)
        if implicit_grad:
            plan = _PlanWithImplicitGradient.apply(cost, log_plan, eps)   # (..., M, N)
        else:
            plan = torch.exp(log_plan)                                     # (..., M, N)
    return (plan, iters) if return_iters else plan


# ----------------------------------------------------------------------------- Multi-Prompts Sinkhorn

def mps(sim: Tensor, eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6,
        return_plan: bool = False, implicit_grad: bool = False, sync_free: bool = False):
    r"""Multi-Prompts Sinkhorn score (paper Eq. 9-10).

    .. math::
        T^* = \mathrm{Sinkhorn}_\epsilon(1 - S;\ \mu = 1/M,\ \nu = 1/N),\qquad
        S^*_m = \sum_n M N\, T^*_{mn} S_{mn}

    Each prompt n receives the same total mass 1/N from the pixels, so a prompt that matches
    few pixels strongly still weighs on them; M N T* averages 1 (the release's scaling).

    Args:
        sim: (..., M, N) cosine similarities between M pixels and N prompts.
        eps, n_iters, tol: as in `sinkhorn_log` (the defaults are the release's).
        return_plan: also return the plan T* (..., M, N).
        implicit_grad: as in `sinkhorn_log` (the default, False, is the release's unrolled gradient).
        sync_free: as in `sinkhorn_log` (no host sync; the same score).
    Returns:
        score (..., M), or (score, plan): in float32 whatever sim's dtype (float64 stays float64),
        as every function here; the plan as `sinkhorn_log` lays it out. For N = 1 the score is
        sim[..., 0] itself (converted).
    """
    m, n = sim.shape[-2:]
    dtype = working_dtype(sim)
    with torch.autocast(device_type=sim.device.type, enabled=False):
        sim = sim.to(dtype)  # before 1 - sim: in bf16 the subtraction would lose digits
        if n == 1:
            # One prompt: its column must carry mass 1 spread as the rows' 1/M, so T* = 1/M and
            # M N T* = 1 exactly; skip the solver (whose rounding would only blur this).
            score = sim[..., 0]                                          # (..., M)
            return (score, torch.full_like(sim, 1.0 / m)) if return_plan else score
        plan = sinkhorn_log(1.0 - sim, eps, n_iters=n_iters, tol=tol, implicit_grad=implicit_grad,
                            sync_free=sync_free)                         # (..., M, N)
        score = (m * n * plan * sim).sum(dim=-1)                         # (..., M)
    return (score, plan) if return_plan else score


# ----------------------------------------------------------------------------- demonstration

def _timed(fn, *args, **kwargs):
    fn(*args, **{**kwargs, "n_iters": 1})  # warm-up, so that first-call overheads are not timed
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _describe(name: str, plan: Tensor, mu: Tensor, nu: Tensor, iters: int, seconds: float) -> None:
    bad_rows = (~torch.isfinite(plan).all(-1) | (plan.sum(-1) == 0)).sum().item()
    row_err = (plan.sum(-1) - mu).abs().max().item()
    col_err = (plan.sum(-2) - nu).abs().max().item()
    print(f"  {name:6s} iters {iters:3d}  time {seconds * 1e3:7.1f} ms  NaN/zero rows {bad_rows:5d}"
          f"  max row-sum err {row_err:.1e}  max col-sum err {col_err:.1e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    P, M, N = 16, 1024, 6  # P problems (e.g. 1 image x 16 classes), M pixels, N prompts

    print("1. An OTSeg-like problem: C = 1 - cos(pixels, prompts), eps 0.05, float32, defaults")
    pixels = torch.nn.functional.normalize(torch.randn(P, M, 64), dim=-1)   # (P, M, C)
    prompts = torch.nn.functional.normalize(torch.randn(P, N, 64), dim=-1)  # (P, N, C)
    cost = 1 - pixels @ prompts.transpose(1, 2)                              # (P, M, N)
    mu, nu = torch.full((M,), 1 / M), torch.full((N,), 1 / N)
    (t_naive, it_naive), s_naive = _timed(sinkhorn_naive, cost, 0.05, return_iters=True)
    (t_log, it_log), s_log = _timed(sinkhorn_log, cost, 0.05, return_iters=True)
    _describe("naive", t_naive, mu, nu, it_naive, s_naive)
    _describe("log", t_log, mu, nu, it_log, s_log)
    rel = ((t_naive - t_log).abs().max() / t_log.abs().max()).item()
    print(f"  naive vs log: max |difference| / max |T| = {rel:.1e}")

    print("2. Where the kernel underflows: costs uniform in [0, 2], eps 0.01, float32")
    print("   (exp(-C/eps) is 0 in float32 for C > 1.04: a row of K that is all zero makes alpha")
    print("   infinite, and the NaN it gives spreads through beta to every row of the problem)")
    P, M = 2, 128
    mu = torch.full((M,), 1 / M)
    cost = 2 * torch.rand(P, M, N)
    (t_naive, it_naive), s_naive = _timed(sinkhorn_naive, cost, 0.01, return_iters=True)
    (t_log, it_log), s_log = _timed(sinkhorn_log, cost, 0.01, n_iters=1000, return_iters=True)
    _describe("naive", t_naive, mu, nu, it_naive, s_naive)
    _describe("log", t_log, mu, nu, it_log, s_log)
    print("   (the naive error is NaN, so it never stops early; a small eps converges slowly,")
    print("   hence n_iters=1000 for the log form)")

    print("3. MPS score S* = sum_n M N T sim against the plain sum over prompts sum_n sim")
    sim = pixels[:4] @ prompts[:4].transpose(1, 2)                          # (4, M, N)
    score = mps(sim)                                                        # (4, M)
    print(f"  mean S* {score.mean():.3f}  mean sum_n sim {sim.sum(-1).mean():.3f}"
          f"  (the plan moves each pixel's weight to the prompts it matches best)")
