"""Session-wide pytest fixtures: the synthetic assets, built once per test session.

Tests must treat these folders as read-only (copy what you want to change into `tmp_path`).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports prefect or huggingface_hub: Prefect's cache records and database live in a
# throwaway home, and no test may reach the network (the Hub client fetches telemetry otherwise).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="neva-prefect-home-")
atexit.register(functools.partial(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The embedded server starts in ~15 s here, far longer when the shared cores are busy (the default is 20 s).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from neva_core.fixtures import Fixtures, make_fixtures  # noqa: E402
from neva_core.tokenizer import TokenizerExtension, extend_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def neva_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """The default fixtures (seed 0, 64 pretraining images of 64 px, tiny LLaMA and CLIP, tokenizer)."""
    return make_fixtures(tmp_path_factory.mktemp("neva-fixtures"), seed=0)


@pytest.fixture(scope="session")
def neva_tokenizer(neva_fixtures: Fixtures, tmp_path_factory: pytest.TempPathFactory) -> TokenizerExtension:
    """The fixture tokenizer extended with NeVA's <extra_id_0>..<extra_id_7> (ids 384..391, vocab 392)."""
    out: Path = tmp_path_factory.mktemp("neva-tokenizer") / "extended"
    return extend_tokenizer(neva_fixtures.tokenizer_model, out)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2ForCausalLM whose tokenizer is a byte-level BPE tokenizer.json (403 ids, no tokenizer.model)."""
    from neva_core.fixtures import write_tiny_qwen2
    from neva_core.fixtures.datasets import tokenizer_corpus

    return write_tiny_qwen2(tmp_path_factory.mktemp("neva-qwen2") / "tiny-qwen2", tokenizer_corpus(), seed=7)
