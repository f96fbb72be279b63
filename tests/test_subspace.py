"""The subspace math on inputs with the structure Share assumes: LoRA factors that share a
low-rank subspace, with arbitrary per-task gauge (B G, G⁻¹ A) rotations."""

import pytest
import torch

from share_core import subspace as S

N, D, R = 96, 80, 4


def orthonormal(m, k, g):
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def shared_adapters(T, k0=10, seed=0, noise=0.0):
    """T LoRA factor pairs (B n×r, Aᵀ d×r) living in a shared k0-dim subspace per side."""
    g = torch.Generator().manual_seed(seed)
    ub, ua = orthonormal(N, k0, g), orthonormal(D, k0, g)
    out = []
    for _ in range(T):
        gauge = torch.randn(R, R, generator=g, dtype=torch.float64) + 3 * torch.eye(R, dtype=torch.float64)
        b = ub @ torch.randn(k0, R, generator=g, dtype=torch.float64) @ gauge
        a = ua @ torch.randn(k0, R, generator=g, dtype=torch.float64) @ torch.linalg.inv(gauge).T
        b = b + noise * torch.randn(N, R, generator=g, dtype=torch.float64)
        a = a + noise * torch.randn(D, R, generator=g, dtype=torch.float64)
        out.append((b, a))
    return out


def delta(b, a):
    return b @ a.T


def principal_cosines(u, v):
    return torch.linalg.svdvals(u.T @ v)


def test_build_is_exact_when_k_covers_the_rank():
    ads = shared_adapters(6, k0=10)
    f = S.build([b for b, _ in ads], [a for _, a in ads], S.KPolicy(k_max=32))
    assert f.basis_b.shape == (N, 10) and f.basis_a.shape == (D, 10)  # never above the stack's rank
    assert torch.allclose(f.basis_b.T @ f.basis_b, torch.eye(10, dtype=torch.float64), atol=1e-12)
    for (b, a), eb, ea in zip(ads, f.coefs_b, f.coefs_a):
        rec = S.delta_weight(f.basis_b, eb, f.basis_a, ea, 1.0)
        assert S.relative_error(delta(b, a), rec) < 1e-10
    assert max(f.errors) < 1e-10


def test_truncation_error_equals_discarded_singular_energy():
    g = torch.Generator().manual_seed(1)
    fb = [torch.randn(N, R, generator=g, dtype=torch.float64) for _ in range(5)]
    fa = [torch.randn(D, R, generator=g, dtype=torch.float64) for _ in range(5)]
    f = S.build(fb, fa, S.KPolicy(k_max=7))
    stack = torch.cat(fb, 1)
    resid = stack - f.basis_b @ (f.basis_b.T @ stack)
    discarded = f.singular_b[7:].pow(2).sum()
    assert torch.isclose(resid.pow(2).sum(), discarded, rtol=1e-10)
    # the small-coordinate SVD has exactly the singular values of the full stack
    assert torch.allclose(f.singular_b, torch.linalg.svdvals(stack), rtol=1e-10)
    # and each task's coefficients are the projection of its factor
    for b, eb in zip(fb, f.coefs_b):
        assert torch.allclose(eb, f.basis_b.T @ b, atol=1e-12)


