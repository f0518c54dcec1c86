"""Serving latency and throughput, fp32 beside int8: a full classify request through
gradio_client against the raw model forward, for efficientnet_b0 (224 px), efficientnet_b3
(300 px) and maxvit_t (224 px).

For each architecture (random weights, batch-norm statistics taken from one random batch so
that activations have a realistic scale; latency does not depend on the weights), measured in
one run, in two phases: the calls in the bench process (raw, ONNX Runtime alone, assess)
before any app starts, then the requests with the apps running:

- raw: the eager PyTorch forward of the same network, batch 1, fp32, on a ready tensor, in a
  fresh process that loads only the model folder;
- ONNX Runtime alone: `model.onnx` and `model.int8.onnx` (`skinsense.quantize.export_int8`,
  calibrated here on flipped and turned views of the real examples), batch 1, all cores;
- assess fp32 / int8: `Predictor.assess` on the JPEG's bytes in the bench process, the
  server's work without Gradio and HTTP;
- request fp32 / int8: `Client.predict(handle_file(jpeg), api_name="/classify")` against two
  apps started as `skinsense serve` on the same model folder with `serve.precision` forced to
  fp32 and to int8, with an out-of-domain gate (fitted on the example views, so every answer
  is computed in full): upload + queue + JPEG decode + quality checks + preprocessing + ONNX
  Runtime + the Mahalanobis distances + the referral rule + JSON back;
- throughput: 1, 2, 4 and 8 clients (`ssl_verify=False`) in threads, against each app.

With `--variants` (default none), more rows in the same rounds, each against the fp32 app or
a further app on the same model folder, also serving fp32:

- log-off: the fp32 request to an app with `ServeConfig.log_predictions` off: the difference
  is the prediction log's row (SHA-256, image header, one committed SQLite insert in WAL
  mode), which every other app writes (issue 21). The bench checks that the fp32 app's log
  holds exactly one row per answer it gave and that the log-off app's holds none;
- gate-off: the fp32 request to an app with `ServeConfig.gate` off (no quality checks, no
  distances: the answer as before the gate; issue 13);
- explain: `api_name="/explain"` against the fp32 app (Grad-CAM of the top class on the
  PyTorch weights, overlay at the upload's 600x450, JPEG back; issue 13);
- default-client: the fp32 request with the default `Client(url)`, which builds a TLS
  context (certifi's CA bundle) for each of its HTTP calls even when the URL is http://.

Every app keeps its SQLite prediction log in its own SKINSENSE_HOME next to its server log
(in the bench's temporary folder), never in the caller's.

Targets (issue 23, for efficientnet_b3): request p50 <= 0.5x raw forward p50; 8 clients >=
2 x 1000 / raw forward p50 requests/s (both cores' worth of raw forwards). With the
variants (issues 13 and 21): logging on <= 1.05x logging off; gate on <= 1.1x gate off;
/explain <= 3x raw forward. All are judged only when other processes left the machine idle
(`OthersCpu`).

Usage: python bench/serve_latency.py [--requests 40] [--archs efficientnet_b3] [--record]
[--variants log-off,gate-off,explain,default-client]   (--record appends to bench/RESULTS.md)
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

RESULTS = Path(__file__).parent / "RESULTS.md"


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
    # Twice the largest held-out score: every real example passes, in fp32 and in int8 (whose
    # features move the scores a little), so every request is answered in full.
    card.ood_threshold = 2 * choose_threshold(gate.scores(held_out_features), 100)
    card.ood_percentile = 100.0
    save_card(card, model_dir)


def example_views(size: int):
    """The real examples, flipped and turned (8 views each), squashed to `size`: the
    calibration part of the bench's int8 models (it has no validation cache)."""
    import numpy as np
    from PIL import Image

    from skinsense.data.cache import resize_square
    from skinsense.serving.app import example_images

    views = []
    for path in example_images():
        image = Image.open(path).convert("RGB")
        views += [image, *(image.transpose(t) for t in Image.Transpose)]
    return np.stack([np.asarray(resize_square(v, size)) for v in views])


def export_bench_int8(model_dir: Path, size: int) -> None:
    """`quantize.export_int8` calibrated on the example views (as a validation part)."""
    import numpy as np

    from skinsense import quantize
    from skinsense.data.records import CachedSplit

    images = example_views(size)
    np.save(model_dir.parent / "calibration_images.npy", images)
    np.save(model_dir.parent / "calibration_labels.npy", np.zeros(len(images), dtype=np.int64))
    quantize.export_int8(model_dir, CachedSplit(
        images_npy=model_dir.parent / "calibration_images.npy",
        labels_npy=model_dir.parent / "calibration_labels.npy", size=size, n=len(images)))


