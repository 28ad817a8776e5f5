"""Fixtures shared by all test packages: the fake OpenAI-compatible server and the broker plugin."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.fakes.openai_server import FakeOpenAI

# CI replays the same property-test examples on every run (a failure there is reproducible);
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# MiniLM vectors of a test session go to a folder of its own (core.embedding_cache), never the
# user's cache: a run starts from nothing and leaves nothing; workers the tests start inherit it.
_EMBEDDINGS = tempfile.mkdtemp(prefix="gplr-test-embeddings-")
os.environ["GPLR_EMBEDDING_CACHE"] = _EMBEDDINGS
atexit.register(shutil.rmtree, _EMBEDDINGS, True)

# One embedded Kafka broker per session for streams/, recsys/ and deploy/ tests.
pytest_plugins = ["tests.kafka_fixtures"]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A fresh fake chat-completions server (own port, empty script, keyword answers by default)."""
    with FakeOpenAI() as fake:
        yield fake
