"""The numerical kernels behind the subspace method: Grams of tall and task-major matrices,
per-task ΔW errors from p×p Grams, the certified leading-eigenpair iteration, numerical rank,
and reusable scratch buffers. Pure tensor functions with no knowledge of tasks, versions or
models; `subspace.py` composes them into the method (build, merge, k policies).
"""

from __future__ import annotations

import math
import threading

import torch


def rank_tol(q: int, eps: float) -> float:
    return max(q * eps * 10, 10 * math.sqrt(q * torch.finfo(torch.float64).eps))


def numerical_rank(s: torch.Tensor, eps: float, q: int | None = None) -> int:
    """Rank from the leading singular values s (descending) of q (default: all of them given)
    of data stored with machine epsilon `eps`.

    Float32 factors carry ~1e-7 relative noise: directions below that level are not signal.
    Singular values taken from a float64 Gram's eigenvalues (`gram_eig`) are resolved only down
    to ~√(q·ε₆₄)·s₁, so that is the floor (it binds for float64 factors only: float32 noise is
    far above it).
    """
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * rank_tol(q or s.numel(), eps)).sum())


def ranks(s: torch.Tensor, eps: float, q: int) -> list[int]:
    """`numerical_rank` of every row of s (L×ℓ, the leading singular values of q), in one pass."""
    return torch.where(s[:, :1] > 0, (s > s[:, :1] * rank_tol(q, eps)).sum(-1, keepdim=True), 0)[:, 0].tolist()


