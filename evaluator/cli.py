"""Command line: `python -m evaluator run|compare|gate|report|reenact`.

Flags mirror environment variables (RUNTIME_URL, GPU_SERVICE_URL, RUNTIME_API_KEY, EVAL_SUITE,
EVAL_OUT_DIR) so the Docker image runs a suite with no arguments at all. Exit codes: 0 done
(and gate passed), 1 the quality gate failed, 2 bad usage, bad input or a service out of reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("evaluator")

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from evaluator.metrics.judges import JUDGES

    p = argparse.ArgumentParser(prog="python -m evaluator", description="Benchmark and quality evaluation of the avatar stack.")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a suite against live services and write the summary and report")
    run.add_argument("--runtime-url", default=os.environ.get("RUNTIME_URL", "http://127.0.0.1:8000"))
    run.add_argument("--gpu-url", default=os.environ.get("GPU_SERVICE_URL", "http://127.0.0.1:8001"))
    run.add_argument("--suite", choices=("quick", "full"), default=os.environ.get("EVAL_SUITE", "quick"))
    run.add_argument("--out", type=Path, default=Path(os.environ.get("EVAL_OUT_DIR", "eval_reports")))
    run.add_argument("--portrait", type=Path, default=None, help="custom portrait file (default: skimage astronaut)")
    run.add_argument("--preset-dir", type=Path, default=Path(os.environ.get("PRESET_AVATARS_DIR", "preset_avatars")),
                     help="local copy of the preset avatars (<id>/portrait.jpg), to measure identity of presets")
    run.add_argument("--api-key", default=os.environ.get("RUNTIME_API_KEY"), help="runtime API key (X-API-Key)")
    run.add_argument("--gpu-pid", type=int, default=None, help="GPU service pid, for /proc peak memory")
    run.add_argument("--runtime-pid", type=int, default=None, help="runtime pid, for /proc peak memory")
    run.add_argument("--gate", action="store_true", help="exit 1 when a scenario misses a quality threshold")
    run.add_argument("--gate-config", type=Path, default=None, help="thresholds YAML (default: evaluator/config/quality_gate.yaml)")
    run.add_argument("--no-videos", action="store_true", help="delete downloaded videos after measuring them")
    run.add_argument("--markdown", type=Path, default=None, help="also write the headline figures as Markdown here")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmp_ = sub.add_parser("compare", help="what changed between two summaries, better or worse, by how much")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    cmp_.add_argument("--all", action="store_true", help="list unchanged figures too")
    gate = sub.add_parser("gate", help="apply the quality gate to an existing summary")
    gate.add_argument("summary", type=Path)
    gate.add_argument("--config", type=Path, default=None)
    rep = sub.add_parser("report", help="(re)write report.html and its PNGs from a summary")
    rep.add_argument("summary", type=Path)
    rep.add_argument("--out", type=Path, default=None, help="folder (default: the summary's own)")
    ree = sub.add_parser("reenact", help="drive talking head and lip-sync with real clips, measure the mouths against them")
    ree.add_argument("clips", type=Path, nargs="+", help="real clips of a person speaking (video with its own audio)")
    ree.add_argument("--gpu-url", default=os.environ.get("GPU_SERVICE_URL", "http://127.0.0.1:8001"))
    ree.add_argument("--out", type=Path, default=Path(os.environ.get("EVAL_OUT_DIR", "eval_reports")) / "reenact")
    ree.add_argument("--judge", choices=JUDGES, default=None,
                     help="landmark model (default mediapipe; mediapipe-468 is the unrefined mesh the realism issue measured with; dlib is independent of the renderer)")
    ree.add_argument("--modes", default="head,lipsync", help="comma-separated: head, lipsync")
    ree.add_argument("--cross", action="store_true",
                     help="also re-voice each clip with the next clip's audio (catches a lip-sync that passes its source through)")
    ree.add_argument("--gate", action="store_true", help="exit 1 when a clip misses a reenact threshold")
    ree.add_argument("--gate-config", type=Path, default=None, help="thresholds YAML (its `reenact` section)")
    return p


def load_summary(path: Path) -> dict:
    """Read a summary JSON written by `run`; a clear ValueError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("avatar-eval/") or "scenarios" not in data:
        raise ValueError(f"{path} is not an evaluator summary (no avatar-eval schema)")
    return data


