"""Pure tensor functions of the Share method for one adapted layer and one side (B or A).

Notation (DESIGN §2): a side's *factor* of task j is F_j ∈ R^{m×p} (m = n for the B side,
m = d for the A side, p = the task's rank). The shared *basis* U ∈ R^{m×k} has orthonormal
columns and each task stores *coefficients* E_j = Uᵀ F_j ∈ R^{k×p}, so F_j ≈ U E_j.

One algorithm builds and updates the basis, whatever the caller (init from adapters, merge
after training, absorbing many adapters): express every factor as coordinates C in an
orthonormal basis that spans everything (a merge: QR of [basis, new directions]; a build: the
stack itself, or its QR when it is taller than wide), take the SVD of C through its small q×q
Gram C Cᵀ (one symmetric eigendecomposition, batched over layers of equal shapes), and rotate
(`_fold`). A merge never multiplies out the old tasks' coordinates: their Gram is P(E Eᵀ)Pᵀ and
they move by a k'×k frame (`linalg.frame_product`, the same product a stored version replays with
`apply_frame`). Per-task ΔW errors come from p×p Grams (`linalg.task_errors`), never from anything
q×q per task. Nothing here is ever centred: for reconstruction an orthonormal basis of the
uncentred stack is the Eckart–Young optimum, and centring would add a mean that every task's
ΔW would have to carry.

Why one module of ~500 lines: it is the method itself (build, merge, absorb, truncation, their
error accounting), read as one argument; the numerical kernels it calls are in share_core.linalg.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

from . import linalg


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


class SideBySide(NamedTuple):
    """Tasks' coefficients of one layer and side side by side: matrix (k×Σp; task j is the next
    widths[j] columns), as a fold returns them (`Fold.side_by_side_b`). `merge` takes it wherever
    it takes a list of per-task coefficients, and then needs no copy to line them up."""

    matrix: torch.Tensor
    widths: list[int]


def _widths(coefs: list[torch.Tensor] | SideBySide) -> list[int]:
    return list(coefs.widths) if isinstance(coefs, SideBySide) else [e.shape[1] for e in coefs]


def _side_by_side(coefs: list[torch.Tensor] | SideBySide) -> torch.Tensor:
    return coefs.matrix if isinstance(coefs, SideBySide) else torch.cat(coefs, 1)


@dataclass
class Fold:
    """Result of (re)building one layer's subspace: both sides, every task, in input order."""

    basis_b: torch.Tensor  # n×k_B
    basis_a: torch.Tensor  # d×k_A
    stacked_b: torch.Tensor  # k_B×Σp: every task's coefficients side by side (task j: widths[j] columns)
    stacked_a: torch.Tensor  # k_A×Σp
    widths: list[int]
    singular_b: (
        torch.Tensor
    )  # leading singular values of the stack (all q of them, or the leading ℓ ≥ k_max a large build certified)
    singular_a: torch.Tensor
    errors: list[float]  # per task: relative ΔW error of the fold against its input
    rotation_b: torch.Tensor | None = None  # q_B×k_B (float64): kept left singular vectors of the coordinates
    rotation_a: torch.Tensor | None = None  # q_A×k_A
    frame_b: torch.Tensor | None = None  # k_B'×k_B (float64), set by `merge`: old E_B' = frame_b·E_B
    frame_a: torch.Tensor | None = None  # k_A'×k_A

    @cached_property
    def coefs_b(self) -> list[torch.Tensor]:
        """Per task E_B (k_B×p_j): views into `stacked_b`, made when first asked for."""
        return list(torch.split(self.stacked_b, self.widths, dim=1))

    @cached_property
    def coefs_a(self) -> list[torch.Tensor]:
        return list(torch.split(self.stacked_a, self.widths, dim=1))

    @property
    def side_by_side_b(self) -> SideBySide:
        return SideBySide(self.stacked_b, self.widths)

    @property
    def side_by_side_a(self) -> SideBySide:
        return SideBySide(self.stacked_a, self.widths)


