"""int8 beside fp32 on trained models: the accuracy side of issue 23.

Trains, as the README's offline demo does (1,000 synthetic HAM10000-format images, seed 0,
64 px, 4 epochs, learning rate 0.002, random initial weights), resnet18 and
shufflenet_v2_x1_0, and efficientnet_b3 briefly on the same sample (default 96 px, 6 epochs:
its 300 px would take an hour on 2 cores); then for each one what the evaluation stage does:
calibration and the gate on the validation part, `quantize.export_int8` on 300 validation
images, `quantize.compare_int8` on the test part and the reference photos. Prints one row per
model: fp32 and int8 balanced accuracy, the delta in points, referral sensitivity and
specificity, ECE, the gate's and the top class's agreement, and the rule's verdict.

The speed-up printed here is at the trained size (64-96 px), not the serving one: the
serving figures come from bench/serve_latency.py.

Usage: python bench/int8_accuracy.py [--b3-size 96] [--b3-epochs 6] [--archs ...] [--record]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "## int8 beside fp32 on trained models (bench/int8_accuracy.py)"


def cached(home, source: Path, size: int):
    from skinsense import stages
    from skinsense.config import DataConfig

    cfg = DataConfig(source=str(source), cache_workers=2)
    validated = stages.validate_data(stages.fetch_data(cfg, home, progress=False), cfg, home)
    split = stages.split_data(validated, cfg, home)
    oversampled = stages.oversample_data(split, cfg, home)
    return stages.cache_images(split, oversampled, size, cfg, home), oversampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b3-size", type=int, default=96)
    parser.add_argument("--b3-epochs", type=int, default=6)
    parser.add_argument("--archs", default="resnet18,shufflenet_v2_x1_0,efficientnet_b3")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    from skinsense import quantize
    from skinsense.config import TrainConfig
    from skinsense.data.synth import make_synthetic_ham10000
    from skinsense.evaluation.fit import calibrate_model_dir
    from skinsense.paths import Home
    from skinsense.training.loop import fit

    runs = [run for run in [("resnet18", 64, 4), ("shufflenet_v2_x1_0", 64, 4),
                            ("efficientnet_b3", args.b3_size, args.b3_epochs)]
            if run[0] in args.archs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="skinsense-int8-") as tmp:
        tmp = Path(tmp)
        make_synthetic_ham10000(tmp / "synth", n_images=1000, seed=0)
        home = Home(tmp / "home").ensure()
        for arch, size, epochs in runs:
            cache, oversampled = cached(home, tmp / "synth", size)
            cfg = TrainConfig(archs=[arch], epochs=epochs, lr=0.002, pretrained=False,
                              num_workers=0, progress=False)
            model_dir = fit(cache, arch, cfg, out_dir=tmp / "runs" / arch,
                            class_weights=oversampled.class_weights).model_dir
            calibrate_model_dir(model_dir, cache.val, referral_sensitivity=0.95,
                                train_split=cache.train, gate_percentile=95)
            quantize.export_int8(model_dir, cache.val, n_images=300)
            report = quantize.compare_int8(model_dir, cache.test)
            rows.append((arch, size, epochs, report))
            print(arch, report.model_dump_json(), flush=True)

    def pct(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores, {date.today().isoformat()}; "
        f"1,000 synthetic images (seed 0), lesion split, models from random weights; int8 "
        f"calibrated on 300 validation images (all there are when fewer), judged on the test "
        f"part and the {rows[0][3].n_reference} reference photos.",
        "",
        "| model | px | epochs | test images | fp32 bal. acc. | int8 bal. acc. | delta (points) "
        "| referral sens. fp32 / int8 | referral spec. fp32 / int8 | ECE fp32 / int8 "
        "| gate agreement test / reference | top class agreement | speed-up at this size "
        "| verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: "
        "| --- |",
    ]
    for arch, size, epochs, r in rows:
        lines.append(
            f"| {arch} | {size} | {epochs} | {r.n_test} | {r.fp32.balanced_accuracy:.4f} | "
            f"{r.int8.balanced_accuracy:.4f} | "
            f"{(r.int8.balanced_accuracy - r.fp32.balanced_accuracy) * 100:+.2f} | "
            f"{pct(r.fp32.referral_sensitivity)} / {pct(r.int8.referral_sensitivity)} | "
            f"{pct(r.fp32.referral_specificity)} / {pct(r.int8.referral_specificity)} | "
            f"{r.fp32.ece:.3f} / {r.int8.ece:.3f} | {pct(r.gate_agreement_test)} / "
            f"{pct(r.gate_agreement_reference)} | {r.top_class_agreement:.3f} | "
            f"{r.speedup:.2f}x | {'int8' if r.serve else 'fp32'}: {r.reason} |")
    print("\n".join(lines))
    if args.record:
        text = RESULTS.read_text() if RESULTS.exists() else ""
        if SECTION not in text:
            text = text.rstrip() + f"\n\n{SECTION}\n"
        RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
