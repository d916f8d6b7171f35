"""The GPU scripts (benchmarks/gpu_engine.sh, gpu_floor.sh) run only where a device is lent, a few
minutes a session: a script broken by an API change would waste that time. Their Python runs here on the
CPU instead (the exactness check with `.cuda()` removed, the overhead benchmark with every mode and flag
they use), and the shell scripts must parse."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["gpu_engine.sh", "gpu_floor.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_gpu_script_parses_and_calls_existing_benchmarks(name) -> None:
    script = ROOT / "benchmarks" / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    for called in set(re.findall(r"benchmarks/(\w+\.py)", script.read_text())):
        assert (ROOT / "benchmarks" / called).is_file(), called


def test_gpu_engine_exactness_check_runs_on_the_cpu(tmp_path) -> None:
    text = (ROOT / "benchmarks" / "gpu_engine.sh").read_text()
    body = text.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    code = tmp_path / "exactness.py"
    code.write_text(body.replace(".cuda()", ""))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [float(x) for x in re.findall(r"max rel err ([0-9.e+-]+)", out.stdout)]
    assert len(errors) == 8 and max(errors[:4]) < 1e-12 and max(errors[4:]) < 1e-4, out.stdout
    corr = float(re.search(r"bf16 vs fp32 values: corr ([0-9.e+-]+)", out.stdout).group(1))
    assert corr > 0.99


def test_engine_overhead_runs_every_mode_and_flag_the_gpu_scripts_use(tmp_path, capsys) -> None:
    path = ROOT / "benchmarks" / "engine_overhead.py"
    spec = importlib.util.spec_from_file_location("engine_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(
        [
            *("--model", "cpu-tiny", "--batch", "2", "--seq-len", "16", "--val-seqs", "2", "--val-len", "8"),
            *("--reps", "1", "--warmup", "0", "--modes", "plain,order1,order2,aware,vmap"),
            *(
                "--per-example",
                "--grad-norms",
                "--plan",
                "--profile",
                "3",
                "--json",
                str(tmp_path / "o.json"),
            ),
        ]
    )
    err = capsys.readouterr().err
    assert res["failed"] == {} and res["per_example"] is True and res["grad_norms"] is True
    assert set(res["ratio"]) == {"order1", "order2", "aware", "vmap"} and min(res["ratio"].values()) > 0
    assert "## profile: order1" in err and "## profile: vmap" in err
    assert (tmp_path / "o.json").is_file()
    faults = res["minor_page_faults"]  # one count per counted step and mode, never negative
    assert set(faults) == {"plain", "order1", "order2", "aware", "vmap"}
    assert all(len(f) == 1 and f[0] >= 0 for f in faults.values())
