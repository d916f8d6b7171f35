"""`attribution claim`: replay of a finished run gives the run's own values, verified at every kept link."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attribution.errors import UserError
from attribution.train import RunConfig, train_and_value
from attribution.workflows.claim import claim
from tests.train_fixtures import subprocess_env, torchrun, write_corpus, write_val


def _run(tmp_path, name: str, **kw) -> object:
    cfg = RunConfig(
        corpus=[str(tmp_path / "corpus.jsonl")],
        val={"a": str(tmp_path / "a.jsonl")},
        out=str(tmp_path / name),
        preset="test-micro",
        steps=6,
        seed=3,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        **{"reference": 4, **kw},
    )
    return train_and_value(cfg)


def _examples(run, val_set: str) -> pd.DataFrame:
    ev = pd.read_parquet(run / "example_values.parquet")
    ev = ev[ev["val_set"] == val_set].sort_values(["doc_id", "val_id"]).reset_index(drop=True)
    return ev[["doc_id", "val_id", "value", "value_normalized", "value_cosine"]]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claim")
    write_corpus(tmp)
    write_val(tmp, "a", 3)
    return tmp


@pytest.mark.parametrize(
    ("order", "aware", "dtype"),
    [(1, False, "float32"), (1, True, "float32"), (2, False, "float32"), (2, True, "float64")],
)
def test_replay_equals_in_run_bitwise(corpus_dir, tmp_path, order, aware, dtype):
    """In float64 the contract is 1e-9 relative; it is in fact bitwise here too, so one check serves both.
    The run computes the in-run cosines, so the replay does too (as the run did) and they match as well."""
    run = _run(
        corpus_dir,
        f"run{order}{aware}{dtype}",
        order=order,
        optimizer_aware=aware,
        dtype=dtype,
        in_run_cosine=True,
    )
    out = claim(run, corpus_dir / "a.jsonl", tmp_path / "claim", report=False, progress=False)
    got, want = _examples(out, "claims"), _examples(run, "a")
    assert len(want) > 0 and want["value_cosine"].notna().all()
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["claim"]["verified"] == "bitwise" and manifest["claim"]["replayed_steps"] == 6
    # the claims' checkpoint cosines (the default view's input) are the run's own for the same texts
    got, want = _checkpoint(out, "claims"), _checkpoint(run, "a")
    assert len(want) > 0 and np.abs(want.to_numpy()).max() > 0
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-9, atol=_cosine_atol(run, dtype))


def _checkpoint(run, val_set: str) -> pd.Series:
    t = pd.read_parquet(run / "checkpoint_values.parquet")
    return t[t["val_set"] == val_set].set_index(["doc_id", "val_id"])["checkpoint_cosine"].sort_index()


def _cosine_atol(run, dtype: str) -> float:
    """Unit vectors' dot products summed in another order: about sqrt(n_params) roundings of the dtype."""
    from safetensors.numpy import load_file

    n = sum(v.size for v in load_file(str(run / "replay" / "step_0000000" / "model.safetensors")).values())
    return 10 * np.sqrt(n) * float(np.finfo(dtype).eps)


@pytest.fixture(scope="module")
def base_run(corpus_dir):
    return _run(corpus_dir, "base")


def _texts(path, texts: dict[str, str]):
    with open(path, "w", encoding="utf-8") as fh:
        for k, v in texts.items():
            fh.write(json.dumps({"id": k, "text": v}) + "\n")
    return path


def _claims(corpus_dir) -> dict[str, str]:
    rows = [json.loads(line) for line in (corpus_dir / "corpus.jsonl").read_text().splitlines()]
    return {"c1": rows[0]["text"][:120], "c2": "the court held that the model must credit every owner"}


