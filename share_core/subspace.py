"""Pure tensor functions of the Share method for one adapted layer and one side (B or A).

Notation (DESIGN §2): a side's *factor* of task j is F_j ∈ R^{m×p} (m = n for the B side,
m = d for the A side, p = the task's rank). The shared *basis* U ∈ R^{m×k} has orthonormal
columns and each task stores *coefficients* E_j = Uᵀ F_j ∈ R^{k×p}, so F_j ≈ U E_j.

One algorithm builds and updates the basis, whatever the caller (init from adapters, merge
after training, absorbing many adapters): orthonormalise the columns that span everything
(`span_basis`), express every factor in it as small coordinates, take the SVD of the small
coordinate matrix and rotate (`rotate`). Nothing here is ever centred: for reconstruction an
orthonormal basis of the uncentred stack is the Eckart–Young optimum, and centring would add a
mean that every task's ΔW would have to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KPolicy:
    """How many basis columns each side keeps after a build or merge.

    k_max: cost ceiling. energy: keep the smallest k whose singular energy fraction ≥ this.
    error_budget: the smallest k keeping every task's relative ΔW error ≤ this.
    With both quality floors set, k satisfies both; k_max caps everything and so does the
    numerical rank of the stack (extra columns would be noise).
    """

    k_max: int = 32
    energy: float | None = None
    error_budget: float | None = None

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise ValueError(f"k_max must be ≥ 1, got {self.k_max}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.error_budget is not None and not 0.0 <= self.error_budget < 1.0:
            raise ValueError(f"error_budget must be in [0, 1), got {self.error_budget}")


@dataclass
class Fold:
    """Result of (re)building one layer's subspace: both sides, every task, in input order."""

    basis_b: torch.Tensor  # n×k_B
    basis_a: torch.Tensor  # d×k_A
    coefs_b: list[torch.Tensor]  # k_B×p_j
    coefs_a: list[torch.Tensor]  # k_A×p_j
    singular_b: torch.Tensor
    singular_a: torch.Tensor
    errors: list[float]  # per task: relative ΔW error of the fold against its input
    rotation_b: torch.Tensor | None = None  # q_B×k_B (float64): kept left singular vectors of the coordinates
    rotation_a: torch.Tensor | None = None  # q_A×k_A
    frame_b: torch.Tensor | None = None  # k_B'×k_B (float64), set by `merge`: old E_B' = frame_b·E_B
    frame_a: torch.Tensor | None = None  # k_A'×k_A


def numerical_rank(s: torch.Tensor, eps: float) -> int:
    """Rank from singular values s (descending) of data stored with machine epsilon `eps`.

    Float32 factors carry ~1e-7 relative noise: directions below that level are not signal.
    """
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = s[0] * s.numel() * eps * 10
    return int((s > tol).sum())


def _energy_k(s: torch.Tensor, rank: int, energy: float) -> int:
    cum = s[:rank].pow(2).cumsum(0)
    return int((cum / cum[-1] < energy - 1e-12).sum()) + 1


