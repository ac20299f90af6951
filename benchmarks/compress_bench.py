"""Benchmark compression to the limit: pruning, weight clustering and QAT side by side, in one run.

For the digits CNN (built-in ``cnn``) and a MobileNetV2 (alpha 0.35) trained on a 32x32x3 colour image
set made in code (the digits upsampled 4x, drawn in a random colour on a random darker background with
noise, values in [0, 1]), and for one TFLite target (``mobile``) and, for the CNN, the ONNX target
(``x86``): plain PTQ, prune 50 % + PTQ, cluster K + PTQ, prune + cluster + PTQ, and the
cluster-preserving QAT (CQAT) and pruning-cluster-preserving QAT (PCQAT) builds. Every row is a real
``build_bundles`` run; sizes and unique weights per channel come from the report's ``compression``
section (read from the shipped file). Writes the ``compress`` section of BENCHMARKS.md.

    .venv/bin/python -m benchmarks.compress_bench                 # both models (about 20 min on 2 cores)
    .venv/bin/python -m benchmarks.compress_bench --quick         # the digits CNN only
    .venv/bin/python -m benchmarks.compress_bench --cache DIR     # reuse trained models
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _bench  # noqa: E402
from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, publish_section  # noqa: E402

CNN_EPOCHS = 30
MOBILENET_EPOCHS = 40
PATIENCE = 8
UPSAMPLE = 4
SEED = 0
# (label, quantize, prune, cluster K); K per model below
CONFIGS: tuple[tuple[str, str, float | None, bool], ...] = (
    ("PTQ", "ptq", None, False),
    ("prune 50% + PTQ", "ptq", 0.5, False),
    ("cluster K + PTQ", "ptq", None, True),
    ("prune 50% + cluster K + PTQ", "ptq", 0.5, True),
    ("cluster K + CQAT", "qat", None, True),
    ("prune 50% + cluster K + PCQAT", "qat", 0.5, True),
)
# (model label, goal gzip ratio to the float TFLite file, goal accuracy loss in points)
GOALS = {"digits CNN": (0.12, 0.5), "MobileNetV2 0.35 (32x32x3)": (0.15, 1.0)}
# Why goals fall short (added under the goals when one is missed), from the run of 2026-12-06.
WHY = (
    "The part of an int8 file that does not shrink with the weights sets a floor. In the digits CNN's "
    "TFLite file about 6 KB of the 20 KB are graph, tensor names, int32 biases and quantization "
    "parameters (about 2.7 KB after gzip, 0.046x of the float file by itself); the ONNX QDQ file carries "
    "more graph (DequantizeLinear nodes, float scales per channel), which is why x86 stays about 0.03x "
    "above mobile for the same weights. In MobileNetV2 0.35 (about 17,000 output channels) each channel "
    "has a float32 scale that gzip cannot shrink, plus int32 biases: roughly 0.07x of the float file "
    "before any kernel byte. gzip also codes bytes, not bits: 8 clusters with half the weights zero have "
    "an entropy of about 2.5 bits per weight, and gzip spends about 3. What would reach the MobileNetV2 "
    "goal: fewer clusters in the 1x1 convolutions (cluster 8 was tried, but only through PCQAT, which "
    "failed on this model), higher sparsity, or a coder that knows the layout (entropy-coding the "
    "cluster indices) on the device side."
)


def colour_digits(src: Path, dst: Path, seed: int) -> Path:
    """Write a 32x32x3 colour image set in [0, 1] made from the 8x8 digits (labels kept).

    Each digit is upsampled 4x (nearest neighbour) and drawn in a random bright colour on a random
    darker background, with Gaussian noise (sigma 0.05), then clipped to [0, 1].
    """
    d = np.load(src)
    rng = np.random.default_rng(seed)
    ink = np.kron(d["x"][..., 0] / 16.0, np.ones((UPSAMPLE, UPSAMPLE), dtype=np.float32))  # (n, 32, 32)
    n = len(ink)
    fg = rng.uniform(0.5, 1.0, size=(n, 1, 1, 3))
    bg = rng.uniform(0.0, 0.35, size=(n, 1, 1, 3))
    x = bg + (fg - bg) * ink[..., None] + rng.normal(0, 0.05, size=(n, 32, 32, 3))
    np.savez(dst, x=np.clip(x, 0, 1).astype(np.float32), y=d["y"], class_names=d["class_names"])
    return dst


def model_configs(label: str) -> tuple[int, list[tuple[str, str, float | None, int | None]]]:
    """Return (K, builds) for a model: (row label, quantize, prune, clusters) per build."""
    k = 8 if label == "digits CNN" else 16
    builds: list[tuple[str, str, float | None, int | None]] = [
        (name.replace("K", str(k)), q, p, k if c else None) for name, q, p, c in CONFIGS
    ]
    # one more build at half the clusters, where the goal needs it
    builds.append((f"prune 50% + cluster {k // 2} + PCQAT", "qat", 0.5, k // 2))
    return k, builds


def run(quick: bool, cache: Path | None, md: Path = BENCHMARKS_MD) -> None:
    """Train, build every configuration, and write the ``compress`` section."""
    from toolchain.build import BuildError, build_bundles
    from toolchain.errors import ToolchainError

    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    rows: list[list[Any]] = []
    goals: list[str] = []
    notes: list[str] = []
    models: list[tuple[str, str, Path, Path, int, list[str]]] = [
        ("digits CNN", "cnn", _bench.DIGITS, _bench.DIGITS_TEST, CNN_EPOCHS, ["mobile", "x86"])
    ]
    if not quick:
        models.append(
            (
                "MobileNetV2 0.35 (32x32x3)",
                "mobilenetv2",
                colour_digits(_bench.DIGITS, work / "colour32.npz", SEED),
                colour_digits(_bench.DIGITS_TEST, work / "colour32_test.npz", SEED + 1),
                MOBILENET_EPOCHS,
                ["mobile"],
            )
        )
    try:
        for label, arch, data, test, epochs, targets in models:
            progress_print(f"== {label}: training {arch} ...")
            model, train_s = _bench.train_cached(
                arch, data, work / f"{arch}.keras", epochs, cache, patience=PATIENCE
            )
            notes.append(
                f"{label}: trained in {train_s:.0f} s (up to {epochs} epochs, early stopping)."
                if train_s == train_s
                else f"{label}: model reused from --cache."
            )
            _, builds = model_configs(label)
            best: dict[str, tuple[float, float, str]] = {}  # target -> (gzip ratio, drop, build)
            for tag, quantize, prune, clusters in builds:
                progress_print(f"== {label}: {tag} ...")
                out = work / f"{arch}-{len(rows)}"
                t0 = time.perf_counter()
                try:
                    rep = build_bundles(
                        model,
                        data,
                        targets,
                        out,
                        eval_data=test,
                        quantize=quantize,
                        prune=prune,
                        cluster=clusters,
                        allow_accuracy_drop=True,
                        progress=sys.stderr.isatty(),
                    )
                except BuildError as err:
                    rep = err.report or {"targets": {}}
                except ToolchainError as err:
                    rows.append([label, tag, "all", "FAILED: " + str(err)[:120]] + [None] * 11)
                    notes.append(f"{label} {tag}: failed: {err}")
                    continue
                total_s = time.perf_counter() - t0
                flt = rep.get("float", {})
                float_tflite = flt.get("tflite", {}).get("size_bytes")
                fine = []
                if "pruned_accuracy" in flt:
                    fine.append(f"pruned {100 * flt['pruned_accuracy']:.2f}")
                if "clustered_accuracy" in flt:
                    fine.append(f"clustered {100 * flt['clustered_accuracy']:.2f}")
                for target, e in rep["targets"].items():
                    if e.get("status") != "ok" or "compression" not in e:
                        rows.append(
                            [label, tag, target, "FAILED: " + str(e.get("error"))[:100]] + [None] * 11
                        )
                        continue
                    c = e["compression"]
                    drop = 100 * (e["float_accuracy"] - e["accuracy"])
                    ratio = c["gzip_size_bytes"] / float_tflite if float_tflite else None
                    rows.append(
                        [
                            label,
                            tag,
                            target,
                            f"{100 * e['float_accuracy']:.2f}",
                            "; ".join(fine) or None,
                            f"{100 * e['accuracy']:.2f}",
                            f"{drop:+.2f}",
                            c["size_bytes"] / 1024,
                            c["gzip_size_bytes"] / 1024,
                            ratio,
                            c["unique_weights_per_channel"]["max"],
                            f"{100 * e['sparsity']:.1f}%" if e.get("sparsity") is not None else None,
                            f"{c['ota_bytes'] / 1024:.1f} / {c['ota_gzip_bytes'] / 1024:.1f}",
                            round(total_s, 1),
                        ]
                    )
                    if ratio is not None and drop <= GOALS[label][1]:
                        if target not in best or ratio < best[target][0]:
                            best[target] = (ratio, drop, tag)
            goal_ratio, goal_drop = GOALS[label]
            for target in targets:
                if target in best:
                    ratio, drop, tag = best[target]
                    ok = ratio <= goal_ratio
                    goals.append(
                        f"{'met' if ok else 'MISSED'}: {label} {target}: smallest build within {goal_drop} point"
                        f" of float is {tag}, gzip {ratio:.3f}x the float TFLite file ({drop:+.2f} points;"
                        f" goal <= {goal_ratio}x)"
                    )
                else:
                    goals.append(
                        f"MISSED: {label} {target}: no build stayed within {goal_drop} point of float"
                        f" (goal <= {goal_ratio}x gzip)"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = [
        "model",
        "build",
        "target",
        "float acc %",
        "float after fine-tune %",
        "int8 acc %",
        "drop pts",
        "size KB",
        "gzip KB",
        "gzip / float TFLite",
        "unique / channel (max)",
        "sparsity",
        "OTA KB today / gzip",
        "build s",
    ]
    body = markdown_table(headers, rows)
    body += "\n**Goals (issue 16)**\n\n" + "\n".join(f"- {g}" for g in goals) + "\n"
    if any(g.startswith("MISSED") for g in goals):
        body += "\n**Where it falls short, and why**\n\n" + WHY + "\n"
    body += "\n**Notes**\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    intro = (
        "`benchmarks/compress_bench.py`: `edgefleet build` per configuration, side by side in one run, "
        "accuracy in the device runtimes on held-out images (digits: 359; colour set: 359 made from the "
        "digits test split). `gzip / float TFLite` is the shipped file gzip -9 over the plain float TFLite "
        "file of the same model; `unique / channel` counts distinct stored values per output channel over "
        "every kernel of the shipped file (K or fewer when clustering survived int8). `drop pts` is float minus int8 "
        "(negative: the build scored higher than the float model it started from; the pruning and "
        "clustering fine-tunes also train further). `OTA KB` is the bundle "
        "as transferred today (uncompressed) and with each file gzip-compressed. `float after fine-tune` is "
        "the float model after pruning/clustering, before quantization."
    )
    publish_section("compress", "Compression: pruning, clustering, QAT", body, intro=intro, path=md)


def main() -> None:
    """Parse arguments and run the benchmark."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits CNN only")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section into")
    ap.add_argument("--cache", type=Path, default=None, help="reuse (or save) the trained models here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(args.quick, args.cache, args.md)


if __name__ == "__main__":
    main()
