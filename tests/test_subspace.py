"""The subspace math on inputs with the structure Share assumes: LoRA factors that share a
low-rank subspace, with arbitrary per-task gauge (B G, G⁻¹ A) rotations."""

import pytest
import torch

from share_core import linalg
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
    new_dirs_b, new_dirs_a = (
        torch.randn(N, 3, generator=g, dtype=torch.float64),
        torch.randn(D, 3, generator=g, dtype=torch.float64),
    )
    # a trained task: uses the basis and its temporary directions
    nb = base.basis_b @ torch.randn(16, R, generator=g, dtype=torch.float64) + new_dirs_b @ torch.randn(
        3, R, generator=g, dtype=torch.float64
    )
    na = base.basis_a @ torch.randn(16, R, generator=g, dtype=torch.float64) + new_dirs_a @ torch.randn(
        3, R, generator=g, dtype=torch.float64
    )
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
    dirs_b, dirs_a = (
        torch.randn(N, 2, generator=g, dtype=torch.float64),
        torch.randn(D, 2, generator=g, dtype=torch.float64),
    )
    nb = base.basis_b @ torch.randn(8, R, generator=g, dtype=torch.float64) + dirs_b @ torch.randn(
        2, R, generator=g, dtype=torch.float64
    )
    na = base.basis_a @ torch.randn(8, R, generator=g, dtype=torch.float64) + dirs_a @ torch.randn(
        2, R, generator=g, dtype=torch.float64
    )
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
        return S.merge(
            base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, torch.cat(bs, 1), torch.cat(as_, 1), bs, as_, policy
        )

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


# ---- per-task errors from p×p Grams (issue 8, item 6) ---------------------------------------
def errors_by_full_product(cb, ca, kb, ka):
    """The former formula, kept as the reference: per task M = C_B C_Aᵀ (T×q_B×q_A), error = the
    norm of M's entries outside M[:kb, :ka] relative to ‖M‖ (cb: T×q_B×P, ca: T×q_A×P)."""
    full = torch.bmm(cb, ca.transpose(1, 2))
    total = full.pow(2).sum((1, 2)).sqrt()
    dropped = (full[:, kb:, :].pow(2).sum((1, 2)) + full[:, :kb, ka:].pow(2).sum((1, 2))).sqrt()
    return torch.where(total > 0, dropped / total.clamp_min(torch.finfo(full.dtype).tiny), dropped)


def gram_errors(cb, ca, kb, ka):
    """task_errors on the same coordinates (q×Σp side by side, every task's P columns)."""
    stack = lambda c: c.transpose(0, 1).reshape(c.shape[1], -1)  # noqa: E731  T×q×P → q×T·P
    widths = [cb.shape[2]] * cb.shape[0]
    gk_b, gd_b = linalg.task_grams(stack(cb)[:kb], stack(cb)[kb:], widths=widths)
    gk_a, gd_a = linalg.task_grams(stack(ca)[:ka], stack(ca)[ka:], widths=widths)
    return linalg.task_errors(gk_b, gd_b, gk_a, gd_a)


def singular_coordinates(T=12, q_b=20, q_a=18, p=R, seed=11):
    """Every task's coordinates in the singular bases of a structured stack (decaying rows),
    as T×q×P; like the coordinates a fold truncates."""
    ads = shared_adapters(T, k0=10, seed=seed, noise=0.02)
    fb = torch.cat([b for b, _ in ads], 1)
    fa = torch.cat([a for _, a in ads], 1)
    ub = torch.linalg.svd(fb, full_matrices=False)[0][:, :q_b]
    ua = torch.linalg.svd(fa, full_matrices=False)[0][:, :q_a]
    return (ub.T @ fb).reshape(q_b, T, p).transpose(0, 1), (ua.T @ fa).reshape(q_a, T, p).transpose(0, 1)


