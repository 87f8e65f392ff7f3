from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def base(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"openai": {"schema": "openai"}, "anthropic": {"schema": "anthropic"}},
        "models": [{"name": "gpt-5.5", "provider": "openai"}],
    }
    cfg.update(over)
    return cfg


def test_shipped_config_loads() -> None:
    cfg = load_config(ROOT / "gateway.yaml")
    assert set(cfg.providers) == {"openai", "anthropic"}
    assert any(m.is_wildcard for m in cfg.models)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base(models=[{"name": "x", "provider": "opena"}]), "unknown provider 'opena' (known: anthropic, openai)"),
        (base(providers={}), "at least one provider"),
        (base(providers={"Open AI": {"schema": "openai"}}), "bad provider name"),
        (base(providers={"openai": {"schema": "gemini"}}), "providers.openai.schema"),
        (
            base(models=[{"name": "a", "provider": "openai"}, {"name": "b", "provider": "openai", "aliases": ["a"]}]),
            "defined twice",
        ),
        (base(models=[{"name": "openai/*", "provider": "openai", "upstream": "x"}]), "wildcard takes neither"),
        (base(models=[{"name": "a*b", "provider": "openai"}]), "bad model name"),
        (base(models=[{"name": "has space", "provider": "openai"}]), "bad model name"),
        (base(models=[{"name": "a", "provider": "openai", "aliases": ["b c"]}]), "bad alias"),
        (
            base(models=[{"name": "a", "provider": "openai", "upstrem": "b"}]),
            "models.0.upstrem: Extra inputs are not permitted",
        ),
        (base(server={"listen": "x", "max_message_bytes": 10}), "server.max_message_bytes"),
        ([1, 2], "expected a mapping"),
        (base(ledger={"consumer": False}), "ledger.consumer: false needs store.backend redis"),
        (base(ledger={"consumer": "sometimes"}), "ledger.consumer"),
    ],
)
def test_invalid_configs_say_what_is_wrong(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_yaml_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text("providers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_the_readme_config_example_is_valid() -> None:
    """The full example in the README is what operators copy: it must load as it is written
    (placeholders aside)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration: `gateway.yaml`", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    text = block.group(1).replace('"<64 hex chars: sha256 of the secret>"', '"' + "0" * 64 + '"')
    config = parse_config(yaml.safe_load(text))
    assert config.tenants["platform"].limits is not None
    assert config.limits.failure_mode == "open"


def test_ledger_consumer_defaults_on_and_can_be_moved_out_on_redis() -> None:
    assert parse_config(base()).ledger.consumer is True
    cfg = parse_config(base(store={"backend": "redis"}, ledger={"consumer": False}))
    assert cfg.ledger.consumer is False
