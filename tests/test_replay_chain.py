"""The replay chain: kept checkpoints load back exactly, and tampering is named before use."""

from __future__ import annotations

import pytest
import torch

from attribution.errors import UserError
from attribution.train import chain
from tests.test_engine_helpers import VOCAB, tiny_gpt2


def _trained(seed: int = 0):
    model = tiny_gpt2(dtype=torch.float32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_link_round_trip_is_bitwise_and_hashes_are_recorded(tmp_path):
    model, opt = _trained()
    rng = torch.get_rng_state()
    link = chain.save_link(tmp_path, 20, model, opt, {"position": 60}, {"torch": rng}, keep_every=20)
    assert [lk.step for lk in chain.links(tmp_path)] == [20]
    assert chain.storage(tmp_path) == link.bytes > 0
    fresh, fresh_opt = _trained(seed=1)  # other weights and optimizer moments
    assert chain.deviation(fresh, link) > 0
    state = chain.load_link(link, fresh, fresh_opt)
    assert state["position"] == 60 and state["step"] == 20
    assert chain.deviation(fresh, link) == 0.0
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sorted(want) == sorted(got)
    for pid, entry in want.items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(got[pid][k])) for k, v in entry.items())
    assert torch.equal(state["rng"]["torch"], rng)


def test_an_altered_tensor_is_named_with_its_step(tmp_path):
    model, opt = _trained()
    link = chain.save_link(
        tmp_path, 4, model, opt, {"position": 8}, {"torch": torch.get_rng_state()}, keep_every=2
    )
    path = link.path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors.*step 4.*altered"):
        chain.load_link(link, model, opt)


def test_discard_after_drops_later_links_only(tmp_path):
    model, opt = _trained()
    for step in (0, 2, 4, 6):
        chain.save_link(
            tmp_path, step, model, opt, {"position": step}, {"torch": torch.get_rng_state()}, keep_every=2
        )
    (tmp_path / chain.REPLAY_DIR / ".step_0000008.tmp-123").mkdir()  # a link a kill interrupted
    chain.discard_after(tmp_path, 2)
    assert [lk.step for lk in chain.links(tmp_path)] == [0, 2]
    assert sorted(p.name for p in (tmp_path / chain.REPLAY_DIR).iterdir()) == [
        "chain.json",
        "step_0000000",
        "step_0000002",
    ]
