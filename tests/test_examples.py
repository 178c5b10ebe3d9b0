"""The configs the README and examples/ show are valid, so a newcomer can copy them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from drainbus.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("examples/**/*.toml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every example config passes validation."""
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "example-token")
    settings = load_settings(path)
    assert settings.server.listen


def test_readme_toml_blocks_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```toml block in the README and docs/ is a valid (partial) drainbus config."""
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "example-token")
    token_file = tmp_path / "token"
    token_file.write_text("example-token\n")
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)]
    assert len(blocks) >= 6
    for block in blocks:
        text = block.replace("/etc/drainbus/cloudflare-token", str(token_file))
        config = tmp_path / "block.toml"
        config.write_text(text)
        load_settings(config)