def test_a_claim_does_not_depend_on_the_other_claims(corpus_dir, tmp_path):
    """Structural independence, checked in float64: float32 sums over other groupings differ by rounding only."""
    from attribution.values.results import RunValues

    run = _run(corpus_dir, "base64", dtype="float64")
    alone = claim(
        run,
        _texts(tmp_path / "one.jsonl", {"c1": _claims(corpus_dir)["c1"]}),
        tmp_path / "one",
        report=False,
        progress=False,
    )
    more = {**_claims(corpus_dir), "c3": "news of the books and the authors", "c4": "reviewers read evidence"}
    both = claim(run, _texts(tmp_path / "all.jsonl", more), tmp_path / "all", report=False, progress=False)
    a = RunValues.read(alone).view().query("val_set == 'claims' and val_id == 'c1'").set_index("doc_id")
    b = RunValues.read(both).view().query("val_set == 'claims' and val_id == 'c1'").set_index("doc_id")
    assert len(a) > 0
    for col in ["value", "attribution"] if "attribution" in a.columns else ["value"]:
        x, y = a[col].sort_index().to_numpy(), b.loc[a.index, col].sort_index().to_numpy()
        np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-12 * np.abs(x).max())


def test_workers_and_targeted_replay_give_the_sequential_values(corpus_dir, base_run, tmp_path):
    texts = _texts(tmp_path / "c.jsonl", _claims(corpus_dir))
    seq = claim(base_run, texts, tmp_path / "seq", report=False, progress=False)
    par = claim(base_run, texts, tmp_path / "par", workers=2, report=False, progress=False)
    want = _examples(seq, "claims")
    pd.testing.assert_frame_equal(_examples(par, "claims"), want, check_exact=True)
    steps = pd.read_parquet(seq / "step_values.parquet")
    late = sorted(set(steps[steps.step > 4].doc_id) - set(steps[steps.step <= 4].doc_id))[:2]
    assert late, "some document is first trained in the last segment"
    tgt = claim(base_run, texts, tmp_path / "tgt", docs=late, report=False, progress=False)
    got = _examples(tgt, "claims")
    assert set(got.doc_id) == set(late)
    pd.testing.assert_frame_equal(got, want[want.doc_id.isin(late)].reset_index(drop=True), check_exact=True)
    info = json.loads((tgt / "manifest.json").read_text())["claim"]
    assert info["replayed_steps"] < 6 and info["targeted_docs"] == late
    got, full = _checkpoint(tgt, "claims"), _checkpoint(seq, "claims")
    assert set(got.index.get_level_values("doc_id")) == set(late)
    np.testing.assert_allclose(
        got.to_numpy(), full.loc[got.index].to_numpy(), atol=_cosine_atol(base_run, "float32")
    )