def test_efficient_merge_equals_full_svd_of_the_stack():
    old = shared_adapters(8, k0=12, seed=2, noise=0.01)
    base = S.build([b for b, _ in old], [a for _, a in old], S.KPolicy(k_max=16))
    g = torch.Generator().manual_seed(3)
    new_dirs_b, new_dirs_a = torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randn(D, 3, generator=g, dtype=torch.float64)
    # a trained task: uses the basis and its temporary directions
    nb = base.basis_b @ torch.randn(16, R, generator=g, dtype=torch.float64) + new_dirs_b @ torch.randn(3, R, generator=g, dtype=torch.float64)
    na = base.basis_a @ torch.randn(16, R, generator=g, dtype=torch.float64) + new_dirs_a @ torch.randn(3, R, generator=g, dtype=torch.float64)
    policy = S.KPolicy(k_max=12)
    fast = S.merge(base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, new_dirs_b, new_dirs_a, [nb], [na], policy)
    # reference: full SVD of the n × (T·p) stack of every task's current factors
    cur_b = [base.basis_b @ e for e in base.coefs_b] + [nb]
    cur_a = [base.basis_a @ e for e in base.coefs_a] + [na]
    u_b, s_b, _ = torch.linalg.svd(torch.cat(cur_b, 1), full_matrices=False)
    u_a, _, _ = torch.linalg.svd(torch.cat(cur_a, 1), full_matrices=False)
    assert torch.allclose(principal_cosines(fast.basis_b, u_b[:, :12]), torch.ones(12, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(principal_cosines(fast.basis_a, u_a[:, :12]), torch.ones(12, dtype=torch.float64), atol=1e-8)
    q = fast.singular_b.numel()  # 16 + 3 columns spanned everything; the rest of the stack is 0
    assert torch.allclose(fast.singular_b, s_b[:q], rtol=1e-9, atol=1e-12 * float(s_b[0]))
    assert float(s_b[q:].max()) < 1e-10 * float(s_b[0])
    for j, (b, a) in enumerate(zip(cur_b, cur_a)):
        ref = delta(u_b[:, :12] @ (u_b[:, :12].T @ b), u_a[:, :12] @ (u_a[:, :12].T @ a))
        got = S.delta_weight(fast.basis_b, fast.coefs_b[j], fast.basis_a, fast.coefs_a[j], 1.0)
        assert (ref - got).abs().max() < 1e-5 * ref.abs().max()


def test_merge_with_nothing_new_changes_no_task():
    old = shared_adapters(5, k0=9, seed=4)
    base = S.build([b for b, _ in old], [a for _, a in old], S.KPolicy(k_max=32))
    empty_b, empty_a = torch.zeros(N, 0, dtype=torch.float64), torch.zeros(D, 0, dtype=torch.float64)
    f = S.merge(base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, empty_b, empty_a, [], [], S.KPolicy(k_max=32))
    assert f.basis_b.shape == base.basis_b.shape
    for j in range(5):
        before = S.delta_weight(base.basis_b, base.coefs_b[j], base.basis_a, base.coefs_a[j], 1.0)
        after = S.delta_weight(f.basis_b, f.coefs_b[j], f.basis_a, f.coefs_a[j], 1.0)
        assert S.relative_error(before, after) < 1e-12


def test_merge_keeps_the_new_task_exactly_when_k_is_large_enough():
    old = shared_adapters(4, k0=8, seed=5)
    base = S.build([b for b, _ in old], [a for _, a in old], S.KPolicy(k_max=8))
    g = torch.Generator().manual_seed(6)
    dirs_b, dirs_a = torch.randn(N, 2, generator=g, dtype=torch.float64), torch.randn(D, 2, generator=g, dtype=torch.float64)
    nb = base.basis_b @ torch.randn(8, R, generator=g, dtype=torch.float64) + dirs_b @ torch.randn(2, R, generator=g, dtype=torch.float64)
    na = base.basis_a @ torch.randn(8, R, generator=g, dtype=torch.float64) + dirs_a @ torch.randn(2, R, generator=g, dtype=torch.float64)
    f = S.merge(base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, dirs_b, dirs_a, [nb], [na], S.KPolicy(k_max=32))
    assert f.basis_b.shape[1] == 10  # 8 old + 2 temporary directions kept, nothing dropped
    got = S.delta_weight(f.basis_b, f.coefs_b[-1], f.basis_a, f.coefs_a[-1], 1.0)
    assert S.relative_error(delta(nb, na), got) < 1e-10
    assert max(f.errors) < 1e-10


def test_absorbing_in_any_order_gives_the_same_subspace():
    first = shared_adapters(3, k0=6, seed=7)
    more = shared_adapters(4, k0=14, seed=8)
    policy = S.KPolicy(k_max=40)
    base = S.build([b for b, _ in first], [a for _, a in first], policy)

    def absorb(order):
        bs, as_ = [more[i][0] for i in order], [more[i][1] for i in order]
        return S.merge(base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, torch.cat(bs, 1), torch.cat(as_, 1), bs, as_, policy)

    f1, f2 = absorb([0, 1, 2, 3]), absorb([3, 1, 0, 2])
    k = f1.basis_b.shape[1]
    assert k == f2.basis_b.shape[1] == 20  # 6 + 14, under k_max
    assert torch.allclose(principal_cosines(f1.basis_b, f2.basis_b), torch.ones(k, dtype=torch.float64), atol=1e-8)
    perm = {0: 0, 1: 1, 2: 2, 3: 3}
    order2 = [3, 1, 0, 2]
    for i in range(4):
        d1 = S.delta_weight(f1.basis_b, f1.coefs_b[3 + i], f1.basis_a, f1.coefs_a[3 + i], 1.0)
        j = order2.index(perm[i])
        d2 = S.delta_weight(f2.basis_b, f2.coefs_b[3 + j], f2.basis_a, f2.coefs_a[3 + j], 1.0)
        assert S.relative_error(delta(*more[i]), d1) < 1e-10
        assert S.relative_error(d1, d2) < 1e-10


def test_k_policies_energy_and_error_budget():
    ads = shared_adapters(10, k0=20, seed=9, noise=0.05)
    fb, fa = [b for b, _ in ads], [a for _, a in ads]
    full = S.build(fb, fa, S.KPolicy(k_max=200))
    energy = S.build(fb, fa, S.KPolicy(k_max=200, energy=0.9))
    frac = full.singular_b.pow(2).cumsum(0) / full.singular_b.pow(2).sum()
    kb = energy.basis_b.shape[1]
    assert frac[kb - 1] >= 0.9 and (kb == 1 or frac[kb - 2] < 0.9)
    budget = S.build(fb, fa, S.KPolicy(k_max=200, error_budget=0.05))
    assert max(budget.errors) <= 0.05
    k = budget.basis_b.shape[1]
    smaller = S.build(fb, fa, S.KPolicy(k_max=k - 1))
    assert max(smaller.errors) > 0.05  # k is the smallest that meets the budget
    assert full.basis_b.shape[1] == 40  # never above the stack's rank (10 tasks × r=4)


def test_policy_and_degenerate_inputs_are_rejected():
    with pytest.raises(ValueError, match="k_max"):
        S.KPolicy(k_max=0)
    with pytest.raises(ValueError, match="energy"):
        S.KPolicy(energy=1.5)
    with pytest.raises(ValueError, match="all zero"):
        S.build([torch.zeros(N, R)], [torch.zeros(D, R)], S.KPolicy())
