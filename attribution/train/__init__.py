"""`attribution run`: train GPT-2 on a corpus while valuing every document against validation sets.

Python use::

    from attribution.train import RunConfig, train_and_value
    run_dir = train_and_value(RunConfig(corpus=["builtin"], val={"rewrites": "val.jsonl"}, out="runs/x",
                                        preset="cpu-tiny", steps=200, order=1, optimizer="adamw", seed=0))

The run directory's files are described in docs/architecture.md ("Run directory") and in
`attribution.train.store`.
"""

from attribution.train.config import RunConfig, build_config, load_toml
from attribution.train.presets import PRESETS


def train_and_value(cfg: RunConfig, **kwargs):
    """Train and value (see `attribution.train.loop.train_and_value`); imported lazily to keep torch out of --help."""
    from attribution.train.loop import train_and_value as _run

    return _run(cfg, **kwargs)


__all__ = ["PRESETS", "RunConfig", "build_config", "load_toml", "train_and_value"]
