"""Benchmark set-up: thread pinning, a header naming device and versions, and the ratio table.

Every timing of a run is collected in RESULTS by (phase, batch, implementation); the terminal
summary prints fused / reference / backprop side by side with their ratios and writes them to
benchmarks/results/latest.json.
"""

import json
import os
import platform
from pathlib import Path

import torch

import dtp_ext
from dtp_ext import ops

RESULTS = {}  # (phase, batch) -> {implementation: {"median_s": ..., "peak_mem_mb": ...}}
THREADS = int(os.environ.get("DTP_BENCH_THREADS", os.cpu_count() or 1))
DEVICE = os.environ.get("DTP_BENCH_DEVICE", "cpu")


def pytest_configure(config):
    torch.set_num_threads(THREADS)


def device_name():
    if DEVICE.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(DEVICE))
    return platform.processor() or platform.machine()


def cpu_features():
    """The CPU model and whether it has the bfloat16 instructions oneDNN uses (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    yes = lambda f: "yes" if f in flags else "no"
    line = f"cpu {model}, AVX512-BF16 {yes('avx512_bf16')}, AMX-BF16 {yes('amx_bf16')}"
    # What the pooled passes take here, as the extension decides it (the CPU's flags).
    line += f", AVX-512 window kernels {'on' if ops.cpu_vector_kernels_enabled() else 'off'}"
    chosen = "bf16" if dtp_ext.hardware.missing_bfloat16("cpu") is None else "fp32"
    line += f", --precision auto picks {chosen}"
    if not flags & {"avx512_bf16", "amx_bf16"}:
        line += (
            " (no bfloat16 instructions: oneDNN emulates bfloat16 products in float32 here, "
            "so the bfloat16 column is not expected to be faster)"
        )
    return line


def pytest_report_header(config):
    info = dtp_ext.build_info()
    return (
        f"dtp_ext benchmarks: device={DEVICE} ({device_name()}), threads={THREADS}, "
        f"torch {torch.__version__}, dtp_ext {info['dtp_ext_version']}, "
        f"cuda kernels: {bool(info['cuda_kernels'])}\n{cpu_features()}"
    )


def record(phase, batch, implementation, benchmark, peak_mem_mb=None):
    stats = benchmark.stats.stats
    RESULTS.setdefault((phase, batch), {})[implementation] = {
        "median_s": stats.median,
        "min_s": stats.min,
        "rounds": len(stats.data),
        "peak_mem_mb": peak_mem_mb,
    }


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("dtp_ext ratios (median times, same run)")
    tr.write_line(
        f"device {DEVICE} ({device_name()}), threads {THREADS}, torch {torch.__version__}"
    )
    tr.write_line(cpu_features())
    tr.write_line(
        f"{'phase':<16}{'batch':>6}{'fused s':>10}{'reference s':>13}{'backprop s':>12}"
        f"{'ref/fused':>11}{'fused/bp':>10}{'peak MB f/r/bp':>20}"
    )
    rows = []
    for (phase, batch), impls in sorted(RESULTS.items()):
        f, r, b = (impls.get(k, {}).get("median_s") for k in ("fused", "reference", "backprop"))
        ratio_ref = r / f if f and r else None
        ratio_bp = f / b if f and b else None
        fmt = lambda v, w, p=3: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
        mem = "/".join(
            f"{impls[k]['peak_mem_mb']:.0f}"
            if impls.get(k, {}).get("peak_mem_mb") is not None
            else "-"
            for k in ("fused", "reference", "backprop")
        )
        tr.write_line(
            f"{phase:<16}{batch:>6}{fmt(f, 10)}{fmt(r, 13)}{fmt(b, 12)}"
            f"{fmt(ratio_ref, 10, 2)}x{fmt(ratio_bp, 9, 2)}x{mem:>20}"
        )
        row = {
            "phase": phase,
            "batch": batch,
            **{k: v for k, v in impls.items()},
            "reference_over_fused": ratio_ref,
            "fused_over_backprop": ratio_bp,
        }
        low = impls.get("fused-bf16", {}).get("median_s")
        if low:  # the bf16 targets: >= 1.7x the float32 fused phase, >= 3.5x the reference
            row["fused_over_fused_bf16"] = f / low if f else None
            row["reference_over_fused_bf16"] = r / low if r else None
            tr.write_line(
                f"{'  bfloat16':<16}{batch:>6}{fmt(low, 10)}   fused/bf16 "
                f"{fmt(row['fused_over_fused_bf16'], 0, 2)}x, reference/bf16 "
                f"{fmt(row['reference_over_fused_bf16'], 0, 2)}x"
            )
        graphed = impls.get("fused-graphs", {}).get("median_s")
        if graphed:  # the loops replayed from CUDA graphs (GPU only)
            row["fused_over_fused_graphs"] = f / graphed if f else None
            tr.write_line(
                f"{'  CUDA graphs':<16}{batch:>6}{fmt(graphed, 10)}   fused/graphs "
                f"{fmt(row['fused_over_fused_graphs'], 0, 2)}x"
            )
        rows.append(row)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {
        "device": DEVICE,
        "device_name": device_name(),
        "threads": THREADS,
        "torch": torch.__version__,
        "build_info": dtp_ext.build_info(),
    }
    (out / f"latest-{DEVICE.split(':')[0]}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
