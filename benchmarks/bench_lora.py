"""Time one LoRA linear: frozen base GEMMs alone, our Triton paths, our torch path, PEFT's layer.

All rows run in one process on the same inputs, so the ratios are side by side:

    python benchmarks/bench_lora.py                      # GPU if present, else CPU shapes
    python benchmarks/bench_lora.py --device cpu --out benchmarks/cpu.json
    python benchmarks/bench_lora.py --shapes 8192x4096x4096x16 --dtype bf16 --profile

A shape is TOKENSxINxOUTxRANK. Modes: ``fwd`` (forward with autograd recording, as in
training), ``bwd`` (backward alone, replayed on a retained graph) and ``fwd+bwd``. The base row
is ``F.linear(x, W)`` with x requiring grad and W frozen: forward GEMM plus the dx GEMM, the
floor any LoRA layer pays. Ratios: ``x base`` = row / base (docs/kernels.md target <= 1.08 on a
GPU), ``PEFT speed-up`` = PEFT / row (target >= 1.4 on a GPU, >= 1.0 for the torch path on a CPU).
Rows ``triton`` (every GEMM in Triton, the LoRA work fused in) and ``triton-cublas`` (the big
GEMMs in cuBLAS, the dropout work in Triton) are our two GPU paths. ``--profile`` adds, per row,
the time of every kernel (GPU) or op (CPU) in one training step, from torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_kernels  # noqa: E402

GPU_SHAPES = ["8192x4096x4096x16"]
CPU_SHAPES = ["2048x1024x1024x16", "1024x2048x2048x16", "2048x1024x1024x64"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense tensor-core peak (TFLOP/s, 16-bit / tf32-less fp32) and HBM bandwidth (TB/s)
GPU_PEAKS = {
    "H200": (989.0, 67.0, 4.8),
    "H100": (989.0, 67.0, 3.35),
    "A100": (312.0, 19.5, 2.0),
}
MODES = ("fwd", "bwd", "fwd+bwd")


class _Holder(nn.Module):
    """A one-layer model PEFT can inject its LoRA layer into."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_layer(weight: torch.Tensor, rank: int, alpha: float, dropout: float) -> nn.Module:
    """PEFT's own ``lora.Linear`` around the same frozen weight, set up as ``get_peft_model``
    leaves it by default (adapters upcast to fp32 when the base is bf16/fp16)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    base = base.to(weight.dtype)
    base.weight.data = weight
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    model = inject_adapter_in_model(config, _Holder(base))
    cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=True)
    # a trained (non-zero) B, as in our rows; the FLOPs are the same either way
    nn.init.normal_(model.proj.lora_B["default"].weight, std=0.02)
    return model


Timings = dict[tuple[str, str], dict[str, float]]
Timer = Callable[[dict[tuple[str, str], Callable[[], None]], int, int], Timings]


def _timer_cpu(
    calls: dict[tuple[str, str], Callable[[], None]], warmup: int, repeats: int
) -> Timings:
    """Median (and min) of ``repeats`` wall-clock runs after ``warmup`` calls. The calls are
    interleaved round-robin so that load from other processes on a shared machine hits every
    row alike instead of whichever row happened to run during a burst."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in samples.items()}


def _timer_gpu(
    calls: dict[tuple[str, str], Callable[[], None]], warmup: int, repeats: int
) -> Timings:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) per call."""
    import triton.testing

    del warmup, repeats
    out = {}
    for key, fn in calls.items():
        median, low = triton.testing.do_bench(
            fn, warmup=25, rep=200, quantiles=[0.5, 0.0], return_mode="median"
        )
        out[key] = {"median": float(median), "min": float(low)}
    return out


def profile_step(step: Callable[[], None], device: torch.device, steps: int = 5) -> list[dict]:
    """Where one training step of a row spends its time: every GPU kernel (on CUDA) or every
    op's own CPU time, per step, largest first, from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    step()  # compiled, tuned and cached before anything is recorded
    # on a GPU the CPU activity is recorded too: kernels are matched to the ops that launched
    # them through it, and only kernels have self device time
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": event.key, "calls": event.count / steps, "us": us / steps})
    return sorted(rows, key=lambda row: -row["us"])


