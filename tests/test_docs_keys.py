"""The reference is complete: every key `sdlora config-help` prints is named, by its dotted path, in docs/ or README."""

from pathlib import Path

from sdlora.config import describe_keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented_by_its_dotted_path():
    keys = [line.split(" = ")[0] for line in describe_keys().splitlines() if " = " in line and not line.startswith(" ")]
    assert len(keys) > 100 and "reg.preservation.trigger_words" in keys and "log.tracker" in keys
    text = "\n".join(p.read_text(encoding="utf-8") for p in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"])
    missing = [k for k in keys if f"`{k}" not in text]  # `key` or `key: value` in backticks, not a bare substring
    assert not missing, f"keys without documentation: {missing}"


def test_config_help_lists_the_allowed_values_of_every_choice_key():
    """A key whose type is a Literal (also Optional[Literal]) shows its choices, so nobody learns them from an error."""
    lines = {line.split(" = ")[0]: line for line in describe_keys().splitlines() if " = " in line and not line.startswith(" ")}
    assert lines["optim.scheduler"].endswith("(one of: constant, cosine, linear)"), lines["optim.scheduler"]
    assert "(one of: epsilon, v_prediction)" in lines["model.prediction_type"]  # Optional[Literal[...]]
    assert "one of" not in lines["lora.rank"]  # an int: no choices
