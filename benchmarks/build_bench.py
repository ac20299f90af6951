"""Benchmark the build pipeline: int8 bundles vs the float model, side by side in one run.

For the digits CNN (built-in ``cnn``) and a MobileNetV2 (alpha 0.35) trained on the digits upsampled to
32x32, and for every target: float vs int8 accuracy (PTQ and QAT, each with and without 50 % pruning),
model size and gzip-compressed size vs the float TFLite/ONNX model, latency of each runtime candidate vs
the float model in the same runtimes, and build time. Checks the goals of issue 2 and writes the
``build`` section of BENCHMARKS.md.

    .venv/bin/python -m benchmarks.build_bench            # both models (about 15 minutes on 2 cores)
    .venv/bin/python -m benchmarks.build_bench --quick    # the digits CNN only
    .venv/bin/python -m benchmarks.build_bench --configs ptq,qat   # skip the pruned builds

A second table gives every runtime of every bundle as the device runs it (``toolchain.steps.parity``):
accuracy one sample at a time and in the agent's batches of 64 beside the whole-batch figure, top-1
agreement with the float model, and the agent's per-sample latency (``Agent.predict``, p50/p95).
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
UPSAMPLE = 4  # 8x8 -> 32x32 (nearest neighbour)
CONFIGS = (("ptq", None), ("qat", None), ("ptq", 0.5), ("qat", 0.5))
GOAL_PTQ_DROP_PTS = 0.5
GOAL_QAT_DROP_PTS = 0.3
GOAL_PRUNED_GZIP_RATIO = 0.2
GOAL_CNN_BUILD_S = 90.0
# Why a goal can be missed: appended to the section when that kind of goal is missed in the run.
WHY = {
    "latency": (
        "x86 latency: the bundle must be int8, and the build picks the faster int8 runtime (ONNX Runtime or "
        "OpenVINO). On this host the int8 QDQ model is slower than the plain float ONNX model in the same "
        "runtime: for models this small the QuantizeLinear/DequantizeLinear work and int8 kernel set-up "
        "outweigh the cheaper arithmetic (docs/runtimes-facts.md has the same for MobileNetV2 at 96x96). The "
        "goal needs a host where int8 kernels win (VNNI/AMX-tuned ONNX Runtime builds, OpenVINO on newer "
        "Xeons) or a larger model."
    ),
    "gzip": (
        "Pruned size: 50 % zeros compress well, but the other 50 % are int8 values close to random, which gzip "
        "cannot shrink; per-channel scales (float32) and zero points, int32 biases and the graph add a fixed "
        "part. That leaves about 0.20-0.23x of the float TFLite file (the ONNX QDQ file carries more graph); "
        "QAT's smoother weights compress slightly better."
    ),
    "accuracy": (
        "Accuracy is measured on 359 test images, so one image is 0.28 points: a miss by one or two images "
        "is within the test set's resolution."
    ),
    "prune_accuracy": (
        "Pruning MobileNetV2 (trained from scratch on 1,438 upsampled digits) by 50 % with the default 4-epoch "
        "fine-tune (toolchain.steps.prune.PRUNE_EPOCHS) loses several points; a longer fine-tune recovers "
        "more. Such builds fail the accuracy budget unless --allow-accuracy-drop (this script passes it)."
    ),
    "onnx_pqat": (
        "QAT + pruning on x86 fails in the ONNX route: tf2onnx exports the pruning-preserving QAT model's "
        "variables as extra graph inputs, which the ONNX Runtime quantization step refuses "
        "(toolchain/steps/convert_onnx.py, the conversion back end)."
    ),
}


def upsampled(src: Path, dst: Path) -> Path:
    """Write a copy of a digits .npz with images upsampled 4x (nearest neighbour) to 32x32."""
    d = np.load(src)
    x = np.kron(d["x"], np.ones((1, UPSAMPLE, UPSAMPLE, 1), dtype=np.float32)).astype(np.float32)
    np.savez(dst, x=x, y=d["y"], class_names=d["class_names"])
    return dst


def float_latencies(model_path: Path, sample: np.ndarray, work: Path) -> dict[str, dict[int, float]]:
    """Return p50 ms of the plain float model in LiteRT (.tflite), ONNX Runtime and OpenVINO (.onnx).

    Measured at 1, 2 and 4 threads.
    """
    from device_agent.formats.manifest import ModelFormat
    from toolchain.steps.convert import convert_float
    from toolchain.steps.latency import measure_latency
    from toolchain.steps.models import load_model

    lm = load_model(model_path)
    src = lm.model
    tfl = convert_float(src, ModelFormat.TFLITE, work / "float.tflite")
    onx = convert_float(src, ModelFormat.ONNX, work / "float.onnx")
    out: dict[str, dict[int, float]] = {}
    for name, path, rt in (
        ("litert", tfl, "litert"),
        ("onnxruntime", onx, "onnxruntime"),
        ("openvino", onx, "openvino"),
    ):
        out[name] = {t: measure_latency(path, rt, sample, t)["p50_ms"] for t in (1, 2, 4)}
    return out


def runtime_rows(label: str, tag: str, target: str, e: dict[str, Any]) -> list[list[Any]]:
    """Rows of the per-runtime table for one target entry of report.json (kept and excluded runtimes)."""
    rows: list[list[Any]] = []
    for rt, p in e.get("per_runtime", {}).items():
        paths = p.get("paths", {})

        def acc(path: str, paths: dict[str, Any] = paths) -> str | None:
            v = paths.get(path, {}).get("accuracy")
            return None if v is None else f"{100 * v:.2f}"

        rows.append(
            [
                label,
                tag,
                target,
                rt,
                acc("batch_1"),
                acc("batch_64"),
                acc("whole_batch"),
                f"{100 * p['top1_agreement']:.2f}" if p.get("top1_agreement") is not None else None,
                p.get("latency_ms_p50"),
                p.get("latency_ms_p95"),
                p.get("threads"),
                p.get("precision") or "model",
                p.get("parity", "?") + (f": {p['excluded_reason']}" if p.get("excluded_reason") else ""),
            ]
        )
    return rows


def run(
    quick: bool,
    keep: Path | None,
    cache: Path | None = None,
    md: Path = BENCHMARKS_MD,
    configs: tuple[tuple[str, float | None], ...] = CONFIGS,
) -> None:
    from toolchain.build import BuildError, build_bundles
    from toolchain.errors import ToolchainError

    work = Path(tempfile.mkdtemp(prefix="build-bench-"))
    rows: list[list[Any]] = []
    rt_rows: list[list[Any]] = []
    goals: list[str] = []
    notes: list[str] = []
    why: set[str] = set()
    models: list[tuple[str, str, Path, Path, int]] = [
        ("digits CNN", "cnn", _bench.DIGITS, _bench.DIGITS_TEST, CNN_EPOCHS)
    ]
    if not quick:
        models.append(
            (
                "MobileNetV2 0.35 (32x32)",
                "mobilenetv2",
                upsampled(_bench.DIGITS, work / "digits32.npz"),
                upsampled(_bench.DIGITS_TEST, work / "digits32_test.npz"),
                MOBILENET_EPOCHS,
            )
        )
    try:
        for label, arch, data, test, epochs in models:
            progress_print(f"== {label}: training {arch} ...")
            model, train_s = _bench.train_cached(
                arch, data, work / f"{arch}.keras", epochs, cache, patience=PATIENCE
            )
            if train_s == train_s:  # not NaN: trained in this run
                notes.append(f"{label}: trained in {train_s:.0f} s (up to {epochs} epochs, early stopping).")
            else:
                notes.append(
                    f"{label}: model reused from --cache (trained by an earlier run of this script)."
                )
            sample = np.load(test)["x"][:1]
            plain = float_latencies(model, sample, work)
            for quantize, prune in configs:
                tag = quantize + (f" + prune {prune:.0%}" if prune else "")
                progress_print(f"== {label}: {tag}, all targets ...")
                out = work / f"{arch}-{quantize}-{prune}"
                t0 = time.perf_counter()
                try:
                    rep = build_bundles(
                        model,
                        data,
                        ["all"],
                        out,
                        eval_data=test,
                        quantize=quantize,
                        prune=prune,
                        allow_accuracy_drop=True,
                        progress=sys.stderr.isatty(),
                    )
                except BuildError as err:
                    rep = err.report or {"targets": {}}
                except ToolchainError as err:  # the whole configuration failed (e.g. QAT cannot wrap a layer)
                    rows.append([label, tag, "all", "FAILED: " + str(err)[:120]] + [None] * 9)
                    notes.append(f"{label} {tag}: failed: {err}")
                    continue
                total_s = time.perf_counter() - t0
                if arch == "cnn" and quantize == "ptq" and not prune:
                    ok = total_s <= GOAL_CNN_BUILD_S
                    goals.append(
                        f"{'met' if ok else 'MISSED'}: all four targets of the digits CNN built (PTQ) in "
                        f"{total_s:.1f} s"
                        f" (goal <= {GOAL_CNN_BUILD_S:.0f} s; includes float references, verification in "
                        "every runtime"
                        " and latency runs)"
                    )
                float_acc = rep.get("float", {}).get("accuracy")
                float_tflite = rep.get("float", {}).get("tflite", {}).get("size_bytes")
                for target, e in rep["targets"].items():
                    if e.get("status") != "ok":
                        rows.append([label, tag, target, "FAILED: " + str(e.get("error"))[:80]] + [None] * 9)
                        if target == "x86" and "inputs" in str(e.get("error")):
                            why.add("onnx_pqat")
                        continue
                    rt_rows += runtime_rows(label, tag, target, e)
                    drop_pts = 100 * (e["float_accuracy"] - e["accuracy"])
                    lat = "; ".join(
                        f"{rt} {v['threads_N']['p50_ms']:.3f} (float "
                        f"{e['float_latency'][rt]['threads_N']['p50_ms']:.3f})"
                        for rt, v in e["latency"].items()
                    )
                    gz_ratio = e["gzip_size_bytes"] / float_tflite if float_tflite else None
                    rows.append(
                        [
                            label,
                            tag,
                            target,
                            f"{100 * e['float_accuracy']:.2f}",
                            f"{100 * e['accuracy']:.2f}",
                            f"{drop_pts:+.2f}",
                            e["size_bytes"] / 1024,
                            e["float_size_bytes"] / 1024,
                            e["gzip_size_bytes"] / 1024,
                            gz_ratio,
                            f"{100 * e['sparsity']:.1f}%" if e.get("sparsity") is not None else None,
                            lat,
                            e["build_s"],
                        ]
                    )
                    goal = GOAL_PTQ_DROP_PTS if quantize == "ptq" else GOAL_QAT_DROP_PTS
                    if prune and drop_pts > 2:
                        why.add("prune_accuracy")
                    if not prune:
                        ok = drop_pts <= goal
                        if not ok:
                            why.add("accuracy")
                        goals.append(
                            f"{'met' if ok else 'MISSED'}: {label} {target} {quantize.upper()} accuracy drop "
                            f"{drop_pts:+.2f} points (goal <= {goal} points; float {100 * float_acc:.2f}%)"
                        )
                    elif gz_ratio is not None:
                        ok = gz_ratio <= GOAL_PRUNED_GZIP_RATIO
                        if not ok:
                            why.add("gzip")
                        goals.append(
                            f"{'met' if ok else 'MISSED'}: {label} {target} {quantize.upper()} 50% pruned + "
                            "int8 + gzip = "
                            f"{gz_ratio:.3f}x the float TFLite size (goal <= {GOAL_PRUNED_GZIP_RATIO}x; "
                            "sparsity in the"
                            f" artifact {100 * (e.get('sparsity') or 0):.1f}%)"
                        )
                    if target == "x86":
                        pref = e["preferred_runtime"]
                        ours = e["latency"][pref]["threads_N"]["p50_ms"]
                        threads = e["latency"][pref]["threads_N"]["threads"]
                        # The x86 candidates run the float ONNX model; LiteRT (float .tflite) is shown too.
                        fastest = min(("onnxruntime", "openvino"), key=lambda r: plain[r][threads])
                        ok = ours <= plain[fastest][threads]
                        if not ok:
                            why.add("latency")
                        goals.append(
                            f"{'met' if ok else 'MISSED'}: {label} x86 {tag}: preferred {pref} int8 p50 "
                            f"{ours:.3f} ms vs"
                            f" fastest plain float ONNX runtime {fastest} {plain[fastest][threads]:.3f} ms "
                            f"({threads}"
                            f" threads; plain float LiteRT {plain['litert'][threads]:.3f} ms)"
                        )
            plain_txt = ", ".join(
                f"{rt} " + "/".join(f"{v:.3f}" for v in d.values()) for rt, d in plain.items()
            )
            notes.append(f"{label}: plain float model p50 ms at 1/2/4 threads: {plain_txt}.")
            if keep is not None:
                dst = keep / arch
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(work, dst, ignore=shutil.ignore_patterns("*.npz"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headers = [
        "model",
        "build",
        "target",
        "float acc %",
        "int8 acc %",
        "drop pts",
        "size KB",
        "float KB",
        "gzip KB",
        "gzip / float TFLite",
        "sparsity",
        "p50 ms per runtime at target threads (float)",
        "build s",
    ]
    body = markdown_table(headers, rows)
    body += (
        "\n**Per runtime, as the device runs it** (`per_runtime` in report.json: the bundle in "
        "`device_agent.Agent`, the agent's threads and pinned precision; accuracy one sample at a time, "
        "in batches of 64 and whole-batch; agreement is the worst path's top-1 agreement with the float "
        "model; latency is `Agent.predict` on one sample over every test image, input checks and "
        "statistics included)\n\n"
    )
    body += markdown_table(
        [
            "model",
            "build",
            "target",
            "runtime",
            "acc % batch 1",
            "acc % batch 64",
            "acc % whole batch",
            "agreement %",
            "agent p50 ms",
            "agent p95 ms",
            "threads",
            "precision",
            "parity",
        ],
        rt_rows,
    )
    body += "\n**Goals (issue 2)**\n\n" + "\n".join(f"- {g}" for g in goals) + "\n"
    if why:
        body += (
            "\n**Where it falls short, and why**\n\n"
            + "\n".join(f"- {WHY[k]}" for k in WHY if k in why)
            + "\n"
        )
    if tuple(configs) != CONFIGS:
        ran = ", ".join(q + (f" + prune {p:.0%}" if p else "") for q, p in configs)
        notes.append(f"Builds run this time: {ran} (--configs); the others were not run.")
    for r in rt_rows:
        b1, b64 = r[4], r[5]
        if b1 is not None and b64 is not None and b1 != b64:
            notes.append(
                f"{r[0]} {r[1]} {r[2]} {r[3]}: one sample at a time {b1} % vs batches of 64 {b64} %"
                " (the same samples; the runtime computes them with other kernels at batch 1)."
            )
    body += "\n**Notes**\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    intro = (
        "`benchmarks/build_bench.py`: `edgefleet build --target all` for each model and configuration, "
        "evaluated on "
        "`calibration_data/digits_test.npz` (359 images). Accuracy is measured in the device runtimes; the "
        "float "
        "reference is the Keras model (accuracy) and its plain float .tflite/.onnx (size, latency in the "
        "same runtimes, "
        "same run). Latency is one sample, p50 over 200 runs after warm-up, at the target's thread count on "
        "this "
        "2-core host (the `float` figure in brackets is the plain float model in the same runtime). Size "
        "ratios are "
        "against the float TFLite file. `sparsity` is the share of zero weights in the shipped artifact."
    )
    publish_section("build", "Build pipeline: int8 bundles vs float", body, intro=intro, path=md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits CNN only")
    ap.add_argument("--keep", type=Path, default=None, help="copy the bundles and reports here")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section into")
    ap.add_argument(
        "--cache", type=Path, default=None, help="reuse (or save) the trained models in this folder"
    )
    ap.add_argument(
        "--configs",
        default="ptq,qat,ptq+prune,qat+prune",
        help="comma-separated builds to run (default all four)",
    )
    args = ap.parse_args()
    known = {"ptq": ("ptq", None), "qat": ("qat", None), "ptq+prune": ("ptq", 0.5), "qat+prune": ("qat", 0.5)}
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in wanted if c not in known]
    if bad or not wanted:
        ap.error(f"--configs {args.configs!r}: known builds are {', '.join(known)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(args.quick, args.keep, args.cache, args.md, tuple(known[c] for c in wanted))


if __name__ == "__main__":
    main()