def test_kill_9_then_resume_gives_identical_values(corpus_dir, base_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    texts = _texts(tmp_path / "c.jsonl", _claims(corpus_dir))
    want = _examples(claim(base_run, texts, tmp_path / "ref", report=False, progress=False), "claims")
    out = tmp_path / "killed"
    code = (
        "import sys; from attribution.workflows.claim import claim; "
        "claim(sys.argv[1], sys.argv[2], sys.argv[3], report=False, progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(base_run), str(texts), str(out)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / ".segments").glob("*.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((out / ".segments").glob("*.json"))
    assert done and not (out / "example_values.parquet").exists(), "killed after a segment, before the merge"
    resumed = claim(base_run, texts, out, resume=True, report=False, progress=False)
    pd.testing.assert_frame_equal(_examples(resumed, "claims"), want, check_exact=True)


def test_a_resumed_replay_that_changes_the_in_run_cosine_choice_is_refused(
    corpus_dir, base_run, tmp_path, monkeypatch
):
    """The run skipped the in-run cosines (it has a checkpoint view); a replay may ask for them, but not
    halfway: segments with and without them would sum to a partial `value_cosine`."""
    from attribution.workflows import claim as claim_mod

    texts = _texts(tmp_path / "c.jsonl", _claims(corpus_dir))
    done = claim(base_run, texts, tmp_path / "c", report=False, progress=False, in_run_cosine=True)
    assert _examples(done, "claims")["value_cosine"].notna().all()
    assert _examples(base_run, "a")["value_cosine"].isna().all()

    def crash(*args, **kw):
        raise RuntimeError("killed before the merge")

    out = tmp_path / "halfway"
    with monkeypatch.context() as m:  # every segment replayed with the cosines, then a crash
        m.setattr(claim_mod, "_merge", crash)
        with pytest.raises(RuntimeError):
            claim(base_run, texts, out, report=False, progress=False, in_run_cosine=True)
    sorted((out / claim_mod.SEGMENTS_DIR).glob("*.json"))[-1].unlink()  # one segment to replay again
    with pytest.raises(UserError, match="some replayed segments have the in-run cosines and some do not"):
        claim(base_run, texts, out, resume=True, report=False, progress=False)


def test_tampered_checkpoint_and_changed_corpus_are_refused(corpus_dir, tmp_path):
    import shutil

    from attribution.train import chain

    local = tmp_path / "data"
    shutil.copytree(corpus_dir, local, ignore=shutil.ignore_patterns("base", "run*", "cache"))
    run = _run(local, "r")
    texts = _texts(tmp_path / "c.jsonl", _claims(local))
    link = chain.links(run)[2]
    data = bytearray((link.path / "model.safetensors").read_bytes())
    data[-5] ^= 0x10
    (link.path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"step {link.step}"):
        claim(run, texts, tmp_path / "o1", report=False, progress=False)
    assert not (tmp_path / "o1").exists()  # nothing half-written
    # the same alteration with the recorded hash forged too: the replay itself finds the divergence
    index = json.loads((run / chain.REPLAY_DIR / chain.INDEX).read_text())
    index["links"][str(link.step)]["sha256"]["model.safetensors"] = chain._sha256(
        link.path / "model.safetensors"
    )
    (run / chain.REPLAY_DIR / chain.INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"diverged from the run at step {link.step}"):
        claim(run, texts, tmp_path / "o1", report=False, progress=False)
    with open(local / "corpus.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "new", "text": "an added document"}) + "\n")
    with pytest.raises(UserError, match=r"corpus\.jsonl.*fingerprint.*differs"):
        claim(run, texts, tmp_path / "o2", report=False, progress=False)
    assert not (tmp_path / "o2").exists()


def test_bad_claims_file_and_run_without_chain(corpus_dir, base_run, tmp_path):
    from attribution.errors import BadInputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "fine"}\n{"id": "y", "txt": "no text field"}\n', encoding="utf-8")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2"):
        claim(base_run, bad, tmp_path / "o", report=False, progress=False)
    assert not (tmp_path / "o").exists()
    plain = _run(corpus_dir, "nochain", keep_every=0)
    with pytest.raises(UserError, match="--keep-every"):
        claim(
            plain, _texts(tmp_path / "c.jsonl", {"a": "text"}), tmp_path / "o3", report=False, progress=False
        )


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_give_the_sequential_values(corpus_dir, base_run, tmp_path):
    """`torchrun -m attribution.cli claim`: each rank replays its share of segments, rank 0 merges."""
    import subprocess

    texts = _texts(tmp_path / "c.jsonl", _claims(corpus_dir))
    want = _examples(claim(base_run, texts, tmp_path / "seq", report=False, progress=False), "claims")
    cmd = [
        *torchrun(),
        "-m",
        "attribution.cli",
        "claim",
        str(base_run),
        "--texts",
        str(texts),
        "--out",
        str(tmp_path / "two"),
    ]
    env = subprocess_env()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pd.testing.assert_frame_equal(_examples(tmp_path / "two", "claims"), want, check_exact=True)
    assert (tmp_path / "two" / "claims.html").is_file() and (tmp_path / "two" / "claims.md").is_file()
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["claim"]["workers"] == 2
