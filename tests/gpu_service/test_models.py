"""The verified model store: fetch, resume, checksums, verify, list and the start-up check.

Every download comes from a threaded http.server on 127.0.0.1 serving files the test makes (with
HTTP Range, and switches to cut a transfer mid-file or serve altered bytes); nothing reaches
outside this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from gpu_service.models import cli
from gpu_service.models.manifest import LOCAL_MANIFEST, ManifestError, load_manifests, parse_manifest
from gpu_service.models.store import FetchError, ModelStore
from gpu_service.settings import Settings
from tests.helpers import REPO


class FileServer:
    """Serves `files` by path over HTTP/1.1 on 127.0.0.1, honouring `Range: bytes=N-`; records every GET."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None, int]] = []
        """(path, Range header, bytes sent) of each GET."""
        self.drop_after: dict[str, int] = {}
        """path -> bytes to send before cutting the connection (once)."""
        self.corrupt: dict[str, int] = {}
        """path -> how many answers carry one altered byte."""
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = server.files.get(self.path)
                rng = self.headers.get("Range")
                if body is None:
                    server.requests.append((self.path, rng, 0))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.corrupt.get(self.path):
                    server.corrupt[self.path] -= 1
                    body = bytearray(body)
                    body[len(body) // 2] ^= 0xFF
                    body = bytes(body)
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        server.requests.append((self.path, rng, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                data = body[start:]
                self.send_response(206 if start or (rng and not server.ignore_range) else 200)
                if rng and not server.ignore_range:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    server.requests.append((self.path, rng, cut))
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees a short read
                    self.close_connection = True
                    return
                self.wfile.write(data)
                server.requests.append((self.path, rng, len(data)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def gets(self, path: str) -> list[tuple[str, str | None, int]]:
        """The GETs of one path."""
        return [r for r in self.requests if r[0] == path]


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


MODEL = _bytes(3 * 1024 * 1024 + 123, 1)
CONFIG = json.dumps({"model": "tiny", "layers": 2}).encode()
EXTRA = _bytes(50_000, 2)


@pytest.fixture
def server():
    srv = FileServer({"/m/model.bin": MODEL, "/m/config.json": CONFIG, "/m/extra.bin": EXTRA})
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _write_manifest(directory: Path, url: str, engine: str = "demo", license_env: str | None = None,
                    files: list[dict] | None = None, capability: str = "tts", subdir: str = "demo_v1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = files if files is not None else [
        {"name": "config.json", "size": len(CONFIG), "sha256": hashlib.sha256(CONFIG).hexdigest(), "url": f"{url}/m/config.json"},
        {"name": "model.bin", "size": len(MODEL), "sha256": hashlib.sha256(MODEL).hexdigest(), "url": f"{url}/m/model.bin"},
        {"name": "extra.bin", "size": len(EXTRA), "sha256": None, "url": f"{url}/m/extra.bin", "optional": True},
    ]
    data = {"engine": engine, "capability": capability, "title": f"{engine} test weights", "dir": subdir, "files": files}
    if license_env:
        data["license"] = {"name": "Test Model License", "url": "https://example.invalid/licence", "accept_env": license_env}
    path = directory / f"{engine}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def store(tmp_path, server) -> ModelStore:
    _write_manifest(tmp_path / "manifests", server.url)
    return ModelStore(tmp_path / "models", load_manifests(tmp_path / "manifests"))


def _fetch(store: ModelStore, engine: str = "demo", **kw):
    lines: list[str] = []
    kw.setdefault("retry_wait_s", 0.0)
    kw.setdefault("progress", False)
    result = store.fetch(engine, say=lines.append, **kw)
    return result, lines


# -- fetch -------------------------------------------------------------------------------------------
def test_fetch_installs_verified_files_once(store, server):
    checks, _ = _fetch(store)
    assert {c.name: c.state for c in checks} == {"config.json": "ok", "model.bin": "ok", "extra.bin": "unverified"}
    target = store.engine_dir("demo")
    assert (target / "model.bin").read_bytes() == MODEL and (target / "config.json").read_bytes() == CONFIG
    assert not list(target.glob("*.part"))
    assert [r[1] for r in server.requests] == [None, None, None]  # whole files, no ranges
    record = json.loads((store.root / LOCAL_MANIFEST).read_text())
    files = record["engines"]["demo"]["files"]
    assert files["model.bin"]["sha256"] == hashlib.sha256(MODEL).hexdigest() and files["model.bin"]["size"] == len(MODEL)
    assert files["extra.bin"]["sha256"] == hashlib.sha256(EXTRA).hexdigest()  # recorded though none is published

    checks, lines = _fetch(store)
    assert len(server.requests) == 3, "a second fetch downloads nothing"
    assert all("already present" in line for line in lines) and len(lines) == 3


def test_an_interrupted_transfer_resumes_from_the_part_file(store, server):
    server.drop_after["/m/model.bin"] = 1_500_000
    with pytest.raises(FetchError) as info:
        _fetch(store, retries=0)
    msg = str(info.value)
    assert "model.bin" in msg and "interrupted" in msg and "model.bin.part is kept" in msg
    target = store.engine_dir("demo")
    part = target / "model.bin.part"
    have = part.stat().st_size
    assert 0 < have <= 1_500_000 and part.read_bytes() == MODEL[:have]
    assert not (target / "model.bin").exists(), "nothing unverified under the final name"

    checks, _ = _fetch(store, retries=0)
    gets = server.gets("/m/model.bin")
    assert len(gets) == 2 and gets[1][1] == f"bytes={have}-" and gets[1][2] == len(MODEL) - have
    assert (target / "model.bin").read_bytes() == MODEL and not part.exists()
    assert next(c for c in checks if c.name == "model.bin").state == "ok"


def test_a_dropped_connection_is_resumed_within_one_fetch(store, server):
    server.drop_after["/m/model.bin"] = 2_000_000
    _, lines = _fetch(store, retries=2)
    gets = server.gets("/m/model.bin")
    assert len(gets) == 2 and gets[1][1] is not None and gets[1][1].startswith("bytes=")
    assert any("interrupted" in line and "resuming (1/2)" in line for line in lines)
    assert (store.engine_dir("demo") / "model.bin").read_bytes() == MODEL


def test_a_server_that_ignores_ranges_sends_the_whole_file_again(store, server):
    server.ignore_range = True
    server.drop_after["/m/model.bin"] = 1_000_000
    _fetch(store, retries=1)
    gets = server.gets("/m/model.bin")
    assert len(gets) == 2 and gets[1][2] == len(MODEL)  # answered 200 with everything; the part was restarted
    assert (store.engine_dir("demo") / "model.bin").read_bytes() == MODEL


def test_a_checksum_mismatch_is_downloaded_afresh_once_then_refused(store, server):
    server.corrupt["/m/model.bin"] = 2
    with pytest.raises(FetchError) as info:
        _fetch(store)
    msg = str(info.value)
    bad = bytearray(MODEL)
    bad[len(bad) // 2] ^= 0xFF
    assert f"expected {hashlib.sha256(MODEL).hexdigest()}, got {hashlib.sha256(bytes(bad)).hexdigest()}" in msg
    assert "model.bin: sha256 mismatch" in msg and "downloaded twice" in msg
    assert len(server.gets("/m/model.bin")) == 2, "one fresh download, no more"
    target = store.engine_dir("demo")
    assert not (target / "model.bin").exists() and not (target / "model.bin.part").exists()
    record = json.loads((store.root / LOCAL_MANIFEST).read_text())
    assert "model.bin" not in record["engines"]["demo"]["files"]


def test_one_bad_download_is_cured_by_the_fresh_one(store, server):
    server.corrupt["/m/model.bin"] = 1
    _, lines = _fetch(store)
    assert len(server.gets("/m/model.bin")) == 2
    assert any("sha256 mismatch" in line and "afresh once" in line for line in lines)
    assert (store.engine_dir("demo") / "model.bin").read_bytes() == MODEL


def test_a_wrong_size_from_the_server_is_refused(tmp_path, server):
    server.files["/m/model.bin"] = MODEL + b"tail"
    _write_manifest(tmp_path / "manifests", server.url)
    store = ModelStore(tmp_path / "models", load_manifests(tmp_path / "manifests"))
    with pytest.raises(FetchError, match=rf"model\.bin: size mismatch: expected {len(MODEL)} bytes, got {len(MODEL) + 4}"):
        _fetch(store)
    assert not (store.engine_dir("demo") / "model.bin.part").exists()


def test_a_corrupt_installed_file_is_fetched_again(store, server):
    _fetch(store)
    path = store.engine_dir("demo") / "model.bin"
    path.write_bytes(MODEL[:-1] + b"\x00")
    _, lines = _fetch(store)
    assert any("model.bin is on disk but sha256-mismatch" in line for line in lines)
    assert path.read_bytes() == MODEL and len(server.gets("/m/model.bin")) == 2


def test_http_errors_name_the_file_and_url(tmp_path, server):
    files = [{"name": "gone.bin", "size": 10, "sha256": None, "url": f"{server.url}/m/nothing-here"}]
    _write_manifest(tmp_path / "manifests", server.url, files=files)
    store = ModelStore(tmp_path / "models", load_manifests(tmp_path / "manifests"))
    with pytest.raises(FetchError, match=rf"gone\.bin: HTTP 404 from {server.url}/m/nothing-here"):
        _fetch(store)


def test_a_licence_must_be_accepted_before_downloading(tmp_path, server, monkeypatch):
    _write_manifest(tmp_path / "manifests", server.url, license_env="TEST_MODEL_TOS")
    store = ModelStore(tmp_path / "models", load_manifests(tmp_path / "manifests"))
    monkeypatch.delenv("TEST_MODEL_TOS", raising=False)
    with pytest.raises(FetchError, match=r"Test Model License .*set TEST_MODEL_TOS=1"):
        _fetch(store)
    assert server.requests == []
    monkeypatch.setenv("TEST_MODEL_TOS", "1")
    _fetch(store)
    assert (store.engine_dir("demo") / "model.bin").read_bytes() == MODEL


# -- verify and list -----------------------------------------------------------------------------------
def test_verify_detects_a_flipped_byte_and_fast_mode_checks_sizes(store):
    _fetch(store)
    path = store.engine_dir("demo") / "model.bin"
    assert all(not c.problem for c in store.verify("demo"))
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: only the bytes tell
    check = next(c for c in store.verify("demo") if c.name == "model.bin")
    assert check.state == "sha256-mismatch" and check.problem
    assert check.detail == f"expected {hashlib.sha256(MODEL).hexdigest()}, got {hashlib.sha256(bytes(data)).hexdigest()}"
    fast = next(c for c in store.verify("demo", "size") if c.name == "model.bin")
    assert fast.state == "size-ok" and not fast.problem  # sizes only: a flipped byte is not its business
    path.write_bytes(bytes(data[:-10]))
    fast = next(c for c in store.verify("demo", "size") if c.name == "model.bin")
    assert fast.state == "size-mismatch" and fast.detail == f"expected {len(MODEL)} bytes, got {len(MODEL) - 10}"


def test_a_file_without_a_published_digest_is_unverified_but_watched(store):
    _fetch(store)
    extra = next(c for c in store.verify("demo") if c.name == "extra.bin")
    assert extra.state == "unverified" and not extra.problem and "unchanged since fetched" in extra.detail
    path = store.engine_dir("demo") / "extra.bin"
    path.write_bytes(EXTRA[:-1] + bytes([EXTRA[-1] ^ 1]))
    extra = next(c for c in store.verify("demo") if c.name == "extra.bin")
    assert extra.state == "changed" and extra.problem


@pytest.fixture
def cli_env(tmp_path, server, monkeypatch):
    """The environment the CLI reads its settings from: the test's manifests and model folder."""
    _write_manifest(tmp_path / "manifests", server.url)
    monkeypatch.setenv("AVATAR_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("MODEL_MANIFESTS_DIR", str(tmp_path / "manifests"))
    monkeypatch.setenv("TTS_ENGINES", "piper")
    return tmp_path


def _lines(out: str) -> dict[str, str]:
    """`  <state>  <name>...` lines of list/verify output, by file name."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in ("config.json", "model.bin", "extra.bin"):
            found[parts[1]] = parts[0]
    return found


def test_cli_list_fetch_verify(cli_env, server, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "demo (tts, not configured): demo test weights" in out and "$AVATAR_MODEL_DIR/demo_v1" in out
    assert _lines(out) == {"config.json": "missing", "model.bin": "missing", "extra.bin": "missing"}
    assert "extra.bin (optional)" in out

    # Without an engine, fetch takes the configured engines only: demo is not one.
    assert cli.main(["fetch", "--no-progress"]) == 0
    assert server.requests == [] and "nothing to do" in capsys.readouterr().out

    server.drop_after["/m/model.bin"] = 1_000_000
    assert cli.main(["fetch", "demo", "--retries", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "model.bin: download interrupted" in err
    assert cli.main(["list", "demo"]) == 0
    out = capsys.readouterr().out
    assert _lines(out) == {"config.json": "ok", "model.bin": "partial", "extra.bin": "unverified"}
    assert "in model.bin.part; fetch resumes it" in out

    assert cli.main(["fetch", "demo", "--no-progress"]) == 0
    assert "demo: ready in $AVATAR_MODEL_DIR/demo_v1" in capsys.readouterr().out
    assert cli.main(["verify", "demo"]) == 0
    assert _lines(capsys.readouterr().out) == {"config.json": "ok", "model.bin": "ok", "extra.bin": "unverified"}

    path = cli_env / "models" / "demo_v1" / "model.bin"
    path.write_bytes(MODEL[:-1] + b"!")
    assert cli.main(["verify", "demo", "--fast"]) == 0
    assert cli.main(["verify", "demo"]) == 1
    captured = capsys.readouterr()
    assert _lines(captured.out.split("demo: FAILED")[1])["model.bin"] == "sha256-mismatch"
    assert "run `python -m gpu_service models fetch demo`" in captured.err
    assert cli.main(["list", "demo"]) == 0
    # list reads no file through: same size, new time, so the digest is not claimed any more
    assert _lines(capsys.readouterr().out)["model.bin"] == "size-ok"

    assert cli.main(["verify", "nope"]) == 2
    assert "no manifest for engine 'nope'; engines with manifests: demo" in capsys.readouterr().err


def test_python_m_gpu_service_models_list_runs_as_a_process(cli_env):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "gpu_service", "models", "list", "demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _lines(done.stdout) == {"config.json": "missing", "model.bin": "missing", "extra.bin": "missing"}
    bad = subprocess.run([sys.executable, "-m", "gpu_service", "modles"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage: python -m gpu_service [models" in bad.stderr


# -- manifests --------------------------------------------------------------------------------------
def test_the_shipped_xtts_manifest_describes_the_release():
    from gpu_service.speech.engines.xtts import REQUIRED_FILES, SPEAKERS_FILE

    manifests = load_manifests()
    xtts = manifests["xtts"]
    assert xtts.capability == "tts" and xtts.dir == Settings().xtts.model_subdir == "xtts_v2"
    names = {f.name for f in xtts.files}
    assert set(REQUIRED_FILES) | {SPEAKERS_FILE} == names
    assert [f.name for f in xtts.files if f.optional] == [SPEAKERS_FILE]
    assert xtts.file("model.pth").size == 1867929118
    for f in xtts.files:
        assert f.url == f"https://huggingface.co/coqui/XTTS-v2/resolve/main/{f.name}"
        assert f.size and f.size > 0 and (f.sha256 is None or len(f.sha256) == 64)
    assert xtts.license is not None and xtts.license.accept_env == "COQUI_TOS_AGREED"


@pytest.mark.parametrize("change, message", [
    ({"sha256": "ABC"}, "'sha256' must be 64 lowercase hex digits or null"),
    ({"name": "../escape"}, "must be a plain file name"),
    ({"url": "file:///etc/passwd"}, "'url' must be http(s)"),
    ({"size": "12"}, "'size' must be int"),
    ({"sizes": 12}, "unknown keys ['sizes']"),
    ({"optional": "false"}, "'optional' must be true or false"),
])
def test_a_malformed_manifest_names_the_field(tmp_path, change, message):
    entry = {"name": "a.bin", "size": 1, "sha256": None, "url": "https://example.invalid/a.bin", **change}
    with pytest.raises(ManifestError) as info:
        parse_manifest({"engine": "e", "capability": "tts", "title": "t", "dir": "e", "files": [entry]}, tmp_path / "e.json")
    assert message in str(info.value) and "e.json: files[0]" in str(info.value)


# -- the start-up check --------------------------------------------------------------------------------
def _registry_settings(tmp_path: Path, verify: str = "size") -> Settings:
    return Settings(device="cpu", tts_engines=["xtts"], default_tts_engine="xtts", video_engines=[], lipsync_engines=[],
                    avatar_model_dir=tmp_path / "models", model_manifests_dir=tmp_path / "manifests",
                    data_dir=tmp_path / "data", model_verify=verify, warmup=False)


def _xtts_entry(settings: Settings):
    from gpu_service.registry import EngineRegistry

    entry = EngineRegistry.from_settings(settings).speech["xtts"]
    entry.load(warmup=False)
    return entry


XTTS_FILES = {"/x/config.json": CONFIG, "/x/model.pth": MODEL, "/x/vocab.json": EXTRA}


def _xtts_manifest(tmp_path: Path, server: FileServer, files: dict[str, bytes] = XTTS_FILES) -> None:
    server.files.update(files)
    _write_manifest(tmp_path / "manifests", server.url, engine="xtts", subdir="xtts_v2", files=[
        {"name": path.rsplit("/", 1)[1], "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "url": server.url + path} for path, data in files.items()])


def test_start_up_refuses_corrupt_weights_and_says_what_to_run(tmp_path, server, caplog):
    _xtts_manifest(tmp_path, server)
    settings = _registry_settings(tmp_path)
    store = ModelStore.from_settings(settings)
    _fetch(store, "xtts")
    model = store.engine_dir("xtts") / "model.pth"

    entry = _xtts_entry(settings)  # verified: the engine itself reads them (and finds random bytes)
    assert not entry.loaded and "failed verification" not in (entry.reason or "")

    model.write_bytes(MODEL + b"x")
    with caplog.at_level(logging.ERROR, logger="gpu_service.models"):
        entry = _xtts_entry(settings)
    assert not entry.loaded and entry.settled
    assert entry.reason.startswith("xtts weights in $AVATAR_MODEL_DIR/xtts_v2 failed verification: "
                                   f"model.pth: size-mismatch (expected {len(MODEL)} bytes, got {len(MODEL) + 1})")
    assert "Run `python -m gpu_service models fetch xtts`" in entry.reason and str(tmp_path) not in entry.reason
    logged = [r for r in caplog.records if r.getMessage().startswith("model file failed verification")]
    assert logged and logged[0].run == "python -m gpu_service models fetch xtts" and logged[0].file == "model.pth"

    # Same size, one byte off: sizes pass it to the engine; MODEL_VERIFY=sha256 refuses it.
    model.write_bytes(MODEL[:-1] + b"\x00")
    assert "failed verification" not in (_xtts_entry(settings).reason or "")
    strict = _xtts_entry(_registry_settings(tmp_path, "sha256"))
    assert "model.pth: sha256-mismatch (expected " in strict.reason
    assert "failed verification" not in (_xtts_entry(_registry_settings(tmp_path, "off")).reason or "")


def test_missing_weights_keep_the_engines_own_message(tmp_path, server):
    _xtts_manifest(tmp_path, server)
    entry = _xtts_entry(_registry_settings(tmp_path))
    assert not entry.loaded and "put the XTTS-v2 files in $AVATAR_MODEL_DIR/xtts_v2/" in entry.reason
    assert "python -m gpu_service models fetch xtts" in entry.reason


@pytest.mark.xtts
def test_a_release_checkpoint_rewritten_by_coqui_still_verifies_on_the_next_start(tmp_path, server):
    """coqui-tts rewrites a released model.pth (its config pickled) as a plain dict on the first load; the
    store records what it became, so the next start-up (sha256 included) loads it instead of refusing it."""
    pytest.importorskip("TTS", reason="coqui-tts (the `xtts` extra) is not installed")
    import torch
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import _legacy_safe_globals

    from tests.gpu_service.xtts_fixture import build_tiny_xtts

    built = build_tiny_xtts(tmp_path / "built")
    config = XttsConfig()
    config.load_json(str(built / "config.json"))
    checkpoint = torch.load(built / "model.pth", weights_only=True)
    checkpoint["config"] = config
    with _legacy_safe_globals():  # pickled under the class paths of the released file
        torch.save(checkpoint, built / "model.pth")
    files = {f"/x/{name}": (built / name).read_bytes() for name in ("config.json", "model.pth", "vocab.json")}
    _xtts_manifest(tmp_path, server, files)
    settings = _registry_settings(tmp_path, "sha256")
    store = ModelStore.from_settings(settings)
    _fetch(store, "xtts")
    model = store.engine_dir("xtts") / "model.pth"

    first = _xtts_entry(settings)
    assert first.loaded, first.reason
    assert model.read_bytes() != files["/x/model.pth"], "coqui-tts rewrote the checkpoint"
    record = json.loads((store.root / LOCAL_MANIFEST).read_text())["engines"]["xtts"]["files"]["model.pth"]
    assert record["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["replaces"] == f"{len(files['/x/model.pth'])}:{hashlib.sha256(files['/x/model.pth']).hexdigest()}"

    second = _xtts_entry(settings)
    assert second.loaded, second.reason
    assert next(c for c in store.verify("xtts") if c.name == "model.pth").state == "ok"
    _, lines = _fetch(store, "xtts")
    assert any("model.pth already present (ok)" in line for line in lines)
    assert len(server.gets("/x/model.pth")) == 1, "the rewritten file is not fetched again"


def test_the_progress_bar_goes_to_stderr(store, capsys):
    _fetch(store, progress=True)
    captured = capsys.readouterr()
    assert "model.bin:" in captured.err and "/3.00M" in captured.err and captured.out == ""


def test_a_configured_engine_under_an_unaccepted_licence_is_skipped_not_failed(tmp_path, server, monkeypatch, capsys):
    _write_manifest(tmp_path / "manifests", server.url, license_env="TEST_MODEL_TOS")
    monkeypatch.delenv("TEST_MODEL_TOS", raising=False)
    monkeypatch.setenv("AVATAR_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("MODEL_MANIFESTS_DIR", str(tmp_path / "manifests"))
    # "demo" stands for a configured engine (no real engine has that name to put in TTS_ENGINES)
    monkeypatch.setattr(cli, "_configured", lambda settings: {"piper", "demo"})
    assert cli.main(["fetch", "--no-progress"]) == 0
    assert "demo: skipped; demo: its weights come under the Test Model License" in capsys.readouterr().err
    assert cli.main(["fetch", "demo", "--no-progress"]) == 1, "asked for by name, it is an error"
    assert server.requests == []
    assert cli.main(["fetch", "demo", "--no-progress", "--accept-license"]) == 0
    assert len(server.requests) == 3