def frame_product(frame: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """frame · E in float64 (frame: k'×k float64; stacked: k×Σp, tasks side by side).

    The one product behind `apply_frame` and a merge's old-task coefficients, so that a merge
    and a later load of its stored frame give the same bits.
    """
    return frame @ stacked.double()


def by_task(rows: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Per-task blocks of rows (…×r×Σp, task j's p_j columns in order) as …×T×r×P, zero-padded to
    P = max p_j. Zero columns add nothing to a task's ΔW, so padding changes no norm."""
    width = max(widths)
    if all(w == width for w in widths):  # the usual case: one rank for every task, a view
        return rows.unflatten(-1, (len(widths), width)).movedim(-2, -3)
    out = rows.new_zeros(*rows.shape[:-2], len(widths), rows.shape[-2], width)
    for j, block in enumerate(torch.split(rows, widths, dim=-1)):
        out[..., j, :, : block.shape[-1]] = block
    return out


def task_grams(*rows: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Per-task Grams XⱼᵀXⱼ (T×P×P) of each of some row blocks X (r×Σp, every task's columns
    side by side) of the tasks' coordinates, from one task-major copy of all the blocks (and one
    batched matmul per block). Zero rows (r = 0) give exact zeros."""
    width, cuts = max(widths), [0]
    for x in rows:
        cuts.append(cuts[-1] + x.shape[0])
    if len(set(widths)) == 1:  # one rank for every task: tasks are P×Σr blocks of the transpose
        x = torch.cat([x.mT for x in rows], -1).unflatten(0, (len(widths), width))
    else:
        x = by_task(torch.cat(rows, 0), widths).mT
    return [x[..., a:b] @ x[..., a:b].mT for a, b in zip(cuts, cuts[1:])]


def symmetric_gram(xt: torch.Tensor, blocks: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """XᵀX (m×m) of a tall xt (N×m), computing only the lower block triangle (blocks×blocks of
    column blocks, ~(b+1)/2b of the flops of a full product) and mirroring it, so the result is
    exactly symmetric. With `out`, the lower block triangle is added to it in place and nothing
    is mirrored (summing chunks of rows; `mirror` finishes)."""
    m = xt.shape[1]
    g = xt.new_zeros(m, m) if out is None else out
    if m < 64 * blocks:
        return g.addmm_(xt.T, xt)
    cuts = [m * i // blocks for i in range(blocks + 1)]
    for a, b in zip(cuts, cuts[1:]):
        g[a:b, :b].addmm_(xt[:, a:b].T, xt[:, :b])
    return mirror(g, cuts) if out is None else g


def mirror(g: torch.Tensor, cuts: list[int] | None = None) -> torch.Tensor:
    """Copy the lower block triangle of g (column-block boundaries `cuts`) onto the upper one."""
    m = g.shape[0]
    cuts = cuts or [m * i // 4 for i in range(5)]
    if m < 64 * (len(cuts) - 1):
        return g
    for a, b in zip(cuts, cuts[1:]):
        g[:a, a:b] = g[a:b, :a].T
    return g


def task_major_grams(xt: torch.Tensor, widths: list[int], split: int | None = None):
    """Per-task Grams (T×P×P) of rows X given as Xᵀ (Σp×r, task-major): no copy when every task
    has the same rank. With `split`, the Grams of rows :split and split: (a pair)."""
    if len(set(widths)) == 1:
        x = xt.unflatten(0, (len(widths), widths[0]))
        if split is None:
            return x @ x.mT
        return x[..., :split] @ x[..., :split].mT, x[..., split:] @ x[..., split:].mT
    if split is None:
        return task_grams(xt.T, widths=widths)[0]
    return tuple(task_grams(xt[:, :split].T, xt[:, split:].T, widths=widths))


def task_errors(gk_b: torch.Tensor, gd_b: torch.Tensor, gk_a: torch.Tensor, gd_a: torch.Tensor) -> torch.Tensor:
    """Relative ΔW error per task (…×T) of truncating every task's coordinates C_B (q_B×p),
    C_A (q_A×p) in the singular bases to their first (k_B, k_A) rows, from p×p Grams only:
    gk_* = G(C[:k]), gd_* = G(C[k:]) with G(X) = XᵀX (…×T×P×P).

    With orthonormal bases ‖β M αᵀ‖_F = ‖M‖_F for M = C_B C_Aᵀ; truncation keeps M[:k_B, :k_A],
    so the squared error is the dropped entries' ‖C_B[k_B:] C_Aᵀ‖² + ‖C_B[:k_B] C_A[k_A:]ᵀ‖²
    = tr(G(C_B[k_B:]) G(C_A)) + tr(G(C_B[:k_B]) G(C_A[k_A:])): two traces of products of PSD
    matrices, each ≥ 0, and G(C_A) = G(C_A[:k_A]) + G(C_A[k_A:]) is a sum of PSD parts; ‖M‖²
    adds the kept block's tr(G(C_B[:k_B]) G(C_A[:k_A])) ≥ 0. Nothing cancels (‖M‖² − ‖kept‖²
    would, to ~1e-8 where the error is 0). Cost O(T·p²), never anything T×q×q.
    """
    g_a = gk_a + gd_a
    dropped_b = (gd_b * g_a).sum((-2, -1))  # ‖C_B[k:] C_Aᵀ‖²
    dropped_a = (gk_b * gd_a).sum((-2, -1))  # ‖C_B[:k] C_A[k:]ᵀ‖²
    kept = (gk_b * gk_a).sum((-2, -1))  # ‖C_B[:k] C_A[:k]ᵀ‖²
    dropped = (dropped_b + dropped_a).clamp_min(0)
    total = (dropped + kept.clamp_min(0)).sqrt()
    dropped = dropped.sqrt()
    return torch.where(total > 0, dropped / total.clamp_min(torch.finfo(total.dtype).tiny), dropped)


def gram_eig(gram: torch.Tensor, want: int, partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (…×q×ℓ, descending) and singular values (…×ℓ) of coordinates C from
    their Gram C Cᵀ (…×q×q, float64): a symmetric eigendecomposition of a q×q matrix, batched,
    with ℓ = q; or, for one large Gram and when the caller can do with them (`partial`), the
    leading ℓ ≥ `want` pairs when `top_eig` certifies them. The vectors are as accurate as an SVD's
    where it matters (ε·s₁²/gap); singular values
    are resolved down to ~√(q·ε)·s₁, which `numerical_rank` takes as its floor."""
    q = gram.shape[-1]
    if partial and gram.shape[0] == 1 and q >= TOP_EIG_MIN_Q and q >= 4 * (want + extra_pairs(want)):
        top = top_eig(gram[0], want)
        if top is not None:
            return top[0].unsqueeze(0), top[1].unsqueeze(0)
    lam, v = torch.linalg.eigh(gram)
    return v.flip(-1), lam.flip(-1).clamp_min(0).sqrt()


TOP_EIG_MIN_Q = 128  # below this a full eigendecomposition costs about as little as the iteration


TOP_EIG_ITERATIONS = 10


def extra_pairs(want: int) -> int:
    return max(16, want)


TOP_EIG_TOL = 1e-10  # residual ‖G u − θ u‖ / θ₁ of a certified pair


def top_eig(gram: torch.Tensor, want: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The leading ℓ = want + max(16, want) eigenpairs of a PSD q×q `gram` (float64) by
    subspace iteration with Rayleigh–Ritz, or None when they are not certified within
    TOP_EIG_ITERATIONS steps (the caller then takes the full eigendecomposition).

    Each step costs O(q²·ℓ) instead of a full eigendecomposition's O(q³) (with a slow
    tridiagonal reduction); a spectrum with a gap after the wanted pairs (shared low-rank
    structure plus noise) converges in a few steps. Certified means: (1) every wanted pair's
    residual ‖G u − θ u‖ ≤ TOP_EIG_TOL·θ₁ (1e-10), so the kept subspace is exact to
    ~1e-10·θ₁/gap (orders below the 6e-8 that float32 bases and coefficients store; ΔW errors
    move by its square) and the values, which converge with the square of the residual, to
    rounding; and (2) no eigenvector the block missed can carry an eigenvalue above the last
    wanted one: ‖G‖²_F − Σ θ² (≥ the energy outside the block) < θ_want². The start is a fixed
    pseudo-random block, so the result is a deterministic function of the Gram.
    """
    q, width = gram.shape[0], min(gram.shape[0], want + extra_pairs(want))
    x = torch.linalg.qr(gram @ _start_block(q, width, gram.dtype))[0]
    frob2, tiny = float(torch.linalg.vector_norm(gram)) ** 2, torch.finfo(gram.dtype).tiny
    if frob2 == 0:  # nothing to find (the caller's full eigendecomposition reports rank 0)
        return None
    last = None
    for step in range(TOP_EIG_ITERATIONS):
        y = gram @ x
        theta, w = torch.linalg.eigh(x.T @ y)
        theta, w = theta.flip(0).clamp_min(0), w.flip(1)
        u, gu = x @ w, y @ w
        residual = float((gu[:, :want] - u[:, :want] * theta[:want]).norm(dim=0).max()) / max(float(theta[0]), tiny)
        if residual <= TOP_EIG_TOL and frob2 - float(theta.pow(2).sum()) < float(theta[want - 1]) ** 2:
            return u, theta.sqrt()
        if (
            last is not None and residual > TOP_EIG_TOL
        ):  # give up early when the convergence rate cannot get there in time
            rate = residual / last if last > 0 else math.inf
            if rate >= 1 or math.log(TOP_EIG_TOL / residual) / math.log(rate) > TOP_EIG_ITERATIONS - step - 1:
                return None
        last = residual
        x = orthonormal_columns(gu / theta.clamp_min(theta[0] * 1e-8))
    return None


_STARTS: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _start_block(q: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A fixed pseudo-random q×width start block (seed 0), made once per shape."""
    key = (q, width, dtype)
    if key not in _STARTS:
        _STARTS[key] = torch.randn(q, width, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _STARTS[key]


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (q×ℓ): CholeskyQR twice (two small Grams, two
    triangular solves) when y is well conditioned, as G·U scaled by the Ritz values is near
    convergence; Householder QR when a Cholesky factor fails."""
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(y.T @ y)
        if int(info) != 0:
            return torch.linalg.qr(y)[0]
        y = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)  # y·L⁻ᵀ with yᵀy = L·Lᵀ
    return y


_SCRATCH = threading.local()


def scratch(slot: int, rows: int, cols: int) -> torch.Tensor:
    """A rows×cols float64 work matrix, reused across calls by this thread (slot 0 or 1): a
    build's chunks would otherwise be fresh multi-MB tensors, each costing a page fault per
    4 KiB every time."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    if bufs[slot].numel() < rows * cols:
        bufs[slot] = torch.empty(rows * cols, dtype=torch.float64)
    return bufs[slot][: rows * cols].view(rows, cols)