def test_gram_errors_equal_the_full_product_formula():
    cb, ca = singular_coordinates()
    for kb, ka in [(10, 10), (8, 12), (4, 3), (12, 9), (1, 1), (19, 17)]:
        ref, got = errors_by_full_product(cb, ca, kb, ka), gram_errors(cb, ca, kb, ka)
        assert ref.min() > 1e-6  # structured, not trivial: every task loses something
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_gram_errors_are_exactly_zero_where_nothing_is_dropped():
    cb, ca = singular_coordinates()
    cb[3, 10:], ca[3, 9:] = 0, 0  # task 3 lies inside the kept block exactly
    ref, got = errors_by_full_product(cb, ca, 10, 9), gram_errors(cb, ca, 10, 9)
    assert ref[3] == 0 and got[3] == 0
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    q_b, q_a = cb.shape[1], ca.shape[1]  # keeping every row drops nothing, for every task
    assert torch.equal(gram_errors(cb, ca, q_b, q_a), torch.zeros(cb.shape[0], dtype=cb.dtype))


def dense_errors(factors, basis_b, coefs_b, basis_a, coefs_a):
    """Relative ΔW error per task, from the n×d matrices themselves."""
    return [
        S.relative_error(b @ a.T, S.delta_weight(basis_b, eb, basis_a, ea, 1.0))
        for (b, a), eb, ea in zip(factors, coefs_b, coefs_a)
    ]


@pytest.mark.parametrize(
    "policy", [S.KPolicy(k_max=7), S.KPolicy(k_max=40, error_budget=0.05), S.KPolicy(k_max=30, energy=0.95)]
)
def test_fold_errors_are_the_true_delta_w_errors(policy):
    ads = shared_adapters(9, k0=14, seed=12, noise=0.03)
    f = S.build([b for b, _ in ads], [a for _, a in ads], policy)
    assert f.errors == pytest.approx(dense_errors(ads, f.basis_b, f.coefs_b, f.basis_a, f.coefs_a), rel=1e-9, abs=1e-12)
    if policy.error_budget is not None:
        assert max(f.errors) <= policy.error_budget  # the budget loop's Gram curve agrees with the result
    more = shared_adapters(3, k0=14, seed=13, noise=0.03)
    m = S.merge(
        f.basis_b,
        f.basis_a,
        f.coefs_b,
        f.coefs_a,
        torch.cat([b for b, _ in more], 1),
        torch.cat([a for _, a in more], 1),
        [b for b, _ in more],
        [a for _, a in more],
        policy,
    )
    current = [(f.basis_b @ eb, f.basis_a @ ea) for eb, ea in zip(f.coefs_b, f.coefs_a)] + more
    assert m.errors == pytest.approx(
        dense_errors(current, m.basis_b, m.coefs_b, m.basis_a, m.coefs_a), rel=1e-9, abs=1e-12
    )


# ---- batched merges, the stored frames, batch absorb ------------------------------------------
def float32_layer(seed, n=N, d=D, T=30, k=12):
    ads = [(b.float(), a.float()) for b, a in shared_adapters(T + 1, k0=10, seed=seed, noise=0.02)]
    if n != N:  # another layer shape: zero-pad the B side's rows (still a valid, structured layer)
        ads = [(torch.cat([b, torch.zeros(n - N, R)]), a) for b, a in ads]
    f = S.build([b for b, _ in ads[:T]], [a for _, a in ads[:T]], S.KPolicy(k_max=k))
    nb, na = ads[T]
    return (f.basis_b, f.basis_a, f.coefs_b, f.coefs_a, nb, na, [nb], [na])


def test_merge_stores_old_coefficients_exactly_as_apply_frame_gives_them():
    layers = [float32_layer(20 + i) for i in range(3)]
    for f, layer in zip(S.merge_layers(layers, S.KPolicy(k_max=12)), layers):
        old_b, old_a = layer[2], layer[3]
        for got, want in zip(f.coefs_b[: len(old_b)], S.apply_frame(f.frame_b, old_b, torch.float32)):
            assert torch.equal(got, want)
        for got, want in zip(f.coefs_a[: len(old_a)], S.apply_frame(f.frame_a, old_a, torch.float32)):
            assert torch.equal(got, want)
        # and as a stored version recomputes them: the frame applied to the stacked k×Σp matrix
        assert torch.equal(torch.cat(f.coefs_b[: len(old_b)], 1), S.apply_frame(f.frame_b.clone(), torch.cat(old_b, 1)))