WARM_UP = 3  # untimed rounds first

# --variants: each adds one kind of call to the interleaved rounds, (kind, the app it calls,
# api_name, ssl_verify); "log-off" and "gate-off" also start an app of their own
# (VARIANT_APPS: its ServeConfig options beside precision fp32).
VARIANTS = {
    "log-off": ("request_log_off", "log-off", "/classify", False),
    "gate-off": ("request_gate_off", "gate-off", "/classify", False),
    "explain": ("explain", "fp32", "/explain", False),
    "default-client": ("request_default_client", "fp32", "/classify", True),
}
VARIANT_APPS = {"log-off": {"log_predictions": False}, "gate-off": {"gate": False}}


# The raw eager forward, timed in a fresh interpreter that loads only the model folder. In
# the bench process, beside its ONNX Runtime sessions and predictors, efficientnet_b3's
# forward measured 107 ms against 34 ms alone (a run of 2026-12-04), which would flatter
# every ratio against it.
RAW_FORWARD = """
import json, statistics, sys, time
import torch
from skinsense.lifecycle.packaging import load_model_dir
model, _ = load_model_dir(sys.argv[1])
size, n, warm_up = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for i in range(n + warm_up):
        start = time.perf_counter()
        model(x)
        if i >= warm_up:
            times.append((time.perf_counter() - start) * 1000)
print(json.dumps(times))
"""


