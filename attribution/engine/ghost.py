"""Ghost inner products: per-sample gradient dot products from token Gram matrices, never the gradients.

For two uses of one parameter, `<G_i, G_k> = sum_t sum_s (row_t . row_s)(col_t . col_s)`. Index rows
(embeddings) give `[x_t == x_s]` against each other and a gather of the dense row at `x_t` against a
dense use (the tied-embedding cross term with the LM head). Products are batched with matmuls and
chunked so the `[tokens x tokens]` Gram blocks stay within a memory budget.
"""

from __future__ import annotations

import torch

from .rules import Use

GRAM_BLOCK = 1 << 24  # elements per Gram block (64 MiB in fp32)


def _flat(x: torch.Tensor, index: bool) -> torch.Tensor:
    return x.reshape(-1) if index else x.reshape(-1, x.shape[-1])


def gram(xu: torch.Tensor, iu: bool, xv: torch.Tensor, iv: bool, dtype: torch.dtype) -> torch.Tensor:
    """`[Nu, Nv]` inner products of flattened factors; index factors are implicit one-hots."""
    if iu and iv:
        return (xu.unsqueeze(1) == xv.unsqueeze(0)).to(dtype)
    if iu:
        return xv.to(dtype).t().index_select(0, xu)
    if iv:
        return xu.to(dtype).index_select(1, xv)
    return xu.to(dtype) @ xv.to(dtype).t()


def ghost_block(u: Use, v: Use, dtype: torch.dtype) -> torch.Tensor:
    """`[n_u, n_v]` gradient inner products of two uses (all samples of u against all of v)."""
    n, t = u.row.shape[:2]
    m, s = v.row.shape[:2]
    k = gram(_flat(u.row, u.row_index), u.row_index, _flat(v.row, v.row_index), v.row_index, dtype)
    if u.col is not None and v.col is not None:
        k = k * gram(_flat(u.col, False), False, _flat(v.col, False), False, dtype)
    elif (u.col is None) != (v.col is None):
        raise ValueError("uses of one parameter disagree on having a column factor")
    return k.view(n, t, m, s).sum(dim=(1, 3))


def ghost_scores(u: Use, v: Use, dtype: torch.dtype) -> torch.Tensor:
    """`ghost_block`, chunked over the samples of u so each Gram block fits `GRAM_BLOCK`."""
    if u.col is None and v.col is None:  # bias-like: sum over tokens first, it is exact and cheap
        return u.row.to(dtype).sum(1) @ v.row.to(dtype).sum(1).t()
    n, t = u.row.shape[:2]
    per_sample = max(1, t * v.row.shape[0] * v.row.shape[1])
    chunk = max(1, GRAM_BLOCK // per_sample)
    if chunk >= n:
        return ghost_block(u, v, dtype)
    return torch.cat([ghost_block(u.select(slice(i, i + chunk)), v, dtype) for i in range(0, n, chunk)])


def self_sq_norms(uses: list[Use], dtype: torch.dtype) -> torch.Tensor:
    """`[n]` squared norm of each sample's gradient for one parameter, over all its uses (with cross terms).

    Per-sample Gram matrices `[n, T, T]` via batched matmuls: no per-sample gradient is formed.
    """
    n = uses[0].n
    total = torch.zeros(n, dtype=dtype, device=uses[0].row.device)
    for i, u in enumerate(uses):
        for j, v in enumerate(uses):
            if j < i:
                continue
            mult = 1.0 if i == j else 2.0
            total += mult * _pair_self(u, v, dtype)
    return total


def _batched_gram(xu: torch.Tensor, iu: bool, xv: torch.Tensor, iv: bool, dtype: torch.dtype) -> torch.Tensor:
    if iu and iv:
        return (xu.unsqueeze(2) == xv.unsqueeze(1)).to(dtype)
    if iu:  # [n, Tv, P] gathered at ids [n, Tu] -> [n, Tu, Tv]
        xv = xv.to(dtype)
        return torch.gather(xv, 2, xu.unsqueeze(1).expand(-1, xv.shape[1], -1)).transpose(1, 2)
    if iv:
        xu = xu.to(dtype)
        return torch.gather(xu, 2, xv.unsqueeze(1).expand(-1, xu.shape[1], -1))
    return torch.bmm(xu.to(dtype), xv.to(dtype).transpose(1, 2))


def _pair_self(u: Use, v: Use, dtype: torch.dtype) -> torch.Tensor:
    if u.col is None and v.col is None:
        return (u.row.to(dtype).sum(1) * v.row.to(dtype).sum(1)).sum(-1)
    k = _batched_gram(u.row, u.row_index, v.row, v.row_index, dtype)
    k = k * _batched_gram(u.col, False, v.col, False, dtype)
    return k.sum(dim=(1, 2))