def test_merge_layers_equals_merging_each_layer():
    layers = [float32_layer(30), float32_layer(31, n=N + 16), float32_layer(32), float32_layer(33, k=10)]
    policy = S.KPolicy(k_max=12)
    for f, layer in zip(S.merge_layers(layers, policy), layers):
        g = S.merge(*layer, policy)  # the same numbers; batched products may round differently in the last bit
        assert f.basis_b.shape == g.basis_b.shape and f.basis_a.shape == g.basis_a.shape
        assert torch.allclose(f.basis_b, g.basis_b, atol=1e-6) and torch.allclose(f.frame_b, g.frame_b, atol=1e-12)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(f.coefs_a, g.coefs_a))
        assert f.errors == pytest.approx(g.errors, rel=1e-9)


def test_batch_absorb_of_100_adapters_into_one_version():
    old = shared_adapters(20, k0=10, seed=40, noise=0.02)
    policy = S.KPolicy(k_max=16)
    base = S.build([b for b, _ in old], [a for _, a in old], policy)
    new = shared_adapters(100, k0=10, seed=41, noise=0.02)  # another shared subspace
    nb, na = [b for b, _ in new], [a for _, a in new]
    f = S.merge(
        base.basis_b, base.basis_a, base.coefs_b, base.coefs_a, torch.cat(nb, 1), torch.cat(na, 1), nb, na, policy
    )
    assert len(f.coefs_b) == 120 and f.basis_b.shape == (N, 16)
    current = [(base.basis_b @ eb, base.basis_a @ ea) for eb, ea in zip(base.coefs_b, base.coefs_a)] + new
    assert f.errors == pytest.approx(
        dense_errors(current, f.basis_b, f.coefs_b, f.basis_a, f.coefs_a), rel=1e-9, abs=1e-12
    )
    # the same subspace as a full SVD of all 120 tasks' current factors
    full_b = torch.linalg.svd(torch.cat([b for b, _ in current], 1), full_matrices=False)[0][:, :16]
    full_a = torch.linalg.svd(torch.cat([a for _, a in current], 1), full_matrices=False)[0][:, :16]
    recompute = dense_errors(
        current, full_b, [full_b.T @ b for b, _ in current], full_a, [full_a.T @ a for _, a in current]
    )
    total = lambda errs: sum(e * e * float((b @ a.T).norm()) ** 2 for e, (b, a) in zip(errs, current))  # noqa: E731
    assert total(f.errors) <= 1.01**2 * total(recompute) + 1e-24