def raw_forward_ms(model_dir: Path, size: int, n: int) -> list[float]:
    """`n` eager PyTorch forwards, batch 1, fp32, in a fresh interpreter (RAW_FORWARD)."""
    out = subprocess.run([sys.executable, "-c", RAW_FORWARD, str(model_dir), str(size), str(n),
                          str(WARM_UP)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def forward_kinds(model_dir: Path, image: Path, size: int) -> dict:
    """The calls measured in this process before any app starts: both ONNX exports alone
    and `Predictor.assess` in both precisions."""
    import numpy as np

    from skinsense.lifecycle.export import ONNX_FILE, onnx_session
    from skinsense.quantize import INT8_FILE
    from skinsense.serving.predictor import Predictor

    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    feed = {"image": np.ascontiguousarray(x.numpy())}
    sessions = {name: onnx_session(model_dir / file)
                for name, file in (("onnx_fp32", ONNX_FILE), ("onnx_int8", INT8_FILE))}
    predictors = {p: Predictor.from_model_dir(model_dir, precision=p) for p in ("fp32", "int8")}
    upload = image.read_bytes()

    return {
        "onnx_fp32": lambda: sessions["onnx_fp32"].run(None, feed),
        "onnx_int8": lambda: sessions["onnx_int8"].run(None, feed),
        "assess_fp32": lambda: predictors["fp32"].assess(upload),
        "assess_int8": lambda: predictors["int8"].assess(upload),
    }


def request_kinds(urls: dict[str, str], image: Path, variants: tuple[str, ...] = ()) -> dict:
    """Requests to the fp32 and the int8 app, and the `variants`' calls."""
    from gradio_client import Client, handle_file

    def call(app: str, api_name: str, ssl_verify: bool = False):
        client = Client(urls[app], verbose=False, ssl_verify=ssl_verify)
        return lambda: client.predict(handle_file(str(image)), api_name=api_name)

    return {
        "request_fp32": call("fp32", "/classify"),
        "request_int8": call("int8", "/classify"),
        **{kind: call(app, api_name, ssl_verify)
           for kind, app, api_name, ssl_verify in (VARIANTS[v] for v in variants)},
    }


def interleaved_ms(kinds: dict, n: int) -> dict[str, list[float]]:
    """One call of each kind per round, in a new random order every round, after WARM_UP
    rounds.

    Every kind then sees the same machine load and the same neighbours on average. A fixed
    order would not do: ONNX Runtime's and OpenMP's threads spin for a while after a call
    and slow down whatever runs next on the 2 cores, so the kind that always followed the
    gate-on request measured 1.7x slower than it (a first run of this bench). The forwards
    in this process are measured before the apps start (`bench_arch`): with the apps'
    threads finishing each request beside it, the 2-thread eager forward measured 3-5x its
    time on a quiet machine, and every ratio against it flattered the app.
    """
    import random

    order = list(kinds)
    shuffle = random.Random(0).shuffle
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for i in range(n + WARM_UP):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            kinds[name]()
            if i >= WARM_UP:  # the first /explain also loads the app's PyTorch weights
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def start_app(model_dir: Path, log_path: Path, **serve) -> tuple[subprocess.Popen, str, dict]:
    """`skinsense serve` on `model_dir` with these `ServeConfig` options (precision, gate,
    log_predictions, ...); its prediction log in a SKINSENSE_HOME of its own next to
    `log_path`, its server log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items()
           if key != "SKINSENSE_LOG_DATABASE_URL"}
    env.update({"GRADIO_ANALYTICS_ENABLED": "False",
                "SKINSENSE_HOME": str(log_path.with_suffix("")),
                "SKINSENSE_SERVE_CONFIG": json.dumps({"reload_interval_s": 0, **serve})})
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


def count_logged(log_path: Path) -> int:
    """Rows in the prediction log of the app whose server log is `log_path` (0: none kept)."""
    import sqlalchemy as sa

    from skinsense.monitoring.database import Prediction, engine_for

    database = log_path.with_suffix("") / "monitoring" / "monitoring.db"
    if not database.exists():
        return 0
    with engine_for(f"sqlite:///{database}").connect() as connection:
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


SIZES = {"efficientnet_b0": 224, "efficientnet_b3": 300, "maxvit_t": 224}
CLIENTS = (1, 2, 4, 8)


def bench_arch(arch: str, size: int, tmp: Path, args) -> dict:
    """Every figure of one architecture, its apps started and stopped here."""
    from skinsense.lifecycle.packaging import ModelCard, save_model_dir
    from skinsense.serving.app import example_images

    images = example_images()
    model_dir = save_model_dir(realistic_model(arch, size),
                               ModelCard(arch=arch, image_size=size, referral_threshold=0.5,
                                         referral_sensitivity_target=0.95),
                               tmp / arch / "model")
    export_bench_int8(model_dir, size)
    fit_example_gate(model_dir)
    serve = {"fp32": {"precision": "fp32"}, "int8": {"precision": "int8"},
             **{v: {"precision": "fp32", **VARIANT_APPS[v]}
                for v in args.variants if v in VARIANT_APPS}}
    times = {"raw": raw_forward_ms(model_dir, size, args.requests)}
    times |= interleaved_ms(forward_kinds(model_dir, images[0], size), args.requests)
    apps, urls, states = {}, {}, {}
    logs = {name: tmp / arch / f"app-{name}.log" for name in serve}
    try:
        for name, options in serve.items():
            apps[name], urls[name], states[name] = start_app(model_dir, logs[name], **options)
            gate = "on" if options.get("gate", True) else "off"
            assert states[name]["precision"] == options["precision"], states[name]
            assert states[name]["ood_gate"]["status"] == gate, states[name]
        times |= interleaved_ms(request_kinds(urls, images[0], args.variants), args.requests)
        rps = {(precision, clients): throughput(urls[precision], images, clients,
                                                args.per_client)
               for clients in CLIENTS for precision in ("fp32", "int8")}
    finally:
        for process in apps.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    logged = None
    if "log-off" in args.variants:
        # Every answer of the fp32 app is a row (the rounds' calls to it and its throughput
        # requests); the log-off app must have none, or the ratio compares nothing.
        calls = 1 + sum(VARIANTS[v][1] == "fp32" for v in args.variants)
        logged = {"fp32": count_logged(logs["fp32"]), "log-off": count_logged(logs["log-off"]),
                  "answered": calls * (args.requests + WARM_UP)
                              + sum(CLIENTS) * args.per_client}
    return {"times": times, "rps": rps, "state": states["int8"], "logged": logged}


# The share of the machine's cores that other processes may use while an architecture is
# measured before its figures are called not valid.
OTHERS_MAX_CORES = 0.25


class OthersCpu:
    """CPU seconds spent by processes outside this bench's own tree (the bench, its apps and
    their workers) while the block runs: the load average cannot tell them apart, and the
    bench's own 8 clients push it over the core count on an idle machine.

    The machine's busy time (/proc/stat through psutil) less the tree's own: this process's
    and its waited-for children's (getrusage; the apps are stopped and waited for inside the
    block) and any child still running. Short-lived processes, such as another session's
    test run that starts and ends during the block, are counted too, which a walk over the
    process table at both ends would miss.
    """

    def __enter__(self) -> OthersCpu:
        self.start, self.wall = self._busy_and_ours(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, ours = self._busy_and_ours()
        self.wall = time.perf_counter() - self.wall
        self.cpu_s = max(0.0, (busy - self.start[0]) - (ours - self.start[1]))
        self.cores = self.cpu_s / self.wall

    @staticmethod
    def _busy_and_ours() -> tuple[float, float]:
        import resource

        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            ours += times.user + times.system
        return busy, ours


def arch_lines(arch: str, size: int, result: dict, *, others: float = 0.0) -> list[str]:
    times, rps, state = result["times"], result["rps"], result["state"]
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p95 = {k: percentile(v, 95) for k, v in times.items()}
    names = {
        "raw": "raw eager PyTorch forward, batch 1, fp32, tensor ready (a fresh process)",
        "onnx_fp32": "ONNX Runtime fp32 export alone, batch 1 (bench process, all cores)",
        "onnx_int8": "ONNX Runtime int8 export alone, batch 1 (bench process, all cores)",
        "assess_fp32": "the server's work alone, fp32: `Predictor.assess` on the JPEG's bytes "
                       "(decode, quality checks, forward, gate, referral; bench process)",
        "assess_int8": "the same, int8",
        "request_fp32": "full /classify request (gate on), app serving fp32",
        "request_int8": "full /classify request (gate on), app serving int8",
        "request_log_off": "the fp32 request to an app with the prediction log off "
                           "(`ServeConfig.log_predictions` false; every other app logs)",
        "request_gate_off": "the fp32 request to an app with the gate off (`ServeConfig.gate` "
                            "false: no quality checks, no distances)",
        "explain": "/explain against the fp32 app: Grad-CAM of the top class on the PyTorch "
                   "weights, 600x450 overlay back",
        "request_default_client": "the fp32 request, default gradio_client (a TLS context "
                                  "built per HTTP call)",
    }
    target_rps = 2 * 1000 / p50["raw"]
    best = min(("fp32", "int8"), key=lambda p: p50[f"request_{p}"])
    ratios = [r for r in RATIOS if r[0] in p50 and r[1] in p50]
    busy = others > OTHERS_MAX_CORES
    lines = [
        f"### {arch} at {size} px",
        "",
        "| measurement | p50 ms | p95 ms |",
        "| --- | ---: | ---: |",
        *[f"| {names[k]} | {p50[k]:.1f} | {p95[k]:.1f} |" for k in names if k in p50],
        f"| int8 speed-up, ONNX Runtime alone (fp32 p50 / int8 p50) | "
        f"{p50['onnx_fp32'] / p50['onnx_int8']:.2f}x | |",
        f"| int8 speed-up, whole request | "
        f"{p50['request_fp32'] / p50['request_int8']:.2f}x | |",
        f"| Gradio and HTTP per request (request p50 - assess p50), fp32 / int8 | "
        f"{p50['request_fp32'] - p50['assess_fp32']:.1f} / "
        f"{p50['request_int8'] - p50['assess_int8']:.1f} | |",
        f"| request p50 / raw forward p50, fp32 / int8 | "
        f"{p50['request_fp32'] / p50['raw']:.2f} / {p50['request_int8'] / p50['raw']:.2f} | |",
        *[f"| {what} | {p50[a] / p50[b]:.3f} | |" for a, b, what, _, _ in ratios],
        "",
        "| clients | fp32 requests/s | int8 requests/s |",
        "| ---: | ---: | ---: |",
        *[f"| {c} | {rps[('fp32', c)]:.1f} | {rps[('int8', c)]:.1f} |" for c in CLIENTS],
        "",
        f"Runtime: {state['threads']} threads for a request alone, {state['concurrent_threads']} "
        f"each for concurrent ones, {state['concurrency_limit']} requests at once. "
        + f"Other processes used {others:.2f} cores meanwhile. "
        + (f"**Not valid: the machine was busy** (over {OTHERS_MAX_CORES} cores: the eager "
           "forward's OpenMP threads suffer most, so every ratio against it flatters the app); "
           "targets not judged." if busy else
           f"Targets (issue 23): request <= 0.5x raw forward: fp32 "
           f"{'PASS' if p50['request_fp32'] <= 0.5 * p50['raw'] else 'FAIL'}, int8 "
           f"{'PASS' if p50['request_int8'] <= 0.5 * p50['raw'] else 'FAIL'}; 8 clients >= "
           f"2 x 1000 / raw p50 = {target_rps:.1f}/s: fp32 "
           f"{'PASS' if rps[('fp32', 8)] >= target_rps else 'FAIL'}, int8 "
           f"{'PASS' if rps[('int8', 8)] >= target_rps else 'FAIL'}.")
        + f" Faster request: {best}.",
    ]
    if ratios:
        lines += ["", *variant_verdicts(p50, ratios, result["logged"], busy)]
    return lines


# The variants' ratios, (numerator, denominator, table row, target, at most): issue 13 (gate,
# /explain) and issue 21 (the prediction log).
RATIOS = (
    ("request_fp32", "request_log_off", "logging on p50 / logging off p50 (fp32 apps)",
     "logging on <= 1.05x logging off", 1.05),
    ("request_fp32", "request_gate_off", "gate on p50 / gate off p50 (fp32 apps)",
     "gate on <= 1.1x gate off", 1.1),
    ("explain", "raw", "/explain p50 / raw forward p50", "/explain <= 3x raw forward", 3.0),
    ("request_default_client", "raw", "default-client request p50 / raw forward p50", None,
     None),
)


def log_check(logged: dict | None) -> str | None:
    """What is wrong with the prediction logs of the log-off variant, None when nothing."""
    if logged is None or (logged["fp32"] == logged["answered"] and logged["log-off"] == 0):
        return None
    return (f"the fp32 app's log holds {logged['fp32']} rows for the {logged['answered']} "
            f"answers it gave (one each), the log-off app's {logged['log-off']} (none)")


def variant_verdicts(p50: dict[str, float], ratios, logged: dict | None,
                     busy: bool) -> list[str]:
    lines = []
    if logged is not None:
        lines.append(f"Prediction logs: the fp32 app's holds {logged['fp32']} rows for the "
                     f"{logged['answered']} answers it gave, the log-off app's "
                     f"{logged['log-off']}.")
    verdicts = []
    for a, b, _, target, limit in ratios:
        if target is None:
            continue
        if b == "request_log_off" and log_check(logged):
            verdict = f"**not valid**: {log_check(logged)}"
        else:
            verdict = "PASS" if p50[a] / p50[b] <= limit else "FAIL"
        verdicts.append(f"{target}: {verdict}")
    if busy:
        lines.append("Variant targets not judged: the machine was busy.")
    elif verdicts:
        lines.append(f"Variant targets (issues 13 and 21): {'; '.join(verdicts)}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--archs", default=",".join(SIZES))
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--variants", default="", help="comma-separated extra rows in the same "
                        f"rounds: {', '.join(VARIANTS)} (default none; see the module doc)")
    args = parser.parse_args()
    args.variants = tuple(dict.fromkeys(v for v in args.variants.split(",") if v))
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose from "
                     f"{', '.join(VARIANTS)}")
    if unknown := [a for a in args.archs.split(",") if a not in SIZES]:
        parser.error(f"unknown --archs {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    load_start = os.getloadavg()[0]
    lines: list[str] = []
    log_problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="skinsense-bench-") as tmp:
        for arch in args.archs.split(","):
            with OthersCpu() as others:
                result = bench_arch(arch, SIZES[arch], Path(tmp), args)
            block = arch_lines(arch, SIZES[arch], result, others=others.cores)
            if problem := log_check(result["logged"]):
                log_problems.append(f"{arch}: {problem}")
            print("\n".join(block), flush=True)
            lines += [*block, ""]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = (f"{machine}; torch {torch.__version__}; {date.today().isoformat()}; random weights "
              f"(batch-norm statistics from one random batch), int8 calibrated on the example "
              f"views, a gate fitted on them; {args.requests} timed rounds (one call of each "
              f"kind per round, in a random order each round) after {WARM_UP} warm-up rounds, "
              f"first the forwards and assess in the bench process with no app running, then "
              f"the requests; "
              + (f"variants: {', '.join(args.variants)} (their apps serve fp32); "
                 if args.variants else "") +
              f"throughput: N gradio_client clients (ssl_verify=False) x {args.per_client} "
              f"requests each; 1-minute load average at the start {load_start:.1f}, at the end "
              f"{os.getloadavg()[0]:.1f}.")
    print(header)
    if args.record:
        # A section of its own at the end (each architecture a ### under it), to be moved
        # beside the run it follows up when that is not the last one.
        text = RESULTS.read_text() if RESULTS.exists() else ""
        title = f"## Serving latency, a run of {date.today().isoformat()} (bench/serve_latency.py)"
        RESULTS.write_text(f"{text.rstrip()}\n\n{title}\n\n{header}\n\n"
                           + "\n".join(lines) + "\n")
    if log_problems:
        raise SystemExit("the prediction log check failed: " + "; ".join(log_problems))


if __name__ == "__main__":
    main()
