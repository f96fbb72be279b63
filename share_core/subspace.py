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


def _task_errors(cb: list[torch.Tensor], ca: list[torch.Tensor], kb: int, ka: int) -> list[float]:
    """Relative ΔW error per task when truncating full-singular-basis coordinates to (kb, ka).

    Exact: with orthonormal bases, ‖β M αᵀ‖_F = ‖M‖_F, so everything stays k×k-sized.
    """
    out = []
    for b, a in zip(cb, ca):
        full = b @ a.T
        kept = torch.zeros_like(full)
        kept[:kb, :ka] = full[:kb, :ka]
        out.append(relative_error(full, kept))
    return out


def choose_k(
    s_b: torch.Tensor, s_a: torch.Tensor, cb: list[torch.Tensor], ca: list[torch.Tensor], policy: KPolicy, eps: float
) -> tuple[int, int]:
    """(k_B, k_A) per `policy` from both sides' singular values and full coordinates."""
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


def fold(
    q_b: torch.Tensor,
    coords_b: list[torch.Tensor],
    q_a: torch.Tensor,
    coords_a: list[torch.Tensor],
    policy: KPolicy,
    dtype: torch.dtype = torch.float32,
) -> Fold:
    """Best bases for factors given as coordinates in orthonormal q_b (n×q) and q_a (d×q').

    coords_*: per task C_j (q×p_j), with factor F_j = q C_j. The SVD of the small coordinate
    stack, rotated by q, is the thin SVD of the full n×Σp stack (same singular values, same
    vectors up to sign), at cost O(n q² + q² Σp): nothing n×n or n×Σp is ever formed.
    Computed in float64; returned in `dtype`.
    """
    q_b, q_a = q_b.double(), q_a.double()
    coords_b = [c.double() for c in coords_b]
    coords_a = [c.double() for c in coords_a]
    u_b, s_b, _ = torch.linalg.svd(torch.cat(coords_b, dim=1), full_matrices=False)
    u_a, s_a, _ = torch.linalg.svd(torch.cat(coords_a, dim=1), full_matrices=False)
    cb = [u_b.T @ c for c in coords_b]
    ca = [u_a.T @ c for c in coords_a]
    kb, ka = choose_k(s_b, s_a, cb, ca, policy, torch.finfo(dtype).eps)
    return Fold(
        basis_b=(q_b @ u_b[:, :kb]).to(dtype),
        basis_a=(q_a @ u_a[:, :ka]).to(dtype),
        coefs_b=[c[:kb].to(dtype) for c in cb],
        coefs_a=[c[:ka].to(dtype) for c in ca],
        singular_b=s_b.to(dtype),
        singular_a=s_a.to(dtype),
        errors=_task_errors(cb, ca, kb, ka),
    )


def build(factors_b: list[torch.Tensor], factors_a: list[torch.Tensor], policy: KPolicy) -> Fold:
    """Initial subspace from tasks' LoRA factors: B_j (n×r_j) and A_jᵀ (d×r_j)."""
    dtype = factors_b[0].dtype
    q_b = span_basis(*[f.double() for f in factors_b])
    q_a = span_basis(*[f.double() for f in factors_a])
    return fold(q_b, [q_b.T @ f.double() for f in factors_b], q_a, [q_a.T @ f.double() for f in factors_a], policy, dtype)


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
    qb_beta, qa_alpha = q_b.T @ basis_b.double(), q_a.T @ basis_a.double()
    coords_b = [qb_beta @ e.double() for e in old_b] + [q_b.T @ f.double() for f in new_b]
    coords_a = [qa_alpha @ e.double() for e in old_a] + [q_a.T @ f.double() for f in new_a]
    return fold(q_b, coords_b, q_a, coords_a, policy, basis_b.dtype)


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