# ---- the build's leading-eigenpair solver ------------------------------------------------------
def wide_stack(m, T, k0, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = orthonormal(m, k0, g)
    return [
        u @ torch.randn(k0, R, generator=g, dtype=torch.float64)
        + noise * torch.randn(m, R, generator=g, dtype=torch.float64)
        for _ in range(T)
    ]


@pytest.mark.parametrize("noise", [0.01, 1.0])  # a gap after the wanted pairs; a flat spectrum (falls back)
@pytest.mark.parametrize(
    "policy", [S.KPolicy(k_max=8), S.KPolicy(k_max=12, error_budget=0.2), S.KPolicy(k_max=12, energy=0.8)]
)
def test_build_of_a_wide_stack_equals_the_full_eigendecomposition(noise, policy, monkeypatch):
    fb, fa = wide_stack(160, 60, 12, noise, 50), wide_stack(150, 60, 12, noise, 51)
    certified, top_eig = [], linalg.top_eig

    def spy(gram, want):
        pairs = top_eig(gram, want)
        certified.append(pairs is not None)
        return pairs

    monkeypatch.setattr(linalg, "top_eig", spy)
    fast = S.build(fb, fa, policy)
    # the fast path really ran: certified where the spectrum has a gap, a fallback where it is flat
    assert certified == [noise < 0.1, noise < 0.1]
    monkeypatch.setattr(linalg, "TOP_EIG_MIN_Q", 10**9)
    full = S.build(fb, fa, policy)
    k = full.basis_b.shape[1]
    assert fast.basis_b.shape[1] == k and fast.basis_a.shape[1] == full.basis_a.shape[1]
    assert torch.allclose(principal_cosines(fast.basis_b, full.basis_b), torch.ones(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(fast.singular_b[:k], full.singular_b[:k], rtol=1e-12)
    assert fast.errors == pytest.approx(full.errors, rel=1e-9)
    stack = torch.cat(fb, 1)
    assert torch.allclose(full.singular_b[:k], torch.linalg.svdvals(stack)[:k], rtol=1e-10)
    for b, eb in zip(fb, fast.coefs_b):
        assert torch.allclose(fast.basis_b @ eb, fast.basis_b @ (fast.basis_b.T @ b), atol=1e-12)


def test_merge_takes_old_coefficients_side_by_side_without_changing_a_bit():
    layers = [float32_layer(60 + i) for i in range(2)]
    as_lists = S.merge_layers(layers, S.KPolicy(k_max=12))
    side_by_side = [
        (
            b,
            a,
            S.SideBySide(torch.cat(ob, 1), [e.shape[1] for e in ob]),
            S.SideBySide(torch.cat(oa, 1), [e.shape[1] for e in oa]),
            db,
            da,
            nb,
            na,
        )
        for b, a, ob, oa, db, da, nb, na in layers
    ]
    for f, g in zip(as_lists, S.merge_layers(side_by_side, S.KPolicy(k_max=12))):
        assert torch.equal(f.stacked_b, g.stacked_b) and torch.equal(f.stacked_a, g.stacked_a)
        assert torch.equal(f.frame_b, g.frame_b) and torch.equal(f.basis_a, g.basis_a) and f.errors == g.errors


def test_an_all_zero_wide_stack_is_rejected():
    with pytest.raises(ValueError, match="all zero"):
        S.build([torch.zeros(160, R)] * 60, [torch.zeros(150, R)] * 60, S.KPolicy(k_max=8))


def _signed(u):
    """The sign convention: each column's largest-magnitude entry positive."""
    idx = u.abs().argmax(0, keepdim=True)
    return u * torch.where(u.gather(0, idx) < 0, -1.0, 1.0)


def test_bases_follow_one_sign_convention_so_equal_math_gives_equal_numbers():
    """Built and merged bases equal the full SVD's singular vectors under the fixed sign
    convention (not just up to sign), and coefficients flip with them: ΔW is unchanged."""
    g = torch.Generator().manual_seed(5)
    fb = [torch.randn(N, R, generator=g, dtype=torch.float64) for _ in range(5)]
    fa = [torch.randn(D, R, generator=g, dtype=torch.float64) for _ in range(5)]
    f = S.build(fb, fa, S.KPolicy(k_max=9))
    for basis, stack in ((f.basis_b, torch.cat(fb, 1)), (f.basis_a, torch.cat(fa, 1))):
        u = torch.linalg.svd(stack, full_matrices=False)[0][:, :9]
        assert torch.allclose(basis, _signed(u), atol=1e-10)
        assert (basis.gather(0, basis.abs().argmax(0, keepdim=True)) > 0).all()
    for b, a, eb, ea in zip(fb, fa, f.coefs_b, f.coefs_a):  # coefficients are the projections onto the signed basis
        assert torch.allclose(eb, f.basis_b.T @ b, atol=1e-12) and torch.allclose(ea, f.basis_a.T @ a, atol=1e-12)
    nb, na = (
        [torch.randn(N, R, generator=g, dtype=torch.float64)],
        [torch.randn(D, R, generator=g, dtype=torch.float64)],
    )
    m = S.merge(f.basis_b, f.basis_a, f.coefs_b, f.coefs_a, nb[0], na[0], nb, na, S.KPolicy(k_max=9))
    cur_b = [f.basis_b @ e for e in f.coefs_b] + nb
    u = torch.linalg.svd(torch.cat(cur_b, 1), full_matrices=False)[0][:, :9]
    assert torch.allclose(m.basis_b, _signed(u), atol=1e-8)
    for j in range(5):  # the frames carry the sign: old coefficients moved by them equal the merge's
        assert torch.allclose(S.apply_frame(m.frame_b, f.coefs_b[j], torch.float64), m.coefs_b[j], atol=1e-12)
        assert torch.allclose(m.basis_b @ m.coefs_b[j], u @ (u.T @ cur_b[j]), atol=1e-10)
