"""Shared test settings: everything offline, deterministic, gentle on a 2-core machine and its disk."""

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_MODULE_FAILED = "__pytest_module_failed__"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        setattr(item.module, _MODULE_FAILED, True)
    return report


@pytest.fixture(scope="module", autouse=True)
def _free_module_disk(request, tmp_path_factory):
    """Remove what a module's tests wrote once the module is done, unless one of its tests failed.

    The runs that a module's tests share (checkpoints, replay chains, indexes) take hundreds of
    MB each; kept to the end of the session they add up to several GB, which a nearly full disk
    does not have. A session that passes leaves nothing (`tmp_path_retention_policy = "failed"`).
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if getattr(request.module, _MODULE_FAILED, False):
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
