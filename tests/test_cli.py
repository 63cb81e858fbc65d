"""The command line: every flag of the previous release still parses the same way."""

from __future__ import annotations

import json
from pathlib import Path

from cli_spec import parser_specs

from covidray.cli import build_parser

SNAPSHOT = Path(__file__).parent / "data" / "cli_flags.json"


def test_no_flag_changed_or_disappeared() -> None:
    """tests/data/cli_flags.json is every command's flags before the CLI was derived from the
    config models; each must still exist with the same type, arity and choices."""
    before = json.loads(SNAPSHOT.read_text())
    now = parser_specs(build_parser())
    changed = {
        f"{cmd} {flag}": (spec, now.get(cmd, {}).get(flag))
        for cmd, flags in before.items()
        for flag, spec in flags.items()
        if now.get(cmd, {}).get(flag) != spec
    }
    assert not changed, changed


def test_secrets_never_become_flags() -> None:
    specs = parser_specs(build_parser())
    assert not [f for flags in specs.values() for f in flags if "pseudonym" in f or "key" in f]


def test_flags_build_the_config_over_yaml(tmp_path: Path) -> None:
    from covidray.cli.flags import config_from_args
    from covidray.config import IngestConfig
    from covidray.gan.config import GanConfig

    path = tmp_path / "ingest.yaml"
    path.write_text("size: 128\nsplit: {seed: 5, fractions: [0.6, 0.2, 0.2]}\n")
    args = build_parser().parse_args(
        ["ingest", "in", "out", "--config", str(path), "--seed", "7", "-v"]
    )
    cfg = config_from_args(IngestConfig, args)
    assert (cfg.src, cfg.dest, cfg.size, cfg.split.seed) == ("in", "out", 128, 7)
    assert cfg.split.fractions == (0.6, 0.2, 0.2) and args.verbose

    args = build_parser().parse_args(
        ["gan", "train", "--data", "d", "--out", "o", "--from", "pneumonia", "--source", "a,b"]
    )
    gan = config_from_args(GanConfig, args)
    assert gan.domain_a == "pneumonia" and gan.domain_b == "covid"
    assert gan.filter_a.source == gan.filter_b.source == ["a", "b"]
    assert gan.filter_a.age_group == ["adult"]  # the default of the field not given
