"""The prediction log's cost (issue 21), measured with the serving bench as it stood before
int8 serving rewrote `bench/serve_latency.py` (issue 23): gate on/off, logging on/off,
/explain, in one interleaved run against efficientnet_b3. Kept whole so that the figure in
bench/RESULTS.md can be measured again; folding the log-off app into serve_latency.py is
left to do.

Serving latency: a full classify request through gradio_client vs the raw model forward,
with the out-of-domain gate on and off, and a Grad-CAM explanation.

On this machine, for an efficientnet_b3 champion at 300 px (random weights, batch-norm
statistics taken from one random batch so that activations have a realistic scale; latency
does not depend on the weights), measured in one run:

- raw: the eager PyTorch forward of the same network, batch 1, fp32, on a ready tensor;
- request (gate on): `Client.predict(handle_file(jpeg), api_name="/classify")` against the
  app started as `skinsense serve` on a model folder with its ONNX export (logits and
  features) and an out-of-domain gate (`ood_gate.safetensors`, fitted here on views of the
  real example images, so the example is in domain and the whole answer is computed):
  upload + queue + JPEG decode + quality checks + preprocessing + ONNX Runtime + the
  Mahalanobis distances + the referral rule + JSON back;
- request (gate off): the same request to a second app on the same folder with
  `ServeConfig.gate` off (no quality checks, no distances: the answer as before the gate);
- request (log off): the gate-on request to a third app on the same folder with
  `ServeConfig.log_predictions` off: the difference is the prediction log's row (SHA-256,
  image header, one committed SQLite insert in WAL mode), which every other app writes;
- explain: `api_name="/explain"` (Grad-CAM of the top class on the PyTorch weights, overlay
  at the upload's 600x450, JPEG back) against the gate-on app;
- request, default client: the gate-on request with the default `Client(url)`, which builds
  a TLS context (certifi's CA bundle, about 21 ms here) for each of its HTTP calls even when
  the URL is http://;
- throughput: 8 clients (ssl_verify=False) in threads against the gate-on app.

Targets: request (gate on) p50 <= raw forward p50; gate on <= 1.1x gate off; logging on
<= 1.05x logging off; explain <= 3x the raw forward. All compare `ssl_verify=False` requests: the TLS contexts are the client
library's cost on a connection that uses no TLS, not the service's.

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


def realistic_model(arch: str, size: int) -> torch.nn.Module:
    """Random weights with batch-norm statistics from one random batch.

    A freshly initialised EfficientNet shrinks activations to ~1e-14 by its last stage, which
    would give the gate degenerate features; trained weights keep each layer at unit scale.
    """
    from skinsense.models import build_model

    model = build_model(arch, image_size=size)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def fit_example_gate(model_dir: Path) -> None:
    """A gate fitted on flipped and turned views of the real examples (in domain by design)."""
    import csv

    import numpy as np
    from PIL import Image

    from skinsense.labels import CODE_TO_INDEX
    from skinsense.lifecycle.export import weights_sha256
    from skinsense.lifecycle.packaging import load_card, save_card
    from skinsense.serving.app import EXAMPLES_DIR, example_images
    from skinsense.serving.predictor import Predictor
    from skinsense.trust.gate import choose_threshold, fit_gate, save_gate

    with open(EXAMPLES_DIR / "labels.csv") as f:
        labels = {row["image_id"]: CODE_TO_INDEX[row["dx"]] for row in csv.DictReader(f)}
    predictor = Predictor.from_model_dir(model_dir, backend="torch")
    train, train_labels, held_out = [], [], []
    for path in example_images():
        image = Image.open(path).convert("RGB")
        views = [image, *(image.transpose(t) for t in Image.Transpose)]
        train += views[:6]
        train_labels += [labels[path.stem]] * 6
        held_out += views[6:]
    _, train_features = predictor.outputs(train)
    _, held_out_features = predictor.outputs(held_out)
    gate = fit_gate(train_features, np.array(train_labels),
                    weights_sha256=weights_sha256(model_dir))
    save_gate(gate, model_dir)
    card = load_card(model_dir)
    # The largest held-out score: every real example passes, so every request is answered.
    card.ood_threshold = choose_threshold(gate.scores(held_out_features), 100)
    card.ood_percentile = 100.0
    save_card(card, model_dir)


def interleaved_ms(model_dir: Path, urls: dict[str, str], image: Path,
                   n: int) -> dict[str, list[float]]:
    """Raw forwards, requests with the gate on and off, explanations and the default-client
    request: one of each per round, in a new random order every round.

    Every kind then sees the same machine load and the same neighbours on average. A fixed
    order would not do: ONNX Runtime's and OpenMP's threads spin for a while after a call
    and slow down whatever runs next on the 2 cores, so the kind that always followed the
    gate-on request measured 1.7x slower than it (a first run of this bench).
    """
    import random

    from gradio_client import Client, handle_file

    from skinsense.lifecycle.packaging import load_model_dir

    model, _ = load_model_dir(model_dir)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def raw() -> None:
        with torch.inference_mode():
            model(x)

    def call(client, api_name: str):
        return lambda: client.predict(handle_file(str(image)), api_name=api_name)

    kinds = {
        "raw": raw,
        "request": call(Client(urls["on"], verbose=False, ssl_verify=False), "/classify"),
        "request_gate_off": call(Client(urls["off"], verbose=False, ssl_verify=False),
                                 "/classify"),
        "request_log_off": call(Client(urls["nolog"], verbose=False, ssl_verify=False),
                                "/classify"),
        "explain": call(Client(urls["on"], verbose=False, ssl_verify=False), "/explain"),
        "request_default_client": call(Client(urls["on"], verbose=False), "/classify"),
    }
    order = list(kinds)
    shuffle = random.Random(0).shuffle
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for i in range(n + 3):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            kinds[name]()
            if i >= 3:  # warm-up (the first /explain also loads the PyTorch weights)
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def start_app(model_dir: Path, log_path: Path, *, gate: bool = True, log: bool = True
              ) -> tuple[subprocess.Popen, str, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           # Each app's prediction log (SQLite) lives next to its server log.
           "SKINSENSE_HOME": str(log_path.with_suffix("")),
           "SKINSENSE_SERVE_CONFIG": json.dumps({"reload_interval_s": 0, "gate": gate,
                                                 "log_predictions": log})}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinsense.cli", "serve", "--model-uri", str(model_dir),
             "--port", str(port)], stdout=log_file, stderr=subprocess.STDOUT, env=env,
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


def count_logged(home: Path) -> int:
    """Rows in an app's prediction log (proves the logging app really wrote them)."""
    import sqlalchemy as sa

    from skinsense.monitoring.database import Prediction, engine_for

    engine = engine_for(f"sqlite:///{home / 'monitoring' / 'monitoring.db'}")
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(Prediction)).scalar()


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
    load_start = os.getloadavg()[0]

    from skinsense.lifecycle.export import export_onnx
    from skinsense.lifecycle.packaging import ModelCard, save_model_dir
    from skinsense.serving.app import example_images

    images = example_images()
    with tempfile.TemporaryDirectory(prefix="skinsense-bench-") as tmp:
        model_dir = save_model_dir(realistic_model(ARCH, SIZE),
                                   ModelCard(arch=ARCH, image_size=SIZE, referral_threshold=0.5,
                                             referral_sensitivity_target=0.95),
                                   Path(tmp) / "model")
        export_onnx(model_dir)
        fit_example_gate(model_dir)
        on, url_on, state = start_app(model_dir, Path(tmp) / "app-on.log", gate=True)
        try:
            off, url_off, state_off = start_app(model_dir, Path(tmp) / "app-off.log", gate=False)
            nolog, url_nolog, _ = start_app(model_dir, Path(tmp) / "app-nolog.log", log=False)
            try:
                assert state["ood_gate"]["status"] == "on", state
                assert state_off["ood_gate"]["status"] == "off", state_off
                times = interleaved_ms(model_dir, {"on": url_on, "off": url_off,
                                                   "nolog": url_nolog}, images[0],
                                       args.requests)
                rps = throughput(url_on, images, 8, args.per_client)
                logged_rows = count_logged(Path(tmp) / "app-on")
            finally:
                for process in (off, nolog):
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=30)
        finally:
            os.killpg(on.pid, signal.SIGTERM)
            on.wait(timeout=30)

    names = {
        "raw": "raw eager PyTorch forward, batch 1, fp32, tensor ready (bench process)",
        "request": f"full /classify request, gate on (quality checks + out-of-domain gate), "
                   f"gradio_client `ssl_verify=False` (app backend: {state['backend']})",
        "request_gate_off": "the same request to an app with the gate off (`ServeConfig.gate` "
                            "false: no quality checks, no distances)",
        "request_log_off": "the same gate-on request to an app with the prediction log off "
                           "(`ServeConfig.log_predictions` false; all other rows log)",
        "explain": "/explain: Grad-CAM of the top class on the PyTorch weights, 600x450 "
                   "overlay back (gate on)",
        "request_default_client": "the gate-on request, default gradio_client (a TLS context "
                                  "built per HTTP call)",
    }
    p50 = {k: statistics.median(v) for k, v in times.items()}
    rows = [(names[k], p50[k], percentile(v, 95)) for k, v in times.items()]
    ratio, gate_ratio = p50["request"] / p50["raw"], p50["request"] / p50["request_gate_off"]
    explain_ratio = p50["explain"] / p50["raw"]
    log_ratio = p50["request"] / p50["request_log_off"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"{ARCH} at {SIZE} px, random weights; {machine}; torch {torch.__version__}; "
        f"{date.today().isoformat()}; {args.requests} timed rounds (one raw forward and one "
        f"call of each kind per round, in a random order each round, so all see the same "
        f"machine load) after 3 warm-up rounds; 1-minute load average at the start "
        f"{load_start:.1f}, at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| measurement | p50 ms | p95 ms |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {p50_ms:.1f} | {p95:.1f} |" for name, p50_ms, p95 in rows],
        f"| request p50 / raw forward p50 | {ratio:.2f} | |",
        f"| gate on p50 / gate off p50 | {gate_ratio:.3f} | |",
        f"| logging on p50 / logging off p50 | {log_ratio:.3f} | |",
        f"| /explain p50 / raw forward p50 | {explain_ratio:.2f} | |",
        f"| default-client request p50 / raw forward p50 | "
        f"{p50['request_default_client'] / p50['raw']:.2f} | |",
        "",
        f"Throughput with 8 concurrent gradio_client clients x {args.per_client} requests "
        f"(gate on): **{rps:.1f} requests/s** ({1000 / rps:.0f} ms per request on average); "
        f"the logging app's prediction log holds {logged_rows} rows at the end.",
        f"Targets: request p50 <= raw forward p50: **{'PASS' if ratio <= 1 else 'FAIL'}**; "
        f"gate on <= 1.1x gate off: **{'PASS' if gate_ratio <= 1.1 else 'FAIL'}**; "
        f"logging on <= 1.05x logging off: **{'PASS' if log_ratio <= 1.05 else 'FAIL'}**; "
        f"/explain <= 3x raw forward: **{'PASS' if explain_ratio <= 3 else 'FAIL'}**.",
    ]
    print("\n".join(lines))
    if args.record:
        text = RESULTS.read_text() if RESULTS.exists() else ""
        if SECTION not in text:
            text = text.rstrip() + f"\n\n{SECTION}\n"
        RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
