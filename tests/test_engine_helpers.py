"""Shared tiny models and batches for the engine tests (no tests in this file)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 31


def tiny_gpt2(
    *,
    dtype: torch.dtype = torch.float64,
    tied: bool = True,
    eager: bool = False,
    seed: int = 0,
    n_embd: int = 16,
    vocab: int = VOCAB,
) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 with dropout 0 (tied wte/lm_head unless told otherwise)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        **({"attn_implementation": "eager"} if eager else {}),
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases, so their rules matter
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def ragged_batch(n: int, t: int, *, seed: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a right-padded mask with different lengths (>= 3 real tokens each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids, mask


def assert_same_values(got, want) -> None:
    """Two engines' step values agree in float64 (`got`, `want`: lists of StepValues over the sets "each",
    per example, and "whole"), to a tolerance from the values' scale."""
    import numpy as np

    for a, b in zip(got, want, strict=True):
        scale = float(np.abs(b.per_example["each"]).max())
        assert scale > 0
        np.testing.assert_allclose(
            a.per_example["each"], b.per_example["each"], rtol=1e-10, atol=1e-12 * scale
        )
        for name in ("each", "whole"):
            np.testing.assert_allclose(a.per_set[name], b.per_set[name], rtol=1e-10, atol=1e-12 * scale)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the largest reference entry."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and the machine's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
