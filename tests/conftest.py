"""Shared fixtures: synthetic checkpoints are generated once per test session."""

from __future__ import annotations

import os

import pytest

from kimi_jax.storage.synth import synth_checkpoint


@pytest.fixture(scope="session", autouse=True)
def kimi_jax_cache(tmp_path_factory):
    """The JAX compilation cache and generated checkpoints of every test (and of the commands the tests
    start) go to pytest's temporary folder, never the user's cache or the system's /tmp; so does the
    cache tiktoken keeps of every ranks file it loads (the oracle tests load Kimi's). To keep the
    compiled programs across sessions (a faster second run), name a folder in $KIMI_JAX_TEST_CACHE."""
    kept = os.environ.get("KIMI_JAX_TEST_CACHE")
    path = kept or str(tmp_path_factory.mktemp("kimi-jax-cache"))
    settings = {"KIMI_JAX_CACHE": path, "TIKTOKEN_CACHE_DIR": str(tmp_path_factory.mktemp("tiktoken-cache"))}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield path
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def tiny_checkpoints(synth_dir):
    """The tiny preset in each real layout, same seed."""
    return {layout: synth_checkpoint(synth_dir / layout, "tiny", layout, seed=0)
            for layout in ("kimi-k2.5", "kimi-k2-fp8", "deepseek-v3", "hf-bf16")}  # fmt: skip


@pytest.fixture(scope="session")
def small_bundle(tiny_checkpoints, tmp_path_factory):
    """A 2-step proven run of the tiny K2.5 checkpoint: a bundle every verify check passes on."""
    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.run.plan import prepare_run
    from kimi_jax.run.runner import execute

    out = tmp_path_factory.mktemp("small-bundle") / "bundle"
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])}, "prompt": {"tokens": [7, 300]},
            "generate": {"max_new_tokens": 2}, "output": {"dir": str(out)}}  # fmt: skip
    execute(prepare_run(parse_manifest_dict(data, source=str(out.parent / "m.yaml"))), echo=lambda *_: None,
            progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def full_shape_checkpoint(kimi_jax_cache):
    """The full-shape K2.5 preset (a sparse 595 GB layout), generated once where manifests/full-shape.yaml
    finds it (the session's cache): tests of the layout and of the shipped manifest share it."""
    from kimi_jax.storage.synth import ensure_synthetic

    return ensure_synthetic("full-shape", "kimi-k2.5", 0)