def _print_gate(result: dict, out=sys.stdout) -> None:
    if result["passed"]:
        print(f"Quality gate passed ({result['checked']} checks).", file=out)
    else:
        print(f"Quality gate FAILED: {len(result['misses'])} miss(es) in {result['checked']} checks", file=out)
        for m in result["misses"]:
            print(f"  - {m['text']}", file=out)
    if result["unmeasured"]:
        print(f"  not measured: {', '.join(result['unmeasured'])}", file=out)


def cmd_run(args) -> int:
    """Run the suite, write summary_report_<timestamp>.json, report.html (+PNGs), optionally gate."""
    from tqdm import tqdm

    from evaluator import gate as gate_mod
    from evaluator.report import markdown_summary, write_report
    from evaluator.runner import RunConfig, Runner

    gate_cfg = gate_mod.load_config(args.gate_config) if (args.gate or args.gate_config) else gate_mod.load_config()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(runtime_url=args.runtime_url, gpu_url=args.gpu_url, suite=args.suite, out_dir=args.out,
                    portrait_path=args.portrait, api_key=args.api_key, gpu_pid=args.gpu_pid,
                    runtime_pid=args.runtime_pid, keep_videos=not args.no_videos,
                    preset_dir=args.preset_dir if args.preset_dir.is_dir() else None)
    runner = Runner(cfg)
    try:
        try:
            plan, env = runner.plan()
        except Exception as exc:  # noqa: BLE001 - any reason the GPU service cannot be asked is a usage problem
            print(f"error: cannot reach the GPU service at {args.gpu_url}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        bar = tqdm(total=sum(s.steps() for s in plan), unit="step", desc=f"{args.suite} suite",
                   disable=args.no_progress, file=sys.stderr)

        def progress(n: int, name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(n)

        runner.progress = progress
        summary = runner.run(plan, env)
        bar.close()
    finally:
        runner.close()
    summary["gate"] = gate_mod.evaluate(summary, gate_cfg)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"summary_report_{stamp}.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    html_path = write_report(summary, args.out)
    md = markdown_summary(summary)
    (args.out / "summary.md").write_text(md)
    if args.markdown:
        args.markdown.write_text(md)
    print(md)
    print(f"summary: {path}\nreport:  {html_path}")
    _print_gate(summary["gate"])
    return EXIT_GATE if (args.gate and not summary["gate"]["passed"]) else EXIT_OK


def cmd_compare(args) -> int:
    """Print the direction-aware differences of two summaries."""
    from evaluator.compare import compare, render

    result = compare(load_summary(args.before), load_summary(args.after))
    print(render(result, str(args.before), str(args.after), show_same=args.all))
    return EXIT_OK


def cmd_gate(args) -> int:
    """Gate an existing summary; exit 1 on a miss."""
    from evaluator import gate as gate_mod

    result = gate_mod.evaluate(load_summary(args.summary), gate_mod.load_config(args.config))
    _print_gate(result)
    return EXIT_OK if result["passed"] else EXIT_GATE


def cmd_report(args) -> int:
    """Rewrite the HTML report of a summary."""
    from evaluator.report import write_report

    summary = load_summary(args.summary)
    print(write_report(summary, args.out or args.summary.parent))
    return EXIT_OK


def cmd_reenact(args) -> int:
    """Self-reenactment on real clips (evaluator.reenact); writes reenact_summary.json/.md, optionally gates."""
    from evaluator.reenact import markdown, run

    summary = run(args.clips, args.gpu_url, args.out, args.judge, [m.strip() for m in args.modes.split(",") if m.strip()],
                  args.gate_config, cross=args.cross)
    print(markdown(summary, with_gate=False))
    print(f"summary: {args.out / 'reenact_summary.json'}")
    _print_gate(summary["gate"])
    return EXIT_GATE if (args.gate and not summary["gate"]["passed"]) else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; with no command it runs a suite (what the Docker image does)."""
    # MediaPipe's C++ side logs to stderr through glog/absl; keep the progress bar readable.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    from avatar_contracts.logs import setup_logging

    setup_logging(os.environ.get("LOG_LEVEL", "warning"))
    try:
        return {"run": cmd_run, "compare": cmd_compare, "gate": cmd_gate, "report": cmd_report,
                "reenact": cmd_reenact}[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
