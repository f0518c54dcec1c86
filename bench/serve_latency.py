"""Serving latency: a full classify request through gradio_client vs the raw model forward.

On this machine, for an efficientnet_b3 champion at 300 px (random weights: latency does not
depend on them), measured in one run:

- raw: the eager PyTorch forward of the same network, batch 1, fp32, on a ready tensor;
- request: `Client.predict(handle_file(jpeg), api_name="/classify")` against the app started
  as `skinsense serve` on a model folder with its ONNX export (what a registered version
  holds), i.e. upload + queue + JPEG decode + preprocessing + ONNX Runtime + JSON back.
  Measured with two clients: `Client(url, ssl_verify=False)`, right for the plain-HTTP URL
  of a local app, and the default `Client(url)`, which builds a TLS context (certifi's CA
  bundle, about 21 ms here) for each of its HTTP calls even when the URL is http://;
- throughput: 8 clients (ssl_verify=False) in threads, each sending requests back to back.

The target compares the ssl_verify=False request with the raw forward: the TLS contexts are
the client library's cost on a connection that uses no TLS, not the service's.

Usage: python bench/serve_latency.py [--requests 40] [--record]   (--record appends to
bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

import torch

ARCH, SIZE = "efficientnet_b3", 300
RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "## Serving latency (bench/serve_latency.py)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def interleaved_ms(model_dir: Path, url: str, image: Path, n: int) -> dict[str, list[float]]:
    """Raw forwards and full requests (both clients), alternated so all see the same load."""
    from gradio_client import Client, handle_file

    from skinsense.packaging import load_model_dir

    model, _ = load_model_dir(model_dir)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    clients = {"request": Client(url, verbose=False, ssl_verify=False),
               "request_default_client": Client(url, verbose=False)}
    times: dict[str, list[float]] = {"raw": [], **{name: [] for name in clients}}
    with torch.inference_mode():
        for i in range(n + 3):
            start = time.perf_counter()
            model(x)
            elapsed = {"raw": time.perf_counter() - start}
            for name, client in clients.items():
                start = time.perf_counter()
                client.predict(handle_file(str(image)), api_name="/classify")
                elapsed[name] = time.perf_counter() - start
            if i >= 3:  # warm-up
                for name, seconds in elapsed.items():
                    times[name].append(seconds * 1000)
    return times


def start_app(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           "SKINSENSE_SERVE_CONFIG": json.dumps({"reload_interval_s": 0})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinsense.cli", "serve", "--model-uri", str(model_dir),
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return process, url, json.loads(r.read())
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the app did not start:\n{log_path.read_text()[-2000:]}")


def throughput(url: str, images: list[Path], clients: int, per_client: int) -> float:
    from gradio_client import Client, handle_file

    barrier = threading.Barrier(clients + 1)
    errors: list[Exception] = []

    def work(i: int) -> None:
        client = Client(url, verbose=False, ssl_verify=False)
        barrier.wait()
        for j in range(per_client):
            try:
                client.predict(handle_file(str(images[(i + j) % len(images)])),
                               api_name="/classify")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed under load: {errors[0]}")
    return clients * per_client / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()

    from skinsense.export import export_onnx
    from skinsense.models import build_model
    from skinsense.packaging import ModelCard, save_model_dir
    from skinsense.serving.app import example_images

    images = example_images()
    with tempfile.TemporaryDirectory(prefix="skinsense-bench-") as tmp:
        model_dir = save_model_dir(build_model(ARCH, image_size=SIZE),
                                   ModelCard(arch=ARCH, image_size=SIZE), Path(tmp) / "model")
        export_onnx(model_dir)
        process, url, state = start_app(model_dir, Path(tmp) / "app.log")
        try:
            times = interleaved_ms(model_dir, url, images[0], args.requests)
            rps = throughput(url, images, 8, args.per_client)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)

    names = {
        "raw": "raw eager PyTorch forward, batch 1, fp32, tensor ready (bench process)",
        "request": f"full /classify request, gradio_client `ssl_verify=False` (app backend: "
                   f"{state['backend']})",
        "request_default_client": "the same request, default gradio_client (a TLS context "
                                  "built per HTTP call)",
    }
    rows = [(names[k], statistics.median(v), percentile(v, 95)) for k, v in times.items()]
    ratio = rows[1][1] / rows[0][1]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"{ARCH} at {SIZE} px, random weights; {machine}; torch {torch.__version__}; "
        f"{date.today().isoformat()}; {args.requests} timed rounds (one raw forward, then one "
        f"request with each client, alternated so all see the same machine load) after 3 "
        f"warm-up rounds; "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| measurement | p50 ms | p95 ms |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {p50:.1f} | {p95:.1f} |" for name, p50, p95 in rows],
        f"| request p50 / raw forward p50 | {ratio:.2f} | |",
        f"| default-client request p50 / raw forward p50 | {rows[2][1] / rows[0][1]:.2f} | |",
        "",
        f"Throughput with 8 concurrent gradio_client clients x {args.per_client} requests: "
        f"**{rps:.1f} requests/s** ({1000 / rps:.0f} ms per request on average).",
        f"Target (request p50 <= raw forward p50): **{'PASS' if ratio <= 1 else 'FAIL'}**.",
    ]
    print("\n".join(lines))
    if args.record:
        text = RESULTS.read_text() if RESULTS.exists() else ""
        if SECTION not in text:
            text = text.rstrip() + f"\n\n{SECTION}\n"
        RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
