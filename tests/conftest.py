"""Test configuration shared by every test.

* Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here, before anything
  imports triton (triton reads it when a kernel is decorated). Interpreted kernels are slow: keep shapes small.
* `@pytest.mark.gpu` tests need CUDA and are skipped without it; run them with `pytest -m gpu`.
* `device` is "cuda" when a GPU is present, else "cpu"; kernel tests put their tensors there.
* Tests live in per-package folders without __init__.py, so test file basenames must be unique.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
assert "triton" not in sys.modules or torch.cuda.is_available(), "triton was imported before TRITON_INTERPRET was set"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh random inputs, but a failure prints the seed that reproduces it."""
    seed = int.from_bytes(os.urandom(4), "little") if "SEALONG_TEST_SEED" not in os.environ else int(os.environ["SEALONG_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\nreproduce with SEALONG_TEST_SEED={seed}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