def _print_profile(profile: dict[str, list[dict]], top: int = 12) -> None:
    for name, kernels_ in profile.items():
        total = sum(k["us"] for k in kernels_)
        print(f"\n{name}: {total:.1f} us of self time per step (profiled)")
        for k in kernels_[:top]:
            print(f"  {k['us']:>10.1f} us {k['calls']:>5.1f}x  {k['kernel'][:90]}")


def _flops(m: int, k: int, n: int, r: int, lora: bool) -> dict[str, float]:
    base_fwd, base_bwd = 2.0 * m * n * k, 2.0 * m * n * k  # y = xW^T ; dx = dy W
    if not lora:
        return {"fwd": base_fwd, "bwd": base_bwd, "fwd+bwd": base_fwd + base_bwd}
    fwd = base_fwd + 2.0 * m * r * (k + n)  # S = xA^T, S B^T
    bwd = base_bwd + 2.0 * m * r * (2 * n + 2 * k)  # dS, dB, dA, dS A
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _bytes(m: int, k: int, n: int, elem: int) -> dict[str, float]:
    """Minimal HBM traffic of the base GEMMs: fwd reads x, W, writes y; bwd reads dy, W and
    (for dA) x, writes dx."""
    fwd = elem * (m * k + n * k + m * n)
    bwd = elem * (m * n + n * k + 2 * m * k)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bench_shape(
    m: int, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device, dropout: float,
    rows: list[str], timer: Timer, warmup: int, repeats: int, profile: dict | None = None,
) -> list[dict]:  # fmt: skip
    """Time every row and mode at one shape; with a `profile` dict, also fill it with each
    row's per-kernel breakdown of a training step (``profile_step``)."""
    alpha = 2.0 * r
    scaling = alpha / r
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    lora_a = (torch.randn(r, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    lora_b = (torch.randn(n, r, device=device, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype)
    peft_model = peft_layer(weight, r, alpha, dropout) if "peft" in rows else None
    peft_dtype = str(peft_model.proj.lora_A["default"].weight.dtype) if peft_model else None

    def ours(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: lora_kernels.lora_linear(
            x, weight, None, lora_a, lora_b, scaling, dropout, backend=backend
        )

    # row -> (forward, the leaves whose .grad each backward would otherwise accumulate into)
    forwards: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]] = {
        "base": (lambda: F.linear(x, weight), [x]),
        "triton": (ours("triton"), [x, lora_a, lora_b]),
        "triton-cublas": (ours("triton-cublas"), [x, lora_a, lora_b]),
        "torch": (ours("torch"), [x, lora_a, lora_b]),
    }
    if peft_model is not None:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        forwards["peft"] = (lambda: peft_model(x), [x, *trainable])
    calls: dict[tuple[str, str], Callable[[], None]] = {}
    graphs = []
    for row in rows:
        forward, leaves = forwards[row]

        def clear(leaves: list[torch.Tensor] = leaves) -> None:
            for leaf in leaves:
                leaf.grad = None

        def fwd(forward: Callable[[], torch.Tensor] = forward) -> None:
            forward()

        def fwd_bwd(
            forward: Callable[[], torch.Tensor] = forward, clear: Callable[[], None] = clear
        ) -> None:
            clear()
            forward().backward(dy)

        graphs.append(forward())  # backward alone is timed by replaying this retained graph

        def bwd(graph: torch.Tensor = graphs[-1], clear: Callable[[], None] = clear) -> None:
            clear()
            graph.backward(dy, retain_graph=True)

        calls[row, "fwd"], calls[row, "bwd"], calls[row, "fwd+bwd"] = fwd, bwd, fwd_bwd
    timings = timer(calls, warmup, repeats)
    del graphs
    if profile is not None:
        for row in rows:
            profile[f"{m}x{k}x{n}x{r} {row}"] = profile_step(calls[row, "fwd+bwd"], device)
    results = []
    for (row, mode), ms in timings.items():
        flops = _flops(m, k, n, r, lora=row != "base")[mode]
        results.append(
            {
                "shape": f"{m}x{k}x{n}x{r}", "tokens": m, "in": k, "out": n, "rank": r,
                "dtype": str(dtype).removeprefix("torch."), "dropout": dropout,
                "row": row, "mode": mode, "ms": ms["median"], "ms_min": ms["min"],
                "tflops": flops / (ms["median"] * 1e-3) / 1e12, "peft_adapter_dtype": peft_dtype,
            }
        )  # fmt: skip
    _add_ratios(results, m, k, n, dtype, device)
    return results


def _add_ratios(
    results: list[dict], m: int, k: int, n: int, dtype: torch.dtype, device: torch.device
) -> None:
    """x base, PEFT speed-up and, on a known GPU, % of the roofline of the base GEMMs' work
    (time the unavoidable FLOPs/bytes need at peak / measured time)."""
    by = {(r["row"], r["mode"]): r for r in results}
    peaks = _gpu_peaks(device)
    traffic = _bytes(m, k, n, torch.empty((), dtype=dtype).element_size())
    for res in results:
        base = by.get(("base", res["mode"]))
        peft = by.get(("peft", res["mode"]))
        res["x_base"] = res["ms"] / base["ms"] if base else None
        res["peft_speedup"] = peft["ms"] / res["ms"] if peft else None
        res["roofline_pct"] = None
        if peaks is not None:
            flops_peak = peaks[0] if dtype != torch.float32 else peaks[1]
            flops = _flops(m, k, n, res["rank"], lora=False)[res["mode"]]
            floor_ms = max(flops / (flops_peak * 1e12), traffic[res["mode"]] / (peaks[2] * 1e12))
            res["roofline_pct"] = 100.0 * floor_ms * 1e3 / res["ms"]


def _gpu_peaks(device: torch.device) -> tuple[float, float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in GPU_PEAKS.items() if key in name), None)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    info["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):  # other processes' load: CPU timings are only as good as this
        info["loadavg_1_5_15_before"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def _print_table(results: list[dict]) -> None:
    header = f"{'shape':>20} {'row':>13} {'mode':>8} {'ms':>10} {'x base':>7} {'PEFT sp.':>8} " \
             f"{'TFLOP/s':>8} {'%roof':>6}"  # fmt: skip
    print(header)
    print("-" * len(header))

    def fmt(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    for r in results:
        print(
            f"{r['shape']:>20} {r['row']:>13} {r['mode']:>8} {r['ms']:>10.3f} "
            f"{fmt(r['x_base'], '.3f'):>7} {fmt(r['peft_speedup'], '.3f'):>8} "
            f"{r['tflops']:>8.3f} {fmt(r['roofline_pct'], '.1f'):>6}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--shapes", nargs="+", help="TOKENSxINxOUTxRANK ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--rows", nargs="+", choices=["base", "triton", "triton-cublas", "torch", "peft"]
    )
    parser.add_argument("--warmup", type=int, default=2, help="CPU timer warm-up calls")
    parser.add_argument("--repeats", type=int, default=9, help="CPU timer: median of this many")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel (GPU) or per-op (CPU) times of each row's training step")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    gpu_rows = ["base", "triton", "triton-cublas", "torch", "peft"]
    rows = args.rows or (gpu_rows if on_gpu else ["base", "torch", "peft"])
    if any(row.startswith("triton") for row in rows) and not on_gpu:
        parser.error("the triton rows need a CUDA device (the interpreter is not a benchmark)")
    shapes = args.shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    timer = _timer_gpu if on_gpu else _timer_cpu

    torch.manual_seed(0)
    machine = _machine(device)
    print(json.dumps(machine))
    results: list[dict] = []
    profile: dict[str, list[dict]] | None = {} if args.profile else None
    for shape in shapes:
        try:
            m, k, n, r = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not TOKENSxINxOUTxRANK (e.g. 2048x1024x1024x16)")
        results += bench_shape(
            m, k, n, r, dtype, device, args.dropout, rows, timer, args.warmup, args.repeats,
            profile,
        )  # fmt: skip
    if hasattr(os, "getloadavg"):
        machine["loadavg_1_5_15_after"] = os.getloadavg()
    _print_table(results)
    report = {"machine": machine, "rows": rows, "results": results}
    if profile is not None:
        _print_profile(profile)
        report["profile"] = profile
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
