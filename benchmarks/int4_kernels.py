"""mpqc's INT4 Triton kernels vs cuBLAS/cuDNN FP16 and INT8, at EfficientNet-Lite0 conv shapes and
MiniLM linear shapes, batch 1 and 64, on the CUDA GPU of this machine.

    python benchmarks/int4_kernels.py [--batches 1 64] [--models minilm minilm-token efficientnet-lite0]
                                 [--kinds linear conv] [--rep-ms 100] [--split-k-sweep-batches 1] [--out FILE]

MiniLM's linears run on its 128 tokens per sample; "minilm-token" runs them on one token per
sample, a GEMV at batch 1. INT4 linears and convs use the kernels' automatic SPLIT_K, recorded per
result; at the sweep's batches, shapes with too few output tiles to fill the GPU are also timed at
other SPLIT_K values.

Writes benchmarks/results/kernels_<device>.json. Every number is measured by this run: the device's
achievable peaks (a large device-to-device copy for bandwidth, large FP16 and INT8 matmuls for
FLOP/s) and each kernel's median time; achieved bandwidth and FLOP/s are reported as fractions of
those measured peaks, not of a datasheet. Each INT4 kernel's output is checked against its torch
reference first; if one is wrong, nothing is written. Without a GPU it says so and exits with
status 1, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent

import torch

RESULTS = HERE / "results"
SEQUENCE = 128  # MiniLM's token count per sample in mpqc's example
BLOCK = 64  # the TensorRT targets' INT4 block size
TOLERANCE = 2e-3  # fp16 outputs: relative error vs the float64 reference (rounding alone is 4.9e-4)

# Every distinct conv of EfficientNet-Lite0 at 224x224 as mpqc's passes see it (`mpqc inspect
# efficientnet-lite0`): (C_in, H = W, C_out, kernel, stride, pads (top, left, bottom, right), groups, count).
# The stride-2 convs use TensorFlow's "same" padding: more at the bottom/right than the top/left.
LITE0_CONVS = [
    (3, 224, 32, 3, 2, (0, 0, 1, 1), 1, 1),
    (32, 112, 32, 3, 1, (1, 1, 1, 1), 32, 1),
    (32, 112, 16, 1, 1, (0, 0, 0, 0), 1, 1),
    (16, 112, 96, 1, 1, (0, 0, 0, 0), 1, 1),
    (96, 112, 96, 3, 2, (0, 0, 1, 1), 96, 1),
    (96, 56, 24, 1, 1, (0, 0, 0, 0), 1, 1),
    (24, 56, 144, 1, 1, (0, 0, 0, 0), 1, 2),
    (144, 56, 144, 3, 1, (1, 1, 1, 1), 144, 1),
    (144, 56, 24, 1, 1, (0, 0, 0, 0), 1, 1),
    (144, 56, 144, 5, 2, (1, 1, 2, 2), 144, 1),
    (144, 28, 40, 1, 1, (0, 0, 0, 0), 1, 1),
    (40, 28, 240, 1, 1, (0, 0, 0, 0), 1, 2),
    (240, 28, 240, 5, 1, (2, 2, 2, 2), 240, 1),
    (240, 28, 40, 1, 1, (0, 0, 0, 0), 1, 1),
    (240, 28, 240, 3, 2, (0, 0, 1, 1), 240, 1),
    (240, 14, 80, 1, 1, (0, 0, 0, 0), 1, 1),
    (80, 14, 480, 1, 1, (0, 0, 0, 0), 1, 3),
    (480, 14, 480, 3, 1, (1, 1, 1, 1), 480, 2),
    (480, 14, 80, 1, 1, (0, 0, 0, 0), 1, 2),
    (480, 14, 480, 5, 1, (2, 2, 2, 2), 480, 1),
    (480, 14, 112, 1, 1, (0, 0, 0, 0), 1, 1),
    (112, 14, 672, 1, 1, (0, 0, 0, 0), 1, 3),
    (672, 14, 672, 5, 1, (2, 2, 2, 2), 672, 2),
    (672, 14, 112, 1, 1, (0, 0, 0, 0), 1, 2),
    (672, 14, 672, 5, 2, (1, 1, 2, 2), 672, 1),
    (672, 7, 192, 1, 1, (0, 0, 0, 0), 1, 1),
    (192, 7, 1152, 1, 1, (0, 0, 0, 0), 1, 4),
    (1152, 7, 1152, 5, 1, (2, 2, 2, 2), 1152, 3),
    (1152, 7, 192, 1, 1, (0, 0, 0, 0), 1, 3),
    (1152, 7, 1152, 3, 1, (1, 1, 1, 1), 1152, 1),
    (1152, 7, 320, 1, 1, (0, 0, 0, 0), 1, 1),
    (320, 7, 1280, 1, 1, (0, 0, 0, 0), 1, 1),
]
# Linear layers (K, N, count, rows per sample): MiniLM's per token, EfficientNet-Lite0's classifier per image.
LINEARS = {
    "minilm": [(384, 384, 24, SEQUENCE), (384, 1536, 6, SEQUENCE), (1536, 384, 6, SEQUENCE)],
    "minilm-token": [(384, 384, 24, 1), (384, 1536, 6, 1), (1536, 384, 6, 1)],
    "efficientnet-lite0": [(1280, 1000, 1, 1)],
}
MODELS = list(LINEARS)
SWEEP_METHOD = "int4_w4a16_channel"  # the split-K sweep's kernel: per-channel scales, fp16 activations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--kinds", nargs="+", default=["linear", "conv"], choices=["linear", "conv"],
                        help="layer kinds to time: conv takes most of the run (EfficientNet-Lite0's 32 convs per batch)")
    parser.add_argument("--rep-ms", type=int, default=100, help="time spent timing each kernel (triton.testing.do_bench)")
    parser.add_argument("--split-k-sweep-batches", type=int, nargs="*", default=[1],
                        help=f"batches at which {SWEEP_METHOD} is also timed at other SPLIT_K values (none: no sweep)")
    parser.add_argument("--out", help="output file (default benchmarks/results/kernels_<device>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/int4_kernels.py: no GPU available (torch.cuda.is_available() is False): nothing measured, nothing written")
        return 1
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("benchmarks/int4_kernels.py: TRITON_INTERPRET is set: the interpreter's timings are not GPU numbers; unset it")
        return 1
    # Triton and the kernels are imported only once a GPU is known to be there.
    bench = Bench(args.rep_ms, args.split_k_sweep_batches)
    peaks = bench.peaks()
    print(f"{bench.device_name}: copy {peaks['copy_gb_per_s']:.0f} GB/s, fp16 matmul {peaks['fp16_matmul_tflop_per_s']:.1f} "
          f"TFLOP/s, int8 matmul {peaks['int8_matmul_top_per_s']:.1f} TOP/s", flush=True)
    cases, failures = [], []
    for batch in args.batches:
        for model in args.models:
            for k, n, count, rows in LINEARS[model] if "linear" in args.kinds else []:
                cases.append(bench.linear_case(model, batch * rows, k, n, count, batch))
            if model == "efficientnet-lite0" and "conv" in args.kinds:
                cases += [bench.conv_case(batch, *conv) for conv in LITE0_CONVS]
    for case in cases:
        for method, result in case["results"].items():
            if result.get("max_rel_error", 0.0) > TOLERANCE:
                failures.append(f"{case['name']} batch {case['batch']} {method}: relative error {result['max_rel_error']:.3g}")
        for split, row in case.get("split_k_sweep", {}).get("runs", {}).items():
            if row["max_rel_error"] > TOLERANCE:
                failures.append(f"{case['name']} batch {case['batch']} {SWEEP_METHOD} SPLIT_K={split}: relative error {row['max_rel_error']:.3g}")
    if failures:
        print("INT4 kernels disagree with their references; nothing written:\n  " + "\n  ".join(failures))
        return 1
    from mpqc.files import write_atomically

    record = bench.record(peaks, cases)
    out = write_atomically(args.out or RESULTS / f"kernels_{slug(bench.device_name)}.json", json.dumps(record, indent=2) + "\n")
    show_summary(record["summary"])
    print(f"wrote {out}")
    return 0


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Bench:
    def __init__(self, rep_ms: int, sweep_batches: list[int]):
        import triton.testing
        from mpqc_kernels import int4_conv, int4_gemm, pack_int4, split_k

        self.do_bench, self.rep_ms = triton.testing.do_bench, rep_ms
        self.do_bench_graph = triton.testing.do_bench_cudagraph
        self.gemm, self.conv, self.pack, self.split_k = int4_gemm, int4_conv, pack_int4, split_k
        self.device_name = torch.cuda.get_device_name()
        self.multiprocessors = split_k.multiprocessors(torch.device("cuda"))
        self.sweep_batches = set(sweep_batches)
        self.gen = torch.Generator(device="cuda").manual_seed(0)
        self.peak: dict[str, float] = {}

    def time_ms(self, fn) -> float:
        # Median of runs, L2 flushed before each one (do_bench's default), so weights come from DRAM
        # as they would in a model whose other layers evicted them.
        return float(self.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median"))

    def peaks(self) -> dict[str, float]:
        """Achievable peaks measured here: the yardstick for every fraction reported."""
        size = 512 << 20  # well past any L2
        src = torch.empty(size, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = self.time_ms(lambda: dst.copy_(src))
        del src, dst
        n = 8192
        a16 = torch.randn(n, n, device="cuda", dtype=torch.float16, generator=self.gen)
        b16 = torch.randn(n, n, device="cuda", dtype=torch.float16, generator=self.gen)
        fp16_ms = self.time_ms(lambda: torch.matmul(a16, b16))
        a8 = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8, generator=self.gen)
        b8 = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8, generator=self.gen)
        # cuBLASLt runs int8 fast only with B column-major (a transposed view); row-major B ran ~8x
        # slower on an H100, so the faster of the two layouts is the peak.
        int8_ms = min(self.time_ms(lambda: torch._int_mm(a8, b8)), self.time_ms(lambda: torch._int_mm(a8, b8.t())))
        del a16, b16, a8, b8
        torch.cuda.empty_cache()
        self.peak = {
            "copy_gb_per_s": 2 * size / copy_ms / 1e6,  # read + write
            "fp16_matmul_tflop_per_s": 2 * n**3 / fp16_ms / 1e9,
            "int8_matmul_top_per_s": 2 * n**3 / int8_ms / 1e9,
        }
        return self.peak | {"copy_bytes": size, "matmul_size": n}

    def graph_ms(self, fn) -> float | None:
        """Median time of the kernel replayed in a CUDA graph: what it costs once launched, without
        Python's launch overhead (tens of microseconds for a Triton launch, more than these small
        kernels run) and with L2 warm, as in an engine that replays its layers back to back."""
        try:
            return float(self.do_bench_graph(fn, rep=self.rep_ms, return_mode="median"))
        except RuntimeError:  # a capture failure: report the plain timing only
            return None

    def measure(self, fn, nbytes: int, ops: int, int8_math: bool, check=None, split_k: int | None = None) -> dict:
        ms = self.time_ms(fn)
        graph_ms = self.graph_ms(fn)
        gbps, tops = nbytes / ms / 1e6, ops / ms / 1e9
        compute_peak = self.peak["int8_matmul_top_per_s" if int8_math else "fp16_matmul_tflop_per_s"]
        row = {
            "median_ms": ms,
            "bytes": nbytes,
            "gb_per_s": gbps,
            "tflop_per_s": tops,
            "bandwidth_fraction": gbps / self.peak["copy_gb_per_s"],
            "compute_fraction": tops / compute_peak,
            "compute_peak": "int8" if int8_math else "fp16",
            "graph_median_ms": graph_ms,
            "graph_bandwidth_fraction": None if graph_ms is None else nbytes / graph_ms / 1e6 / self.peak["copy_gb_per_s"],
            "graph_compute_fraction": None if graph_ms is None else ops / graph_ms / 1e9 / compute_peak,
        }
        if check is not None:
            row["max_rel_error"] = check()
        if split_k is not None:
            row["split_k"] = split_k  # what the kernel chose for this shape on this GPU
        return row

    def int4_weight(self, rows: int, k: int, blocks: int | None):
        q = torch.randint(-7, 8, (rows, k), device="cuda", dtype=torch.int8, generator=self.gen)
        shape = (rows,) if blocks is None else (rows, blocks)
        scale = torch.rand(shape, device="cuda", generator=self.gen) * 0.02 + 1e-3
        return q, self.pack(q), scale

    def linear_case(self, model: str, m: int, k: int, n: int, count: int, batch: int) -> dict:
        x16 = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=self.gen)
        x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=self.gen)
        _, packed_b, scale_b = self.int4_weight(n, k, -(-k // BLOCK))
        q, packed_c, scale_c = self.int4_weight(n, k, None)
        w16 = (q.float() * scale_c[:, None]).half()
        w8t = q.t()  # (K, N) view of an (N, K) matrix: cuBLASLt's preferred int8 layout
        ops, out16 = 2 * m * n * k, 2 * m * n
        gemm = self.gemm
        block_args = dict(x=x16, packed_weight=packed_b, weight_scale=scale_b, block_size=BLOCK)
        channel_args = dict(x=x16, packed_weight=packed_c, weight_scale=scale_c)
        a8_args = dict(x=x8, packed_weight=packed_c, weight_scale=scale_c, x_scale=0.02, out_dtype=torch.float16)
        split_block, split_channel = (gemm.split_k_config(m, n, k, block, self.multiprocessors) for block in (BLOCK, None))
        channel_bytes = 2 * m * k + n * k // 2 + 4 * n + out16
        results = {
            "int4_w4a16_block64": self.measure(lambda: gemm.int4_gemm(**block_args), 2 * m * k + n * k // 2 + 4 * scale_b.numel() + out16, ops, False,
                                               lambda: self.error(gemm.int4_gemm(**block_args), gemm.reference_int4_gemm(**block_args)), split_block),
            "int4_w4a16_channel": self.measure(lambda: gemm.int4_gemm(**channel_args), channel_bytes, ops, False,
                                               lambda: self.error(gemm.int4_gemm(**channel_args), gemm.reference_int4_gemm(**channel_args)), split_channel),
            "int4_w4a8_channel": self.measure(lambda: gemm.int4_gemm(**a8_args), m * k + n * k // 2 + 4 * n + out16, ops, True,
                                              lambda: self.error(gemm.int4_gemm(**a8_args), gemm.reference_int4_gemm(**a8_args)), split_channel),
            "cublas_fp16": self.measure(lambda: torch.nn.functional.linear(x16, w16), 2 * m * k + 2 * n * k + out16, ops, False),
        }
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            results["cublas_int8_int_mm"] = self.measure(lambda: torch._int_mm(x8, w8t), m * k + n * k + 4 * m * n, ops, True)
        else:
            results["cublas_int8_int_mm"] = {"skipped": f"torch._int_mm needs M > 16 and K, N multiples of 8 (M={m}, K={k}, N={n})"}
        self.show(f"{model} linear {k}->{n}", batch, results)
        case = {"kind": "linear", "model": model, "name": f"linear {k}->{n}", "batch": batch, "M": m, "K": k, "N": n,
                "count_in_model": count, "results": results}
        block_m, block_n, block_k, _ = gemm.gemm_config(m, n, None)
        tiles = -(-m // block_m) * -(-n // block_n)
        if batch in self.sweep_batches and tiles < self.multiprocessors:
            case["split_k_sweep"] = self.split_k_sweep(lambda split: gemm.int4_gemm(**channel_args, split_k=split),
                                                       gemm.reference_int4_gemm(**channel_args), k, block_k, split_channel, channel_bytes)
        return case

    def split_k_sweep(self, run, reference: torch.Tensor, k: int, block_k: int, auto: int, nbytes: int) -> dict:
        """run(split) at SPLIT_K from 1 to one K tile per slice, CUDA-graph timed: the data to tune
        kernels.split_k.choose_split_k by. Only for shapes whose output tiles leave SMs idle (the
        others are never split)."""
        k_tiles = -(-k // block_k)
        splits = sorted({self.split_k.k_slices(k, block_k, s)[0] for s in (1, 2, 4, 8, 16, 32, k_tiles)})
        runs = {}
        for split in splits:
            ms = self.graph_ms(lambda: run(split))
            runs[str(split)] = {"graph_median_ms": ms, "graph_bandwidth_fraction": None if ms is None else nbytes / ms / 1e6 / self.peak["copy_gb_per_s"],
                                "max_rel_error": self.error(run(split), reference)}
        cells = " ".join(f"{s}:{r['graph_median_ms'] * 1e3:.1f}" for s, r in runs.items() if r["graph_median_ms"])
        print(f"     split-K sweep {SWEEP_METHOD} graph us: {cells} (auto {auto})", flush=True)
        return {"method": SWEEP_METHOD, "auto": auto, "runs": runs}

    def conv_case(self, batch, cin, size, cout, kernel, stride, pads, groups, count) -> dict:
        conv = self.conv
        cg = cin // groups
        oh = (size + pads[0] + pads[2] - kernel) // stride + 1
        ow = (size + pads[1] + pads[3] - kernel) // stride + 1
        x16 = torch.randn(batch, size, size, cin, device="cuda", dtype=torch.float16, generator=self.gen)
        x8 = torch.randint(-127, 128, (batch, size, size, cin), device="cuda", dtype=torch.int8, generator=self.gen)
        q, packed, scale = self.int4_weight(cout, cg * kernel * kernel, None)
        shape = (cout, cg, kernel, kernel)
        common = dict(packed_weight=packed, weight_scale=scale, weight_shape=shape, stride=stride, padding=pads, groups=groups, layout="NHWC")
        a16 = dict(x=x16, **common)
        a8 = dict(x=x8, x_scale=0.02, out_dtype=torch.float16, **common)
        ops = 2 * batch * oh * ow * cout * cg * kernel * kernel
        out16, w4 = 2 * batch * oh * ow * cout, cout * math.ceil(cg * kernel * kernel / 2) + 4 * cout
        pixels, kg, depthwise = batch * oh * ow, cg * kernel * kernel, groups == cin == cout
        # What int4_conv2d chooses; depthwise convs have no K to split.
        plan16, plan8 = (None, None) if depthwise else (conv.implicit_gemm_plan(x, pixels, cout, groups, kg) for x in (x16, x8))
        results = {
            "int4_w4a16_channel": self.measure(lambda: conv.int4_conv2d(**a16), 2 * x16.numel() + w4 + out16, ops, False,
                                               lambda: self.error(conv.int4_conv2d(**a16), conv.reference_int4_conv2d(**a16)),
                                               plan16 and plan16[-1]),
            "int4_w4a8_channel": self.measure(lambda: conv.int4_conv2d(**a8), x8.numel() + w4 + out16, ops, True,
                                              lambda: self.error(conv.int4_conv2d(**a8), conv.reference_int4_conv2d(**a8)),
                                              plan8 and plan8[-1]),
        }
        # cuDNN pads symmetrically only: it gets the input padded once, outside the timing, as
        # (top, left, bottom, right) asks, and then does exactly the same work.
        x_padded = torch.nn.functional.pad(x16.permute(0, 3, 1, 2), (pads[1], pads[3], pads[0], pads[2]))
        x_cl = x_padded.contiguous(memory_format=torch.channels_last)
        w16 = (q.float() * scale[:, None]).half().reshape(shape).contiguous(memory_format=torch.channels_last)

        def cudnn():
            return torch.nn.functional.conv2d(x_cl, w16, stride=stride, groups=groups)

        assert cudnn().shape[2:] == (oh, ow)
        results["cudnn_fp16"] = self.measure(cudnn, 2 * x_cl.numel() + 2 * q.numel() + out16, ops, False)
        if kernel == 1 and stride == 1 and groups == 1:
            # An NHWC 1x1 conv is exactly a GEMM: (pixels, C_in) x (C_in, C_out).
            rows = x8.reshape(-1, cin)
            w8t = q.t()
            results["cublas_int8_int_mm"] = self.measure(lambda: torch._int_mm(rows, w8t), x8.numel() + q.numel() + 4 * rows.shape[0] * cout, ops, True)
        else:
            results["cublas_int8_int_mm"] = {"skipped": "torch has no INT8 convolution; only 1x1 stride-1 convs are a plain GEMM"}
        kind = "depthwise" if depthwise else "conv"
        name = f"{kind} {kernel}x{kernel} s{stride} {cin}->{cout} @{size}"
        self.show(f"efficientnet-lite0 {name}", batch, results)
        case = {"kind": "conv", "model": "efficientnet-lite0", "name": name, "batch": batch, "input_nhwc": [batch, size, size, cin],
                "weight": list(shape), "stride": stride, "pads": list(pads), "groups": groups, "output_hw": [oh, ow],
                "count_in_model": count, "results": results}
        if plan16 and batch in self.sweep_batches:
            block_m, block_n, block_k = plan16[:3]
            if -(-pixels // block_m) * -(-(cout // groups) // block_n) * groups < self.multiprocessors:
                case["split_k_sweep"] = self.split_k_sweep(lambda split: conv.int4_conv2d(**a16, split_k=split),
                                                           conv.reference_int4_conv2d(**a16), kg, block_k, plan16[-1],
                                                           2 * x16.numel() + w4 + out16)
        return case

    @staticmethod
    def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
        diff = (actual.double() - expected.double()).abs().max().item()
        return diff / max(expected.double().abs().max().item(), 1e-30)

    @staticmethod
    def show(name: str, batch: int, results: dict) -> None:
        cells = [f"{method}{'' if r.get('split_k', 1) == 1 else ' sk' + str(r['split_k'])} {r['median_ms']:.4f}/{r['graph_median_ms'] or float('nan'):.4f} ms "
                 f"({r['bandwidth_fraction']:.0%}/{r['graph_bandwidth_fraction'] or float('nan'):.0%} bw)"
                 for method, r in results.items() if "median_ms" in r]
        print(f"b{batch:<3} {name:<48} " + " | ".join(cells), flush=True)

    def record(self, peaks: dict, cases: list[dict]) -> dict:
        import triton

        from mpqc.versions import provenance

        props, made = torch.cuda.get_device_properties(0), provenance()
        return {
            "benchmark": "kernels",
            "device": {"name": self.device_name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30},
            **made,
            "versions": made["versions"] | {"triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
            "method": ("triton.testing.do_bench median, L2 flushed before each run, warmup 25 ms, "
                       f"{self.rep_ms} ms of runs; fractions are of the peaks measured in this run; "
                       "bytes count each input, weight, scale and output once; INT4 outputs are fp16; "
                       "INT4 linears and convs use the kernels' automatic SPLIT_K (split_k in each result; "
                       "split slices add up in the same launch), split_k_sweep times other values in CUDA graphs"),
            "int4_block_size": BLOCK,
            "peak_measured": peaks,
            "summary": summarize(cases),
            "cases": cases,
        }


INT4_METHODS = ("int4_w4a16_block64", "int4_w4a16_channel", "int4_w4a8_channel")


def show_summary(rows: list[dict]) -> None:
    print("summary: fastest INT4 kernel vs FP16 per case (plain do_bench | CUDA graph): faster/cases, geomean speedup, median bw of fastest")
    for row in rows:
        cells = [f"{sum_['int4_faster_than_fp16']}/{row['cases']} {sum_['geomean_speedup_vs_fp16']:.2f}x "
                 f"{sum_['median_bandwidth_fraction_of_fastest_int4']:.1%}"
                 for sum_ in (row.get("median_ms"), row.get("graph_median_ms")) if sum_]
        print(f"  {row['model']:<20} b{row['batch']:<3} " + " | ".join(cells), flush=True)


def summarize(cases: list[dict]) -> list[dict]:
    """Per model and batch: how the fastest INT4 kernel of each case compares with cuBLAS/cuDNN FP16,
    in both timings (plain do_bench with its launch overhead, and CUDA-graph replay)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for case in cases:
        groups.setdefault((case["model"], case["batch"]), []).append(case)
    rows = []
    for (model, batch), members in sorted(groups.items()):
        row = {"model": model, "batch": batch, "cases": len(members)}
        for timing in ("median_ms", "graph_median_ms"):
            ratios, best_fractions = [], []
            for case in members:
                results = case["results"]
                fp16 = results.get("cublas_fp16") or results.get("cudnn_fp16")
                int4 = [results[m] for m in INT4_METHODS if m in results and results[m].get(timing)]
                if not int4 or not fp16.get(timing):
                    continue
                best = min(int4, key=lambda r: r[timing])
                ratios.append(fp16[timing] / best[timing])
                fraction_key = "bandwidth_fraction" if timing == "median_ms" else "graph_bandwidth_fraction"
                best_fractions.append(best[fraction_key])
            if ratios:
                row[timing] = {
                    "int4_faster_than_fp16": sum(r > 1 for r in ratios),
                    "geomean_speedup_vs_fp16": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
                    "best_speedup_vs_fp16": max(ratios),
                    "median_bandwidth_fraction_of_fastest_int4": sorted(best_fractions)[len(best_fractions) // 2],
                }
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
