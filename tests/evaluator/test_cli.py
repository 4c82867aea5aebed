"""`python -m evaluator` compare / gate / report / run argument handling, on real measured summaries."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest

from evaluator import gate
from evaluator.cli import main
from evaluator.compare import compare, render
from tests.evaluator.real_summaries import summary
from tests.helpers import REPO, free_port


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    """(good, late) summaries and their JSON files, rendered once per session."""
    render_dir = tmp_path_factory.getbasetemp() / "eval_render"
    os.makedirs(render_dir, exist_ok=True)
    good, late = summary(str(render_dir), "good"), summary(str(render_dir), "late")
    out = tmp_path_factory.mktemp("summaries")
    paths = out / "good.json", out / "late.json"
    paths[0].write_text(json.dumps(good))
    paths[1].write_text(json.dumps(late))
    return good, late, paths


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_compare_is_direction_aware(summaries):
    good, late, _ = summaries
    worse = compare(good, late)
    verdicts = {(c.scope, c.label): c.verdict for c in worse["changes"]}
    assert verdicts[("overall", "|A/V offset|")] == "worse"
    assert verdicts[("short/custom/warm", "A/V offset")] == "worse"
    better = compare(late, good)
    assert {(c.scope, c.label): c.verdict for c in better["changes"]}[("overall", "|A/V offset|")] == "better"
    # Lower latency is better, higher correlation is better: the same relative change, opposite verdicts.
    slower = copy.deepcopy(good)
    slower["speed"]["latency_p50_s"] *= 1.5
    slower["quality"]["lip_audio_corr"] *= 1.5
    got = {c.label: c for c in compare(good, slower)["changes"] if c.scope == "overall"}
    assert got["latency p50"].verdict == "worse" and got["lip-audio correlation"].verdict == "better"
    assert got["latency p50"].relative == pytest.approx(0.5)
    assert compare(good, good)["worse"] == 0 and compare(good, good)["better"] == 0


def test_compare_command_prints_what_changed_and_by_how_much(summaries):
    good, late, (a, b) = summaries
    res = _cli("compare", str(a), str(b))
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "|A/V offset|" in x)
    assert line.strip().startswith("WORSE")
    delta = late["quality"]["abs_av_offset_ms"] - good["quality"]["abs_av_offset_ms"]
    assert f"[{delta:+.4g}" in line
    assert render(compare(good, late), str(a), str(b)).splitlines()[0] == res.stdout.splitlines()[0]


def test_gate_names_the_misses_and_by_how_much(summaries, tmp_path):
    good, late, (a, b) = summaries
    cfg = gate.load_config()
    assert cfg["thresholds"]["av_offset_ms"] == {"max_abs": 40}
    result = gate.evaluate(late, cfg)
    offset = late["scenarios"][0]["quality"]["av_offset_ms"]
    miss = next(m for m in result["misses"] if m["metric"] == "av_offset_ms")
    assert miss["by"] == pytest.approx(abs(offset) - 40)
    for m in result["misses"]:  # every reported miss really is one
        q = late["scenarios"][0]["quality"][m["metric"]]
        assert (abs(q) > m["limit"]) if m["rule"] == "max_abs" else (q < m["limit"])
    res = _cli("gate", str(b))
    assert res.returncode == 1 and "short/custom/warm: av_offset_ms" in res.stdout and "by " in res.stdout
    loose = tmp_path / "loose.yaml"
    loose.write_text("thresholds:\n  av_offset_ms: {max_abs: 1000}\n  lip_audio_corr: {min: -1}\n")
    res = _cli("gate", str(b), "--config", str(loose))
    assert res.returncode == 0 and "passed" in res.stdout, res.stdout


def test_gate_fails_a_failed_scenario_and_ignores_a_skipped_one(summaries):
    good, _, _ = summaries
    broken = copy.deepcopy(good)
    broken["scenarios"][0].update(status="failed", reason="generation_failed: boom")
    result = gate.evaluate(broken, {"thresholds": {"lip_audio_corr": {"min": -1}}, "fail_on_failed_scenarios": True})
    assert not result["passed"] and "scenario failed (generation_failed: boom)" in result["misses"][0]["text"]
    only_skipped = {**good, "scenarios": [s for s in good["scenarios"] if s["status"] == "skipped"]}
    assert gate.evaluate(only_skipped, gate.load_config())["passed"]


@pytest.mark.parametrize("text, expect", [
    ("thresholds: {}\n", "non-empty 'thresholds'"),
    ("thresholds:\n  lip_audio_corr: {above: 0.4}\n", "must use only"),
    ("thresholds:\n  lip_audio_corr: {min: high}\n", "must be a number"),
    ("thresholds: [\n", "not valid YAML"),
])
def test_bad_gate_config_is_refused_with_the_reason(summaries, tmp_path, text, expect):
    _, _, (a, _) = summaries
    cfg = tmp_path / "gate.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=expect):
        gate.load_config(cfg)
    assert main(["gate", str(a), "--config", str(cfg)]) == 2


def test_not_a_summary_and_unreachable_services_exit_2(tmp_path, capsys):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"hello": 1}))
    assert main(["compare", str(other), str(other)]) == 2
    assert "not an evaluator summary" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.json"), str(other)]) == 2
    dead = f"http://127.0.0.1:{free_port()}"
    # No command at all means `run` (the Docker entrypoint); URLs then come from the environment.
    os.environ["GPU_SERVICE_URL"] = dead
    try:
        assert main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    finally:
        del os.environ["GPU_SERVICE_URL"]
    assert f"cannot reach the GPU service at {dead}" in capsys.readouterr().err


def test_unreadable_portrait_is_refused_before_any_request(tmp_path, capsys):
    bad = tmp_path / "portrait.png"
    bad.write_text("not an image")
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["run", "--portrait", str(bad), "--gpu-url", dead, "--runtime-url", dead, "--out", str(tmp_path)]) == 2
    assert f"--portrait {bad} is not an image" in capsys.readouterr().err


def test_report_command_rewrites_the_html(summaries, tmp_path):
    _, _, (a, _) = summaries
    assert main(["report", str(a), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").stat().st_size > 10_000 and list(tmp_path.glob("*.png"))


def test_evaluator_never_imports_torch_or_gpu_service():
    code = ("import sys, evaluator.cli, evaluator.runner, evaluator.report, evaluator.quality, evaluator.align, "
            "evaluator.compare, evaluator.gate; bad = [m for m in ('torch', 'gpu_service', 'runtime') if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_dockerfile_is_slim_installs_only_the_evaluator_and_copies_what_exists():
    text = (REPO / "evaluator" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert 'pip install -c requirements/lock.txt --no-build-isolation ".[evaluator]"' in text
    assert "gpu_service" not in text.split("COPY")[-1].split("RUN")[0]
    assert 'ENTRYPOINT ["python", "-m", "evaluator"]' in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    compose = (REPO / "docker-compose.yml").read_text()
    assert "dockerfile: evaluator/Dockerfile" in compose
    extra = re.search(r"^evaluator = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert "pyyaml" in extra and "tqdm" in extra and "matplotlib" in extra and "torch" not in extra
