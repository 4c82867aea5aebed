"""Throughput of the runtime with one and with two GPU services: seconds of video made per wall second.

Starts two GPU services (Piper and the landmark talking head on the CPU, each with its default one
slot per engine) and two runtimes as processes on free ports: one runtime lists only the first
service, the other lists both (GPU_SERVICE_URLS; placement by free slots and avatar affinity under
bounded load). A batch is N jobs submitted at once to one runtime (synchronous submits, one
thread each, so nothing polls); its wall time runs from the first submit to the last job finished, and its throughput is the video seconds of the batch over
that time. Batches alternate between the two set-ups, so a change in the machine's load weighs on
both alike; the medians and their ratio (two over one) are printed, with the load average.

On a machine whose CPU cores are all the "GPUs", a second service takes CPU from the first: the
ratio says how much of the parallelism the extra service buys, not what a second GPU would.

    .venv/bin/python benchmarks/bench_scaleout.py [--runs 5] [--jobs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import free_port, stop_process, wait_ready  # noqa: E402

TEXTS = (
    "The morning train leaves at seven. It stops at every station on the line.",
    "Our library opens late on Thursdays. Bring your card to borrow up to ten books.",
    "The forecast says rain this afternoon. Take an umbrella if you go out.",
    "Lunch is served in the main hall. Today there is soup, bread and a green salad.",
)


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A service process with its own session (stopped as a group), its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def batch(url: str, jobs: int, tag: str) -> tuple[float, float]:
    """Submit `jobs` jobs at once (synchronous submits, one thread each: the runtime answers the moment a job
    ends, so nothing polls) and wait for all; (video seconds made, wall seconds)."""
    with httpx.Client(base_url=url, timeout=900) as http:
        def one(i: int) -> float:
            resp = http.post("/api/v1/generate", json={"text": TEXTS[i % len(TEXTS)], "avatar_id": "astronaut"},
                             headers={"X-Request-ID": f"bench-{tag}-{i}"})
            if resp.status_code != 200:
                raise RuntimeError(f"job {i} of {tag}: {resp.status_code} {resp.text[:300]}")
            return resp.json()["duration_s"]

        started = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            video_s = sum(pool.map(one, range(jobs)))
        return video_s, time.perf_counter() - started


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="batches per set-up (alternated)")
    parser.add_argument("--jobs", type=int, default=12, help="jobs per batch, submitted at once")
    parser.add_argument("--worker-threads", type=int, default=4, help="jobs each runtime runs at the same time")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaleout_"))
    load_before = os.getloadavg()
    procs: list[subprocess.Popen] = []
    gpu_urls, waits = [], []
    try:
        for name in ("g1", "g2"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _start([sys.executable, "-m", "gpu_service"],
                          {"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp / name), "TTS_ENGINES": "piper",
                           "LIPSYNC_ENGINES": "", "DEVICE": "cpu", "LOG_LEVEL": "warning"}, tmp / f"{name}.log")
            procs.append(proc)
            gpu_urls.append(url)
            waits.append((url, proc))
        for url, proc in waits:
            wait_ready(f"{url}/ready", 300, proc)
        runtimes = {}
        for name, urls in (("one", gpu_urls[:1]), ("two", gpu_urls)):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _start([sys.executable, "-m", "runtime"],
                          {"HOST": "127.0.0.1", "PORT": str(port), "GPU_SERVICE_URLS": ",".join(urls),
                           "DATA_DIR": str(tmp / f"rt_{name}"), "RUNTIME_API_KEYS": "", "REDIS_URL": "",
                           "DATABASE_URL": "", "OUTPUT_STORE": "local", "WORKER_THREADS": str(args.worker_threads),
                           "GPU_HEALTH_INTERVAL_S": "0.5", "LOG_LEVEL": "warning"}, tmp / f"rt_{name}.log")
            procs.append(proc)
            wait_ready(f"{url}/ready", 120, proc)
            runtimes[name] = url
        for name, url in runtimes.items():  # warm-up: both services have rendered the avatar, pools are open
            batch(url, 2, f"warm-{name}")
        results: dict[str, list[tuple[float, float]]] = {"one": [], "two": []}
        for run in range(args.runs):
            for name in ("one", "two") if run % 2 == 0 else ("two", "one"):
                results[name].append(batch(runtimes[name], args.jobs, f"{name}-{run}"))
                video_s, wall_s = results[name][-1]
                print(f"  run {run + 1} {name} service{'s' if name == 'two' else ''}: {video_s:.2f} s of video in "
                      f"{wall_s:.2f} s = {video_s / wall_s:.3f} video s per s", flush=True)
        placed = {row["service"]: row["placed"] for row in httpx.get(f"{runtimes['two']}/health", timeout=30).json()["gpu_services"]}
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    load_after = os.getloadavg()
    rates = {name: [v / w for v, w in runs] for name, runs in results.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians["two"] / medians["one"]
    paired = statistics.median(t / o for o, t in zip(rates["one"], rates["two"]))
    print(f"throughput, {args.jobs} jobs per batch ({args.worker_threads} at a time per runtime), {args.runs} batches "
          f"per set-up, {os.cpu_count()} CPU cores")
    print("  load average before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(
        *load_before, *load_after))
    for name in ("one", "two"):
        r = rates[name]
        print(f"  {name} GPU service{'s' if name == 'two' else ''}: median {medians[name]:.3f} video s per s   "
              f"min {min(r):.3f}   max {max(r):.3f}")
    print("  chunks placed by the two-service runtime: " + ", ".join(f"{k} {v}" for k, v in placed.items()))
    print(f"  two / one: {ratio:.3f} (medians), {paired:.3f} (median of the paired batches)")
    print("  CPU-bound here: both services share this machine's cores with the runtimes (and whatever else runs),")
    print("  so a second service adds parallel slots but no compute; on separate GPUs it would add both.")
    print(json.dumps({"jobs": args.jobs, "runs": args.runs, "cpu_cores": os.cpu_count(),
                      "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
                      "one": {"median": round(medians["one"], 4), "all": [round(x, 4) for x in rates["one"]]},
                      "two": {"median": round(medians["two"], 4), "all": [round(x, 4) for x in rates["two"]]},
                      "two_over_one": round(ratio, 4), "paired_ratio_median": round(paired, 4), "placed_two": placed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
