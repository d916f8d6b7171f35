"""The tied head's forward GEMM in blocks of vocabulary rows, on the CPU.

Why: `h @ W.T` with `W` of 50,257 rows writes one `[tokens, 50257]` block of logits in a single GEMM,
and this machine's BLAS runs that shape far below its rate: 46-53 GFLOP/s at d = 64 and 107-132 at
d = 768, against 173-197 for the model's other GEMMs. The same products in blocks of 512 vocabulary
rows run at 134-142 and 160-179 GFLOP/s, and on this machine gave the very same bits: each logit is
still one dot product over d, summed the same way (docs/benchmarks.md, "Session 17"). The backward is
two single GEMMs (`g @ W`, `g.T @ h`), whose inner dimensions (the vocabulary, the tokens) run at rate.

Only the forward's blocking changes; the module, its weight (tied to the embedding), its hooks and the
capture of its output gradient are those of the `nn.Linear` it wraps. Its custom `Function` is not
transformable by `torch.func` (vmap): nothing in the engine uses that on a run's model.
"""

from __future__ import annotations

import torch
from torch import nn

from attribution.engine.capture import weight_grads_needed

BLOCK_ROWS = 512  # vocabulary rows per GEMM: the fastest of 512-4096 for every shape measured


class _BlockedMatmul(torch.autograd.Function):
    """`x @ weight.T` computed in blocks of `weight`'s rows; the gradients of one GEMM each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, block: int) -> torch.Tensor:
        # a tensor of its own, not a view: the lean cross-entropy then turns it into its gradient in place
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        flat, rows = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        for lo in range(0, weight.shape[0], block):
            torch.mm(flat, weight[lo : lo + block].T, out=rows[:, lo : lo + block])
        ctx.weight_grad = weight_grads_needed()  # a validation pass wants the activations' gradients only
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = g.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] and ctx.weight_grad else None
        return gx, gw, None


class BlockedLinear(nn.Linear):
    """A bias-free `nn.Linear` whose forward runs in blocks of `BLOCK_ROWS` output rows. The engine's
    rule for `nn.Linear` applies to it (rules are looked up along the class's bases)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BlockedMatmul.apply(x, self.weight, BLOCK_ROWS)


def block_head(head: nn.Linear) -> nn.Linear:
    """Make `head` a `BlockedLinear` in place, so that its weight (tied to the embedding), its hooks and
    its place in the model stay what they are. For CPU models only: a GPU's GEMM has no such gap. A head
    with a bias, or with too few rows to block, is left as it is."""
    if type(head) is nn.Linear and head.bias is None and head.out_features > BLOCK_ROWS:
        head.__class__ = BlockedLinear
    return head
