"""Backend resolution: API keys from the environment or a Prefect Secret, never written out."""

from __future__ import annotations

from pathlib import Path

import pytest

from booksmith.generation.backends import BackendError, api_key, model_name, open_endpoint
from booksmith.schemas.config import EmbeddedSettings, GenerationSettings


def test_key_from_environment_and_clear_error_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = GenerationSettings(backend="openai", model="gpt-x", api_key_env="BK_TEST_KEY")
    monkeypatch.delenv("BK_TEST_KEY", raising=False)
    with pytest.raises(BackendError, match="BK_TEST_KEY"):
        api_key(settings)
    monkeypatch.setenv("BK_TEST_KEY", "sk-from-env")
    assert api_key(settings) == "sk-from-env"
    with open_endpoint(settings, EmbeddedSettings()) as endpoint:
        assert endpoint.api_key == "sk-from-env"
        assert "sk-from-env" not in repr(endpoint)
    local = GenerationSettings(backend="openai", model="m", base_url="http://127.0.0.1:1/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert api_key(local) == "not-needed"  # local servers usually take no key


def test_model_name_defaults() -> None:
    assert model_name(GenerationSettings()) == "SmolLM2-135M-Instruct"
    with pytest.raises(BackendError, match=r"generation\.model"):
        model_name(GenerationSettings(backend="openai"))


@pytest.mark.slow
def test_key_from_a_prefect_secret_never_reaches_the_outputs(
    prefect_api: str, tmp_path: Path, write_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    from booksmith.flows.nightly import nightly
    from tests.conftest import fake_backend_config
    from tests.fakeserver import FakeServer

    planted = "sk-booksmith-test-0123456789abcdef"
    Secret(value=planted).save("booksmith-test-key", overwrite=True)
    settings = GenerationSettings(backend="openai", model="m", api_key_secret="booksmith-test-key")
    assert api_key(settings) == planted
    with FakeServer() as server:
        cfg = fake_backend_config(
            server.base_url, tmp_path / "out", api_key_secret="booksmith-test-key"
        )
        cfg["plan"]["limit"] = 3
        version = Path(nightly(config=str(write_config(cfg))))
    assert (version / "manifest.json").exists()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert planted.encode() not in path.read_bytes(), path