def _energy_k(s: torch.Tensor, rank: int, energy: float, total: float) -> int:
    """Smallest k whose leading singular energy is ≥ `energy` of the stack's `total` ‖C‖²_F."""
    cum = s[:rank].pow(2).cumsum(0)
    return min(int((cum / total < energy - 1e-12).sum()) + 1, rank)


CHUNK_BYTES = 3 << 20  # float64 columns a build reads at a time: its memory stays O(m·chunk)


def choose_k(
    s_b: torch.Tensor,
    s_a: torch.Tensor,
    policy: KPolicy,
    eps: float,
    errors_at: Callable[[int, int], Callable[[int, int], torch.Tensor]] | None = None,
    ranks: tuple[int, int] | None = None,
    totals: tuple[float, float] | None = None,
) -> tuple[int, int]:
    """(k_B, k_A) per `policy` from both sides' leading singular values (descending), their
    numerical ranks and total energies ‖C‖²_F (computed from the values when not given).

    errors_at(cap_b, cap_a) → errors(k_B, k_A): the per-task errors (T) for any k ≤ cap, needed
    only by an error budget (cumulative p×p Grams, see `_error_curve`: each step is O(T·p²)).
    """
    rank_b, rank_a = ranks or (linalg.numerical_rank(s_b, eps), linalg.numerical_rank(s_a, eps))
    if rank_b == 0 or rank_a == 0:
        raise ValueError("the stacked factors are all zero: there is no subspace to keep")
    cap_b, cap_a = min(policy.k_max, rank_b), min(policy.k_max, rank_a)
    if policy.energy is None and policy.error_budget is None:
        return cap_b, cap_a
    kb = ka = 1
    if policy.energy is not None:
        tb, ta = totals or (float(s_b.pow(2).sum()), float(s_a.pow(2).sum()))
        kb, ka = _energy_k(s_b, rank_b, policy.energy, tb), _energy_k(s_a, rank_a, policy.energy, ta)
    if policy.error_budget is not None:
        errors = errors_at(cap_b, cap_a)
        while float(errors(min(kb, cap_b), min(ka, cap_a)).max()) > policy.error_budget:
            if kb >= cap_b and ka >= cap_a:
                break
            kb, ka = min(kb + 1, cap_b), min(ka + 1, cap_a)
    return min(kb, cap_b), min(ka, cap_a)


