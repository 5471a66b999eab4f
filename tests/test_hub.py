"""Hub sources with the download layer patched: revision pins, offline mode and the Hub's errors, on
huggingface-hub 0.3x (legacy stack) and 1.x/2.x (current stack) alike. No test reaches the network."""

from __future__ import annotations

import pytest
from conftest import make_tiny
from slimformer.converter.errors import SlimformerError
from slimformer.converter.source import resolve_source


def _hub_error(name: str) -> Exception:
    """An instance of huggingface_hub's error ``name`` without its constructor, whose signature differs between
    releases (1.x requires an HTTP response)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    error = cls.__new__(cls)
    Exception.__init__(error, f"{name} raised by the patched download")
    return error


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Patch snapshot_download to serve a tiny local model and record how it was called."""
    import huggingface_hub

    served = make_tiny("llama", tmp_path / "hub-snapshot")
    calls: list[dict] = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        if isinstance(fake_hub_state.get("raise"), Exception):
            raise fake_hub_state["raise"]
        return str(served)

    fake_hub_state: dict = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls, fake_hub_state


def test_revision_pin_reaches_the_download(fake_hub):
    calls, _ = fake_hub
    source = resolve_source("some-org/some-model@0123abc")
    assert source.is_hub and source.config["model_type"] == "llama"
    assert calls == [
        {
            "repo_id": "some-org/some-model",
            "revision": "0123abc",
            "local_files_only": False,
            "allow_patterns": calls[0]["allow_patterns"],
        }
    ]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in calls[0]["allow_patterns"]), (
        "pickles stay unfetched"
    )


def test_offline_mode_reads_only_the_cache(fake_hub, monkeypatch):
    calls, _ = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_source("some-org/some-model")
    assert calls[0]["local_files_only"] is True and calls[0]["revision"] is None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "does not exist, is private, or is gated"),
        ("GatedRepoError", "HF_TOKEN"),
        ("RevisionNotFoundError", "has no revision 'v9'"),
        ("LocalEntryNotFoundError", "not in the local cache"),
    ],
)
def test_hub_errors_are_one_line_with_a_fix(fake_hub, error, expected):
    _, state = fake_hub
    state["raise"] = _hub_error(error)
    with pytest.raises(SlimformerError) as info:
        resolve_source("some-org/some-model@v9")
    assert expected in info.value.message and info.value.fix
    assert "\n" not in info.value.message
