"""`python -m gpu_service models fetch|verify|list [ENGINE]`: the model store from the command line.

Settings come from the environment as for the service (AVATAR_MODEL_DIR, XTTS__MODEL_SUBDIR,
MODEL_MANIFESTS_DIR, TTS_ENGINES). Without ENGINE, fetch and verify take every configured engine
that has a manifest, list every manifest. Exit codes: 0 done, 1 a file failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from pydantic import ValidationError

from gpu_service.models.manifest import ManifestError
from gpu_service.models.store import FetchError, FileCheck, LicenseNotAccepted, ModelStore, human_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpu_service models",
                                     description="Fetch, verify and list the engines' weight files under AVATAR_MODEL_DIR.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    fetch = verbs.add_parser("fetch", help="download what is missing or corrupt (resumable), verify, install atomically")
    fetch.add_argument("engine", nargs="?", help="one engine (default: every configured engine with a manifest)")
    fetch.add_argument("--retries", type=int, default=3, help="resumes after an interrupted transfer (default 3)")
    fetch.add_argument("--accept-license", action="store_true",
                       help="accept the weights' licence (as its variable, e.g. COQUI_TOS_AGREED=1, does)")
    bar = fetch.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never draw it (default: on a terminal)")
    verify = verbs.add_parser("verify", help="check sizes and sha256 of the installed files")
    verify.add_argument("engine", nargs="?", help="one engine (default: every configured engine with a manifest)")
    verify.add_argument("--fast", action="store_true", help="sizes only (no file is read through)")
    ls = verbs.add_parser("list", help="each engine's files and their state (sizes, and digests already recorded)")
    ls.add_argument("engine", nargs="?", help="one engine (default: every manifest)")
    return parser


def _configured(settings) -> set[str]:
    return set(settings.tts_engines) | set(settings.video_engines) | set(settings.lipsync_engines)


def _engines(store: ModelStore, settings, engine: Optional[str], every: bool) -> list[str]:
    if engine:
        store.manifest(engine)  # ManifestError naming the known engines
        return [engine]
    if every:
        return sorted(store.manifests)
    configured = _configured(settings)
    return sorted(name for name in store.manifests if name in configured)


def _file_line(check: FileCheck) -> str:
    flag = " (optional)" if check.optional else ""
    detail = f"  {check.detail}" if check.detail else ""
    return f"  {check.state:<16}{check.name}{flag}  {human_size(check.expected_size)}{detail}"


def main(argv: list[str]) -> int:
    """Run one verb; print what it did, errors on stderr."""
    args = _parser().parse_args(argv)
    from gpu_service.settings import Settings, describe_error

    try:
        settings = Settings()
        store = ModelStore.from_settings(settings)
        engines = _engines(store, settings, args.engine, every=args.verb == "list")
    except ValidationError as exc:
        print(f"gpu_service models: {describe_error(exc)}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"gpu_service models: {exc}", file=sys.stderr)
        return 2
    if not engines:
        print("no configured engine has a manifest (TTS_ENGINES, VIDEO_ENGINES, LIPSYNC_ENGINES); nothing to do")
        return 0

    failed = False
    configured = _configured(settings)
    for engine in engines:
        manifest = store.manifest(engine)
        where = f"{store.label(engine)} = {store.engine_dir(engine)}"
        if args.verb == "list":
            total = sum(f.size or 0 for f in manifest.files)
            state = "configured" if engine in configured else "not configured"
            print(f"{engine} ({manifest.capability}, {state}): {manifest.title}")
            print(f"  in {where}, {human_size(total)} in {len(manifest.files)} files")
            if manifest.license:
                print(f"  licence: {manifest.license.name} <{manifest.license.url}>")
            for check in store.status(engine):
                print(_file_line(check))
        elif args.verb == "verify":
            checks = store.verify(engine, "size" if args.fast else "sha256")
            if not args.fast:
                store.record_hashed(engine, checks)
            bad = [c for c in checks if c.problem]
            print(f"{engine}: {'FAILED' if bad else 'ok'} ({'sizes only' if args.fast else 'sizes and sha256'}) in {where}")
            for check in checks:
                print(_file_line(check))
            if bad:
                failed = True
                print(f"{engine}: {len(bad)} file(s) failed; run `python -m gpu_service models fetch {engine}`",
                      file=sys.stderr)
        else:
            try:
                store.fetch(engine, progress=args.progress, retries=max(0, args.retries), accept_license=args.accept_license)
            except LicenseNotAccepted as exc:
                if args.engine:
                    print(f"gpu_service models: {exc}", file=sys.stderr)
                    failed = True
                else:  # a configured engine whose licence nobody accepted: the service runs without it
                    print(f"{engine}: skipped; {exc}", file=sys.stderr)
                continue
            except FetchError as exc:
                print(f"gpu_service models: {exc}", file=sys.stderr)
                failed = True
                continue
            print(f"{engine}: ready in {where}")
    return 1 if failed else 0
