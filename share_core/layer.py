"""ShareLinear: a frozen Linear (or transformers Conv1D) plus the shared subspace of its updates.

Buffers (frozen, follow `.to()`): basis β (n×k_B), α (d×k_A) and every stored task's
coefficients stacked as E_B (T×k_B×P), E_A (T×k_A×P) with scales (T,). Tasks of rank p < P are
zero-padded: zero columns add nothing to ΔW. A trainable *slot* (ParameterDict) holds the one
task being learned: its coefficients plus φ temporary directions per side.

Forward never materialises ΔW: it forms the rank-p factors B̂ = βE_B (+β_tmp E_B,tmp) and
Â = αE_A (+α_tmp E_A,tmp) once and applies y = W0x + s·B̂(Âᵀx).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .subspace import delta_weight


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(d_in, n_out) of a Linear or a transformers Conv1D (whose weight is stored d×n)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"Share adapts nn.Linear and transformers Conv1D, not {type(base).__name__}")


class ShareLinear(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_out_features(base)
        dev, dt = base.weight.device, base.weight.dtype
        n, d = self.out_features, self.in_features
        self.register_buffer("beta", torch.zeros(n, 0, device=dev, dtype=dt))
        self.register_buffer("alpha", torch.zeros(d, 0, device=dev, dtype=dt))
        self.register_buffer("coef_b", torch.zeros(0, 0, 0, device=dev, dtype=dt))
        self.register_buffer("coef_a", torch.zeros(0, 0, 0, device=dev, dtype=dt))
        self.register_buffer("scales", torch.zeros(0, device=dev, dtype=dt))
        self.slot = nn.ParameterDict()
        self.slot_scale = 0.0
        self.active: int | None = None  # index of the stored task applied in forward
        self.task_ids: torch.Tensor | None = None  # per-example task index (mixed batches)
        self.merged: int | None = None  # stored task whose ΔW is currently added to W0

    # ---- state -------------------------------------------------------------------------
    def set_subspace(
        self,
        beta: torch.Tensor,
        alpha: torch.Tensor,
        coefs: list[tuple[torch.Tensor, torch.Tensor]],
        scales: list[float],
    ) -> None:
        """Install basis β (n×k_B), α (d×k_A) and per-task (E_B k_B×p_j, E_A k_A×p_j)."""
        if self.merged is not None:
            raise RuntimeError("unmerge the task from the base weights before changing the subspace")
        dev, dt = self.base.weight.device, self.base.weight.dtype
        kb, ka = beta.shape[1], alpha.shape[1]
        widths = {eb.shape[1] for eb, _ in coefs}
        if len(widths) == 1:  # the usual case, one rank for every task: one stack per side
            cb = torch.stack([eb for eb, _ in coefs]).to(dev, dt)
            ca = torch.stack([ea for _, ea in coefs]).to(dev, dt)
        else:
            width = max(widths, default=0)
            cb = torch.zeros(len(coefs), kb, width, device=dev, dtype=dt)
            ca = torch.zeros(len(coefs), ka, width, device=dev, dtype=dt)
            for i, (eb, ea) in enumerate(coefs):
                cb[i, :, : eb.shape[1]] = eb
                ca[i, :, : ea.shape[1]] = ea
        self.beta, self.alpha = beta.to(dev, dt), alpha.to(dev, dt)
        self.coef_b, self.coef_a = cb, ca
        self.scales = torch.tensor(scales, device=dev, dtype=dt)

    def open_slot(
        self,
        rank: int,
        phi: int,
        scale: float,
        generator: torch.Generator,
        init: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Trainable coefficients for one task; ΔW starts at `init` (or 0: the B side is zero).

        φ temporary directions per side start orthogonal-ish random; their B-side
        coefficients start at zero so they too add nothing until trained.
        """
        dev, dt = self.beta.device, self.beta.dtype
        kb, ka = self.beta.shape[1], self.alpha.shape[1]
        if init is None:
            eb = torch.zeros(kb, rank)
            ea = torch.randn(ka, rank, generator=generator) / math.sqrt(max(ka, 1))
        else:
            eb, ea = init
        self.slot = nn.ParameterDict(
            {"coef_b": nn.Parameter(eb.to(dev, dt).clone()), "coef_a": nn.Parameter(ea.to(dev, dt).clone())}
        )
        if phi > 0:
            n, d = self.out_features, self.in_features
            self.slot["dirs_b"] = nn.Parameter((torch.randn(n, phi, generator=generator) / math.sqrt(n)).to(dev, dt))
            self.slot["dirs_a"] = nn.Parameter((torch.randn(d, phi, generator=generator) / math.sqrt(d)).to(dev, dt))
            self.slot["tmp_b"] = nn.Parameter(torch.zeros(phi, rank, device=dev, dtype=dt))
            self.slot["tmp_a"] = nn.Parameter(
                (torch.randn(phi, rank, generator=generator) / math.sqrt(phi)).to(dev, dt)
            )
        self.slot_scale = scale

    def close_slot(self) -> None:
        self.slot = nn.ParameterDict()
        self.slot_scale = 0.0

    def slot_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's rank-p factors B̂ (n×p) and Â (d×p)."""
        s = self.slot
        b_hat = self.beta @ s["coef_b"]
        a_hat = self.alpha @ s["coef_a"]
        if "dirs_b" in s:
            b_hat = b_hat + s["dirs_b"] @ s["tmp_b"]
            a_hat = a_hat + s["dirs_a"] @ s["tmp_a"]
        return b_hat, a_hat

    def task_factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored task's factors B̂ = βE_B (n×P), Â = αE_A (d×P) (P: padded rank)."""
        return self.beta @ self.coef_b[index], self.alpha @ self.coef_a[index]

    def delta_weight(self, index: int) -> torch.Tensor:
        """ΔW (n×d) of a stored task."""
        return delta_weight(self.beta, self.coef_b[index], self.alpha, self.coef_a[index], float(self.scales[index]))

    # ---- merge into W0 -------------------------------------------------------------------
    def merge_task(self, index: int) -> None:
        if self.merged is not None:
            raise RuntimeError(f"task #{self.merged} is already merged into the base weights")
        self._add_to_weight(self.delta_weight(index))
        self.merged = index

    def unmerge_task(self) -> None:
        if self.merged is None:
            return
        self._add_to_weight(-self.delta_weight(self.merged))
        self.merged = None

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        with torch.no_grad():
            w = self.base.weight
            w += (delta.T if isinstance(self.base, Conv1D) else delta).to(w.dtype)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if len(self.slot):
            b_hat, a_hat = self.slot_factors()
            return y + self.slot_scale * ((x @ a_hat) @ b_hat.T)
        if self.task_ids is not None:
            return y + self._mixed_delta(x, self.task_ids)
        if self.active is not None and self.active != self.merged:
            b_hat, a_hat = self.task_factors(self.active)
            return y + float(self.scales[self.active]) * ((x @ a_hat) @ b_hat.T)
        return y

    def _mixed_delta(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-example task updates for x (b×…×d): αᵀx and β(·) shared, k×P products per task."""
        if self.merged is not None:
            raise RuntimeError("mixed-task batches need every task unmerged")
        shape = x.shape
        z = x.reshape(shape[0], -1, shape[-1]) @ self.alpha  # b×L×k_A
        u = torch.bmm(z, self.coef_a[ids]) * self.scales[ids].view(-1, 1, 1)  # b×L×P
        v = torch.bmm(u, self.coef_b[ids].transpose(1, 2))  # b×L×k_B
        return (v @ self.beta.T).reshape(*shape[:-1], self.out_features)
