"""The quality gate: thresholds from a YAML file applied to every measured scenario of a summary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config" / "quality_gate.yaml"
RULES = ("max_abs", "min", "max")


@dataclass
class Miss:
    """One threshold one scenario did not meet, and by how much."""

    scenario: str
    metric: str
    value: Optional[float]
    rule: str
    limit: float
    by: Optional[float]

    def describe(self) -> str:
        """A line for people: which scenario, which figure, the limit and the shortfall."""
        if self.metric == "status":
            return f"{self.scenario}: scenario failed ({self.rule})"
        shown = "|value|" if self.rule == "max_abs" else "value"
        op = "<=" if self.rule in ("max_abs", "max") else ">="
        return (f"{self.scenario}: {self.metric} = {self.value:.4g} misses {shown} {op} {self.limit:g} "
                f"by {self.by:.4g}")


def load_config(path: Optional[Path] = None) -> dict:
    """Read and check a gate config; a bad file is a ValueError naming the problem."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read gate config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"gate config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict) or not data["thresholds"]:
        raise ValueError(f"gate config {path} needs a non-empty 'thresholds' mapping")
    for metric, rule in data["thresholds"].items():
        if not isinstance(rule, dict) or not rule or set(rule) - set(RULES):
            raise ValueError(f"gate config {path}: threshold {metric!r} must use only {', '.join(RULES)}")
        for key, limit in rule.items():
            if not isinstance(limit, (int, float)) or isinstance(limit, bool):
                raise ValueError(f"gate config {path}: {metric}.{key} must be a number, got {limit!r}")
    data.setdefault("fail_on_failed_scenarios", True)
    return data


def _check(value: float, rule: str, limit: float) -> Optional[float]:
    """Shortfall (> 0) when the value misses the rule, else None."""
    if rule == "max_abs":
        over = abs(value) - limit
    elif rule == "max":
        over = value - limit
    else:
        over = limit - value
    return over if over > 1e-12 else None


def evaluate(summary: dict, config: dict) -> dict:
    """Apply the gate; returns {passed, misses: [..], unmeasured: [..], checked: n} (JSON-ready)."""
    misses: list[Miss] = []
    unmeasured: list[str] = []
    checked = 0
    for rec in summary.get("scenarios", []):
        if rec.get("status") == "failed" and config.get("fail_on_failed_scenarios", True):
            misses.append(Miss(rec["name"], "status", None, rec.get("reason") or "failed", 0.0, None))
            continue
        quality = rec.get("quality")
        if not quality:
            continue
        for metric, rules in config["thresholds"].items():
            value = quality.get(metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                unmeasured.append(f"{rec['name']}: {metric}")
                continue
            for rule, limit in rules.items():
                checked += 1
                by = _check(float(value), rule, float(limit))
                if by is not None:
                    misses.append(Miss(rec["name"], metric, float(value), rule, float(limit), by))
    return {
        "passed": not misses,
        "checked": checked,
        "misses": [{**m.__dict__, "text": m.describe()} for m in misses],
        "unmeasured": unmeasured,
        "thresholds": config["thresholds"],
    }