class _Side:
    """One side (B or A) of L layers with equal shapes: every task's factor as coordinates
    C (q×Σp per layer) in an orthonormal q (L×m×q; None: the identity, C are the factors).

    C is given (`c`: a build, per layer its per-task column blocks, read in float64 a few tasks
    at a time) or implicit (a merge): the old tasks'
    C = P·E with P = qᵀβ (L×q×k) and E their coefficients (per layer k×N_old, float64), the new
    tasks' `c_new` (L×q×N_new). Only products with a few rows of C are formed (C itself would be
    q×Σp per layer, and P·E for all old tasks is what a merge must not pay for). Small tensors
    are batched over the layers; the per-layer matrices that scale with the tasks stay separate,
    so each layer's working set stays in cache."""

    def __init__(
        self,
        q: torch.Tensor | None,
        widths: list[int],
        n_old: int = 0,
        c: list[list[torch.Tensor]] | None = None,
        p: torch.Tensor | None = None,
        e: list[torch.Tensor] | None = None,
        c_new: torch.Tensor | None = None,
    ) -> None:
        self.q, self.widths, self.c, self.p, self.e, self.c_new = q, widths, c, p, e, c_new
        self.parts = [widths] if c is not None else [w for w in (widths[:n_old], widths[n_old:]) if w]

    def gram(self) -> torch.Tensor:
        """C Cᵀ (L×q×q): for a merge P (E Eᵀ) Pᵀ + C_new C_newᵀ, O(k²·Σp) per layer."""
        if self.c is not None:
            grams = []
            for layer in range(len(self.c)):
                g = None
                for _, chunk in self._chunks(layer):
                    g = linalg.symmetric_gram(
                        chunk.T, out=g if g is not None else chunk.new_zeros(chunk.shape[0], chunk.shape[0])
                    )
                grams.append(linalg.mirror(g))
            return torch.stack(grams) if len(grams) > 1 else grams[0].unsqueeze(0)
        g = self.c_new @ self.c_new.mT if self.c_new is not None else 0
        if self.e is not None:
            g = g + self.p @ torch.stack([x @ x.T for x in self.e]) @ self.p.mT
        return g

    def prepare(self, u: torch.Tensor, idx: list[int], k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batched small products of a truncation of layers idx to the first k singular
        directions u (L'×q×q): for a merge, every layer's uᵀP (L'×q×k_old, old coordinates
        P·E → uᵀP·E; its first k rows are the frame) and the new tasks' rotated rows uᵀC_new."""
        if self.c is not None:
            return None, None
        return u.mT @ self._at(self.p, idx), (u.mT @ self._at(self.c_new, idx) if self.c_new is not None else None)

    def split(
        self, u: torch.Tensor, prepared: tuple, i: int, layer: int, k: int, exact: bool = False
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Truncate one layer (position i of `prepare`'s layers, u: its q×q singular directions) to
        the first k directions: (frame, kept rows u[:, :k]ᵀC as one block per part (the given C;
        or old tasks, new tasks), per-task G(C[:k]) and G(C[k:]) (T×P×P)).

        For a merge the frame u_kᵀP (k×k_old) moves the old coefficients, with `exact` through
        `linalg.frame_product` (bit-identical to `apply_frame` on the stored frame); the dropped rows
        are u[:, k:]ᵀC. In a build whose dropped rows outnumber the kept ones, G(C[k:]) is the
        Gram of the residual C − u_k·kept instead (the same, since u is orthogonal, at O(q·k·Σp)
        rather than O(q²·Σp)), a chunk of tasks at a time."""
        if self.c is not None:
            uk, rows, dropped = u[:, :k], [], []
            for widths, chunk in self._chunks(layer):  # a few tasks at a time: O(m·chunk) memory
                part = uk.T @ chunk  # k×cols: the kept rows
                if (
                    chunk.shape[0] - k > k
                ):  # the dropped rows' Gram as the residual's, transposed (task-major), ≤ 32 tasks at a time
                    start = 0
                    for a in range(0, len(widths), 32):
                        stop = start + sum(widths[a : a + 32])
                        residual = linalg.scratch(1, stop - start, chunk.shape[0])
                        torch.addmm(chunk[:, start:stop].T, part[:, start:stop].T, uk.T, alpha=-1, out=residual)
                        dropped.append(linalg.task_major_grams(residual, widths[a : a + 32]))
                        start = stop
                else:
                    dropped.append(linalg.task_major_grams(chunk.T @ u[:, k:], widths))
                rows.append(part)
            kept = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
            return (
                None,
                [kept],
                linalg.task_major_grams(kept.T, self.widths),
                torch.cat(dropped, 0) if len(dropped) > 1 else dropped[0],
            )
        rotated, new = prepared
        frame, parts = rotated[i, :k], []
        rows_t = u.new_empty(sum(self.widths), u.shape[0])  # every task's rotated rows, task-major: [kept | dropped]
        n_old = sum(self.parts[0]) if self.e is not None else 0
        if self.e is not None:
            rows = linalg.frame_product(frame, self.e[layer]) if exact else frame @ self.e[layer]
            rows_t[:n_old, :k] = rows.T
            rows_t[:n_old, k:] = (rotated[i, k:] @ self.e[layer]).T
            parts.append(rows)
        if new is not None:
            rows_t[n_old:] = new[i].T
            parts.append(new[i, :k])
        gk, gd = linalg.task_major_grams(rows_t, self.widths, k)
        return frame, parts, gk, gd

    def _chunks(self, layer: int):
        """A build's C of one layer a few tasks at a time: (their widths, C[:, their columns] in
        float64, about CHUNK_BYTES, in a reused scratch matrix: valid until the next chunk)."""
        cols = self.c[layer]
        rows, total = cols[0].shape[0], sum(self.widths)
        count = max(1, -(-total * rows * 8 // CHUNK_BYTES))
        per = -(-total // count)  # balanced chunks of whole tasks
        scratch = linalg.scratch(0, rows, max(per, max(self.widths)) + max(self.widths))
        j = 0
        while j < len(cols):
            stop, width = j, 0
            while stop < len(cols) and (width == 0 or width + self.widths[stop] <= per):
                width += self.widths[stop]
                stop += 1
            chunk = scratch[:, :width]
            chunk.copy_(torch.cat(cols[j:stop], 1))  # gather in the factors' dtype, then one converting copy: faster
            yield self.widths[j:stop], chunk
            j = stop

    def basis(self, rot: torch.Tensor, idx: list[int]) -> torch.Tensor:
        return rot if self.q is None else self._at(self.q, idx) @ rot

    @staticmethod
    def _at(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        return x if len(idx) == x.shape[0] else x[idx]


def _error_curve(side: _Side, u: torch.Tensor, layer: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every k ≤ cap, per-task G(C[:k]) and G(C[k:]) (T×(cap+1)×P×P) of one layer: the first
    cap rows' outer products summed forwards and backwards (onto G(C[cap:])): sums of PSD
    matrices only, so every k's errors are exact without recomputing any coordinates."""
    _, kept, _, rest = side.split(u[layer], side.prepare(u[layer : layer + 1], [layer], cap), 0, layer, cap)
    x = linalg.by_task(torch.cat(kept, 1), side.widths)  # T×cap×P
    outer = x.unsqueeze(-1) * x.unsqueeze(-2)  # T×cap×P×P
    zero = torch.zeros_like(outer[:, :1])
    head = torch.cat([zero, outer.cumsum(1)], 1)
    tail = torch.cat([outer.flip(1).cumsum(1).flip(1), zero], 1) + rest.unsqueeze(1)
    return head, tail


def _positive_columns(basis: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The sign convention of every basis column (…×n×k): its largest-magnitude entry is positive.
    Singular vectors are defined up to sign; fixing it here, where bases are made, means a
    refactor that keeps the math keeps the numbers (flipped columns re-seed every later task's
    random start). Flips `rot` (…×q×k, the columns' coordinates) in place to match, so
    coefficients and frames derived from it flip with the basis and ΔW is unchanged."""
    idx = basis.abs().argmax(-2, keepdim=True)  # …×1×k
    sign = torch.where(basis.gather(-2, idx) < 0, -1.0, 1.0).to(basis.dtype)
    signed = basis * sign  # before flipping `rot`: in a build without QR, `basis` is `rot` itself
    rot.mul_(sign.to(rot.dtype))
    return signed


def _fold(side_b: _Side, side_a: _Side, policy: KPolicy, dtype: torch.dtype, merging: bool) -> list[Fold]:
    """Best bases for L layers, both sides: the SVD of each layer's coordinates via their q×q
    Gram (one batched eigendecomposition per side), k per layer by `policy`, then bases,
    coefficients and per-task errors. Equals the thin SVD of every layer's full n×Σp stack (same
    singular values, same vectors up to sign) at O(n·q² + q²·Σp) with q = k + new columns in a
    merge: nothing n×n or n×Σp is formed, and no step loops over tasks in Python."""
    gram_b, gram_a = side_b.gram(), side_a.gram()
    (u_b, s_b), (u_a, s_a) = (
        linalg.gram_eig(g, policy.k_max, partial=side.c is not None) for g, side in ((gram_b, side_b), (gram_a, side_a))
    )
    totals = list(
        zip(gram_b.diagonal(0, -2, -1).sum(-1).tolist(), gram_a.diagonal(0, -2, -1).sum(-1).tolist())
    )  # ‖C‖²_F per layer
    eps = torch.finfo(dtype).eps
    layers, q_b, q_a = u_b.shape[0], gram_b.shape[-1], gram_a.shape[-1]

    def errors_at(layer):
        def at(cap_b, cap_a):
            (hb, tb), (ha, ta) = _error_curve(side_b, u_b, layer, cap_b), _error_curve(side_a, u_a, layer, cap_a)
            return lambda kb, ka: linalg.task_errors(hb[:, kb], tb[:, kb], ha[:, ka], ta[:, ka])

        return at

    groups: dict[tuple[int, int], list[int]] = {}
    for layer, ranks in enumerate(zip(linalg.ranks(s_b, eps, q_b), linalg.ranks(s_a, eps, q_a))):
        groups.setdefault(
            choose_k(s_b[layer], s_a[layer], policy, eps, errors_at(layer), ranks, totals[layer]), []
        ).append(layer)
    out: list[Fold | None] = [None] * layers
    for (kb, ka), idx in groups.items():
        sides = []
        for side, u, k in ((side_b, u_b, kb), (side_a, u_a, ka)):
            u_idx = (u if len(idx) == layers else u[idx]).clone()
            basis = _positive_columns(side.basis(u_idx[..., :k], idx), u_idx[..., :k])
            sides.append((side, u_idx, k, side.prepare(u_idx, idx, k), basis.to(dtype)))
        for i, layer in enumerate(
            idx
        ):  # per layer: every product here scales with the tasks, so each layer's stays in cache
            res = []
            for side, u, k, prepared, basis in sides:
                frame, parts, gk, gd = side.split(u[i], prepared, i, layer, k, exact=merging)
                coefs = torch.cat([x.to(dtype) for x in parts], 1) if len(parts) > 1 else parts[0].to(dtype)
                res.append((u[i, :, :k], frame, coefs, gk, gd, basis[i]))
            (rot_b, frame_b, coefs_b, gk_b, gd_b, basis_b), (rot_a, frame_a, coefs_a, gk_a, gd_a, basis_a) = res
            out[layer] = Fold(
                basis_b=basis_b,
                basis_a=basis_a,
                stacked_b=coefs_b,
                stacked_a=coefs_a,
                widths=side_b.widths,
                singular_b=s_b[layer].to(dtype),
                singular_a=s_a[layer].to(dtype),
                errors=linalg.task_errors(gk_b, gd_b, gk_a, gd_a).tolist(),
                rotation_b=rot_b,
                rotation_a=rot_a,
                frame_b=frame_b,
                frame_a=frame_a,
            )
    return out


def _build_side(factors: list[torch.Tensor]) -> _Side:
    """A build's coordinates of one side: the factors themselves (q = the identity; read in
    float64 a few tasks at a time, never stacked whole) when the stack is at least as wide as
    tall, else R of the stack's reduced QR (q = Q, Σp×Σp)."""
    widths = [f.shape[1] for f in factors]
    if sum(widths) >= factors[0].shape[0]:
        return _Side(None, widths, c=[factors])
    q, r = torch.linalg.qr(torch.cat(factors, 1).double())
    return _Side(q.unsqueeze(0), widths, c=[list(torch.split(r, widths, dim=1))])


def build(factors_b: list[torch.Tensor], factors_a: list[torch.Tensor], policy: KPolicy) -> Fold:
    """Initial subspace from tasks' LoRA factors: B_j (n×r_j) and A_jᵀ (d×r_j).

    Cost per side O(m²·Σp) for the m×m Gram of the stack (or O(m·Σp²) via QR when Σp < m) plus
    one eigendecomposition; memory O(m·Σp), nothing per task beyond its p×p Grams."""
    return _fold(_build_side(factors_b), _build_side(factors_a), policy, factors_b[0].dtype, merging=False)[0]


def _merge_side(
    bases: list[torch.Tensor],
    old: list[list[torch.Tensor] | SideBySide],
    dirs: list[torch.Tensor],
    new: list[list[torch.Tensor]],
    widths: list[int],
    n_old: int,
) -> _Side:
    """One side of L layers (same shapes) for a merge: q = QR([β, new directions]) batched over
    the layers; the old factors β·E are P·E with P = R[:, :k] (= qᵀβ, so β need not be exactly
    orthonormal in float64: q spans it exactly); the new factors' coordinates qᵀF."""
    basis = torch.stack(bases).double()
    k = basis.shape[-1]
    cols = torch.cat([basis, torch.stack(dirs).double()], -1) if dirs[0].shape[1] else basis
    q, r = torch.linalg.qr(cols)
    e = [_side_by_side(o).double() for o in old] if n_old else None
    c_new = q.mT @ torch.stack([torch.cat(n, 1) for n in new]).double() if new[0] else None
    return _Side(q, widths, n_old, p=r[..., :k], e=e, c_new=c_new)


def merge_layers(layers: list[tuple], policy: KPolicy) -> list[Fold]:
    """`merge` for many layers at once: each item is merge's arguments (basis_b, basis_a, old_b,
    old_a, new_dirs_b, new_dirs_a, new_b, new_a). Layers whose two sides have the same shapes
    are batched: one batched QR and one batched eigendecomposition per side and batched small
    products; the products that scale with the tasks (the old coefficients' Gram, their frame
    product — bit-identical to `apply_frame` on the stored frame — and the per-task error
    Grams) run layer by layer, each on a cache-sized k×Σp matrix."""
    out: list[Fold | None] = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, (bb, ba, ob, _, db, da, nb, _) in enumerate(layers):
        old_widths = tuple(_widths(ob))
        widths = old_widths + tuple(f.shape[1] for f in nb)
        groups.setdefault(
            (tuple(bb.shape), tuple(ba.shape), tuple(db.shape), tuple(da.shape), len(old_widths), widths), []
        ).append(i)
    for (*_, n_old, widths), idx in groups.items():
        items = [layers[i] for i in idx]
        sides = [
            _merge_side(
                [it[s] for it in items],
                [it[2 + s] for it in items],
                [it[4 + s] for it in items],
                [it[6 + s] for it in items],
                list(widths),
                n_old,
            )
            for s in (0, 1)
        ]
        for i, f in zip(idx, _fold(*sides, policy, layers[idx[0]][0].dtype, merging=True)):
            out[i] = f
    return out


def merge(
    basis_b: torch.Tensor,
    basis_a: torch.Tensor,
    old_b: list[torch.Tensor] | SideBySide,
    old_a: list[torch.Tensor] | SideBySide,
    new_dirs_b: torch.Tensor,
    new_dirs_a: torch.Tensor,
    new_b: list[torch.Tensor],
    new_a: list[torch.Tensor],
    policy: KPolicy,
) -> Fold:
    """Fold new tasks into a subspace without touching old data.

    basis_b: β (n×k_B), basis_a: α (d×k_A), orthonormal. old_b/old_a: old tasks'
    coefficients E_B (k_B×p), E_A (k_A×p): a list, or side by side (`SideBySide`).
    new_dirs_*: columns outside the basis that the new
    factors may use (temporary directions after training; the adapters' own factors when
    absorbing), n×c / d×c'. new_b/new_a: new tasks' factors B̂ (n×p), Â (d×p), each in
    span([basis, new_dirs]). Returned coefficients: old tasks first, then new ones; the old
    ones are exactly `apply_frame(frame, old, dtype)` with the returned frames (k'×k float64).
    With no new tasks and k unchanged, every old ΔW is reproduced exactly.

    Gram-based: the coordinates' Gram is P (E Eᵀ) Pᵀ + C_new C_newᵀ, so the old tasks cost one
    k×k Gram, the frame product and their p×p error Grams, O((k² + q·k)·Σp), independent of n.
    """
    return merge_layers([(basis_b, basis_a, old_b, old_a, new_dirs_b, new_dirs_a, new_b, new_a)], policy)[0]


def apply_frame(
    frame: torch.Tensor, coefs: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor] | torch.Tensor:
    """Old tasks' coefficients after a merge: E' = frame · E (frame: k'×k float64; E: k×p each).

    A merge moves every old task only by this per-module change of coordinates, so a version
    stores the frame instead of rewriting every task. Given a list, it is applied to the tasks
    side by side (one matmul, k×Σp) and split back; given the side-by-side matrix, it returns
    one. Computed in float64, returned in `dtype`: the same inputs give the same bits, which is
    what makes a version's state a deterministic function of its chain.
    """
    if isinstance(coefs, torch.Tensor):
        return linalg.frame_product(frame, coefs).to(dtype)
    if not coefs:
        return []
    out = linalg.frame_product(frame, torch.cat(coefs, 1)).to(dtype)
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