def _padded(coords: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Per-task blocks of `coords` (q×Σp, task j's p_j columns in order) as T×q×P, zero-padded
    to P = max p_j. Zero columns add nothing to a task's ΔW, so padding changes no norm."""
    q, width = coords.shape[0], max(widths)
    if all(w == width for w in widths):  # the usual case: one rank for every task, no copy
        return coords.reshape(q, len(widths), width).transpose(0, 1)
    out = coords.new_zeros(len(widths), q, width)
    for j, block in enumerate(torch.split(coords, widths, dim=1)):
        out[j, :, : block.shape[1]] = block
    return out


def _task_errors(cb: torch.Tensor, ca: torch.Tensor, kb: int, ka: int) -> list[float]:
    """Relative ΔW error per task when truncating coordinates in the full singular bases
    (cb: T×q_B×P, ca: T×q_A×P) to the first (kb, ka) rows.

    Exact and all k×k-sized: with orthonormal bases ‖β M αᵀ‖_F = ‖M‖_F, and truncation keeps
    the block M[:kb, :ka] of M = C_B C_Aᵀ, so the error is the norm of the entries outside it
    (summed directly: ‖M‖² − ‖kept‖² would cancel to ~1e-8 where the error is 0).
    """
    full = torch.bmm(cb, ca.transpose(1, 2))  # T×q_B×q_A
    total = full.pow(2).sum((1, 2)).sqrt()
    dropped = (full[:, kb:, :].pow(2).sum((1, 2)) + full[:, :kb, ka:].pow(2).sum((1, 2))).sqrt()
    return torch.where(total > 0, dropped / total.clamp_min(torch.finfo(full.dtype).tiny), dropped).tolist()


def choose_k(s_b: torch.Tensor, s_a: torch.Tensor, cb: torch.Tensor, ca: torch.Tensor, policy: KPolicy, eps: float) -> tuple[int, int]:
    """(k_B, k_A) per `policy` from both sides' singular values and full coordinates
    (cb: T×q_B×P, ca: T×q_A×P, as in `_task_errors`)."""
    rank_b, rank_a = numerical_rank(s_b, eps), numerical_rank(s_a, eps)
    if rank_b == 0 or rank_a == 0:
        raise ValueError("the stacked factors are all zero: there is no subspace to keep")
    cap_b, cap_a = min(policy.k_max, rank_b), min(policy.k_max, rank_a)
    if policy.energy is None and policy.error_budget is None:
        return cap_b, cap_a
    kb = ka = 1
    if policy.energy is not None:
        kb, ka = _energy_k(s_b, rank_b, policy.energy), _energy_k(s_a, rank_a, policy.energy)
    if policy.error_budget is not None:
        while max(_task_errors(cb, ca, min(kb, cap_b), min(ka, cap_a))) > policy.error_budget:
            if kb >= cap_b and ka >= cap_a:
                break
            kb, ka = min(kb + 1, cap_b), min(ka + 1, cap_a)
    return min(kb, cap_b), min(ka, cap_a)


def span_basis(*blocks: torch.Tensor) -> torch.Tensor:
    """Orthonormal Q (m×q) spanning the columns of the blocks (each m×c), via reduced QR.

    The first block is usually an existing orthonormal basis; QR keeps its span exactly.
    Columns beyond the rank are harmless: their singular values come out ≈ 0 in `fold`.
    """
    cat = torch.cat([b for b in blocks if b.shape[1] > 0], dim=1)
    q, _ = torch.linalg.qr(cat, mode="reduced")
    return q


def left_svd(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of c (q×m), without the right ones.

    The coordinate stacks are wide (m = Σp grows with the tasks, q stays ~k): with Cᵀ = QR,
    C = RᵀQᵀ has the singular values and left vectors of the q×q matrix Rᵀ, so one QR of the
    tall Cᵀ plus a q×q SVD replaces a wide SVD that would also build the m×q right vectors.
    """
    if c.shape[1] > c.shape[0]:
        r = torch.linalg.qr(c.T, mode="r")[1]
        u, s, _ = torch.linalg.svd(r.T)
        return u, s
    u, s, _ = torch.linalg.svd(c, full_matrices=False)
    return u, s


def fold(
    q_b: torch.Tensor,
    coords_b: torch.Tensor,
    q_a: torch.Tensor,
    coords_a: torch.Tensor,
    widths: list[int],
    policy: KPolicy,
    dtype: torch.dtype = torch.float32,
) -> Fold:
    """Best bases for factors given as coordinates in orthonormal q_b (n×q) and q_a (d×q').

    coords_*: every task's coordinates side by side, q×Σp (task j: the next widths[j] columns),
    so factor F_j = q C_j. The SVD of this small stack, rotated by q, is the thin SVD of the full
    n×Σp stack (same singular values, same vectors up to sign), at cost O(n q² + q² Σp): nothing
    n×n or n×Σp is ever formed, and no step loops over tasks in Python. Computed in float64;
    returned in `dtype`.
    """
    q_b, q_a, coords_b, coords_a = q_b.double(), q_a.double(), coords_b.double(), coords_a.double()
    u_b, s_b = left_svd(coords_b)
    u_a, s_a = left_svd(coords_a)
    rot_b, rot_a = u_b.T @ coords_b, u_a.T @ coords_a  # every task's coordinates in the singular bases
    cb, ca = _padded(rot_b, widths), _padded(rot_a, widths)
    kb, ka = choose_k(s_b, s_a, cb, ca, policy, torch.finfo(dtype).eps)
    return Fold(
        basis_b=(q_b @ u_b[:, :kb]).to(dtype),
        basis_a=(q_a @ u_a[:, :ka]).to(dtype),
        coefs_b=list(torch.split(rot_b[:kb].to(dtype), widths, dim=1)),
        coefs_a=list(torch.split(rot_a[:ka].to(dtype), widths, dim=1)),
        singular_b=s_b.to(dtype),
        singular_a=s_a.to(dtype),
        errors=_task_errors(cb, ca, kb, ka),
        rotation_b=u_b[:, :kb],
        rotation_a=u_a[:, :ka],
    )


def build(factors_b: list[torch.Tensor], factors_a: list[torch.Tensor], policy: KPolicy) -> Fold:
    """Initial subspace from tasks' LoRA factors: B_j (n×r_j) and A_jᵀ (d×r_j)."""
    dtype = factors_b[0].dtype
    stack_b, stack_a = torch.cat(factors_b, 1).double(), torch.cat(factors_a, 1).double()
    q_b, q_a = span_basis(stack_b), span_basis(stack_a)
    return fold(q_b, q_b.T @ stack_b, q_a, q_a.T @ stack_a, [f.shape[1] for f in factors_b], policy, dtype)


def _coordinates(q: torch.Tensor, basis: torch.Tensor, old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
    """Every task's factor in q's coordinates (q: m×q orthonormal), side by side: q×Σp.
    Old tasks' factors are basis·E (basis: m×k, E: k×p); new ones are given (m×p)."""
    parts = []
    if old:
        parts.append((q.T @ basis.double()) @ torch.cat(old, 1).double())
    if new:
        parts.append(q.T @ torch.cat(new, 1).double())
    return torch.cat(parts, 1)


def merge(
    basis_b: torch.Tensor,
    basis_a: torch.Tensor,
    old_b: list[torch.Tensor],
    old_a: list[torch.Tensor],
    new_dirs_b: torch.Tensor,
    new_dirs_a: torch.Tensor,
    new_b: list[torch.Tensor],
    new_a: list[torch.Tensor],
    policy: KPolicy,
) -> Fold:
    """Fold new tasks into a subspace without touching old data.

    basis_b: β (n×k_B), basis_a: α (d×k_A), orthonormal. old_b/old_a: old tasks'
    coefficients E_B (k_B×p), E_A (k_A×p). new_dirs_*: columns outside the basis that the new
    factors may use (temporary directions after training; the adapters' own factors when
    absorbing), n×c / d×c'. new_b/new_a: new tasks' factors B̂ (n×p), Â (d×p), each in
    span([basis, new_dirs]). Returned coefficients: old tasks first, then new ones.
    With no new tasks and k unchanged, every old ΔW is reproduced exactly.
    """
    q_b = span_basis(basis_b.double(), new_dirs_b.double())
    q_a = span_basis(basis_a.double(), new_dirs_a.double())
    coords_b, coords_a = _coordinates(q_b, basis_b, old_b, new_b), _coordinates(q_a, basis_a, old_a, new_a)
    widths = [e.shape[1] for e in old_b] + [f.shape[1] for f in new_b]
    f = fold(q_b, coords_b, q_a, coords_a, widths, policy, basis_b.dtype)
    f.frame_b = f.rotation_b.T @ (q_b.T @ basis_b.double())
    f.frame_a = f.rotation_a.T @ (q_a.T @ basis_a.double())
    if old_b:  # the stored form of the old coefficients is the frame applied to them (see apply_frame)
        n_old = len(old_b)
        f.coefs_b[:n_old] = apply_frame(f.frame_b, old_b, basis_b.dtype)
        f.coefs_a[:n_old] = apply_frame(f.frame_a, old_a, basis_a.dtype)
    return f


def apply_frame(frame: torch.Tensor, coefs: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor] | torch.Tensor:
    """Old tasks' coefficients after a merge: E' = frame · E (frame: k'×k float64; E: k×p each).

    A merge moves every old task only by this per-module change of coordinates, so a version
    stores the frame instead of rewriting every task. Given a list, it is applied to the tasks
    side by side (one matmul, k×Σp) and split back; given the side-by-side matrix, it returns
    one. Computed in float64, returned in `dtype`: the same inputs give the same bits, which is
    what makes a version's state a deterministic function of its chain.
    """
    if isinstance(coefs, torch.Tensor):
        return (frame @ coefs.double()).to(dtype)
    if not coefs:
        return []
    out = (frame @ torch.cat(coefs, 1).double()).to(dtype)
    return list(torch.split(out, [c.shape[1] for c in coefs], dim=1))


def delta_weight(
    basis_b: torch.Tensor, coef_b: torch.Tensor, basis_a: torch.Tensor, coef_a: torch.Tensor, scale: float
) -> torch.Tensor:
    """ΔW = s · (β E_B)(α E_A)ᵀ, shape n×d. The one formula for a task's update."""
    return scale * (basis_b @ coef_b) @ (basis_a @ coef_a).T


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖reference − approx‖_F / ‖reference‖_F (the absolute error when the reference is 0)."""
    ref = reference.norm()
    diff = (reference - approx).norm()
    return float(diff if ref == 0 else diff / ref)
