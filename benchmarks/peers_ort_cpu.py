"""mpqc beside the other quantizers on ONNX Runtime CPU, timed in one harness, interleaved.

For each model, every method quantizes the same FP32 ONNX model (the one mpqc lowers) from the
same calibration data:

- `ort:all`, `ort:conv-matmul`: ONNX Runtime's `quantize_static` (after `quant_pre_process`), QDQ,
  per-channel, QUInt8 activations / QInt8 weights, on every op type it quantizes or on Conv, Gemm
  and MatMul only (benchmarks/peers_ort_worker.py, in a process of its own);
- `inc:tuned`: Intel Neural Compressor 2.6's accuracy-aware tuning (relative loss 0.05 of the FP32
  metric; it stops at the first model that meets it, within --inc-timeout), run by benchmarks/peers_inc_worker.py in a virtual environment of its own that this
  script creates on first use under benchmarks/.peers-venv/ (INC's ONNX adaptor needs onnx 1.16);
  it tunes on the calibration set unless --inc-tune-on heldout; --reuse-inc takes its model from
  an earlier run in --work that tuned the same FP32 model (timed again in this run's harness);
- `mpqc:uniform:w8a8`: `mpqc build MODEL --target ort-cpu --policy uniform:w8a8`;
- `mpqc:front`: `mpqc build MODEL --target ort-cpu --policy search --pareto ms` (`mpqc profile`
  first where the build asks for it, up to 3 times while it refuses the fit as noisy, every refusal
  recorded, then with --force-fit where --profile-force-fit is given), which measures its searched points beside FP32 and the
  uniform policies and keeps the ones no other measured point beats; then `mpqc export` of every
  policy on that measured front (the dropped ones are listed with the build's numbers).

mpqc runs as its command-line program, as users run it. Then one harness loads FP32 and every
model into ONNX Runtime sessions with the ort-cpu target's settings and times them at batch 1 in
interleaved rounds: each round runs every model (in a rotated order) for --warmup untimed and
--runs timed runs; median_ms is the median of the round medians, p90_ms the 90th percentile of all
timed runs, speedup_vs_fp32 the FP32 median over the model's. Fidelity is measured on held-out
data against the FP32 model's outputs, with one metric per model for every method:

- efficientnet-lite0: top-1 agreement (the example's fidelity) on 480 crops of five held-out
  photographs (96 each; the example's own 128 crops of four resolve only 0.8 points);
- minilm: mean cosine of the sentence embeddings (mpqc.bench.fidelity.output_agreement), its
  held-out sentences;
- ppocrv4-det: PP-OCRv4's text detector (ch_PP-OCRv4_det_infer.onnx, shipped inside the
  rapidocr-onnxruntime 1.4.4 wheel, installed from PyPI without its dependencies under
  benchmarks/.peers-venv/ unless the package is importable; it downloads nothing when run), an
  ONNX-only model mpqc was never tuned for, at 1x3x320x320: pixel IoU of the text masks (map >
  0.3, its DB post-processing's threshold) pooled over held-out crops. Its data are crops of real
  photographs bundled with scikit-image, scikit-learn and matplotlib, the calibration and held-out
  crops from different photographs (three held-out ones carry text: a sign, a clock, matplotlib's
  logo); `metric_support` records how many held-out crops and pixels the FP32 detector finds text
  in, i.e. what the IoU rests on. Its input's
  height and width are open, as shipped; --ocr-fixed-size gives every method a copy with them
  pinned at 320 instead.

    python benchmarks/peers_ort_cpu.py [--models efficientnet-lite0 minilm ppocrv4-det] [--rounds 7] [--skip-inc]

Every model's "criteria" are the pass/fail checks of benchmarks/peers_criteria.py on its measured
points (peers matched, uniform w8a8 against ort:all, the front's speed and monotonicity with paired
bootstrap intervals, the speed-up at INC's fidelity).

Writes benchmarks/results/peers_ort_cpu.json (--out-json) and the .png beside it. A method or
model that fails is recorded with "error" (and null numbers), never left out. Every number in the
output is measured by this run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
from peers_criteria import criteria  # (its sibling: the checks on every model's measured points)

HERE = pathlib.Path(__file__).resolve().parent


def _load_worker():
    spec = importlib.util.spec_from_file_location("peers_inc_worker", HERE / "peers_inc_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WORKER = _load_worker()  # its metrics (numpy only): the tuner and this harness define them once
METRICS, text_mask_iou = _WORKER.METRICS, _WORKER.text_mask_iou

RESULTS = HERE / "results"
# `mpqc profile` refuses a fit a noisy stretch of measurements does not support; a user profiles again.
PROFILE_ATTEMPTS = 3
PEERS_DIR = HERE / ".peers-venv"  # gitignored: INC's virtual environment and the OCR wheel's files
INC_VENV = PEERS_DIR / "inc"
# onnxruntime 1.18 has no QLinearMatMul kernel for the opset-21 models mpqc hands out; 1.20 has.
INC_REQUIREMENTS = ["neural-compressor==2.6", "onnx==1.16.2", "onnxruntime==1.20.1", "numpy<2",
                    "six"]  # INC 2.6 imports six without declaring it
OCR_PACKAGE, OCR_VERSION = "rapidocr_onnxruntime", "1.4.4"
OCR_MODEL = "models/ch_PP-OCRv4_det_infer.onnx"
HELDOUT_PER_PHOTO = 96  # efficientnet-lite0: 480 held-out crops, one crop is 0.2 points of top-1
OCR_SIZE = 320  # a multiple of 32, as the detector needs
OCR_CROPS = {"calibration": 32, "heldout": 112}
# Source photographs of the detector's crops, split by photograph: (library, name). Three held-out
# photographs carry text (a sign, a clock's face, matplotlib's logo): with the sign alone, 2 of 40
# crops held every text pixel the FP32 detector found, and one false blob moved the IoU by 0.2.
OCR_PHOTOS = {
    "calibration": [("skimage", "page"), ("skimage", "logo"), ("skimage", "astronaut"), ("skimage", "coffee"),
                    ("sklearn", "china.jpg")],
    "heldout": [("skimage", "text"), ("skimage", "clock"), ("matplotlib", "logo2.png"), ("skimage", "rocket"),
                ("skimage", "chelsea"), ("skimage", "stereo_motorcycle"), ("sklearn", "flower.jpg")],
}
MODELS = ["efficientnet-lite0", "minilm", "ppocrv4-det"]
METHODS = ["fp32", "ort:all", "ort:conv-matmul", "inc:tuned", "mpqc:uniform:w8a8", "mpqc:front"]
INC_GOAL = 0.95  # relative accuracy loss 0.05


@dataclasses.dataclass
class Case:
    """One model: the FP32 file every method quantizes, its data and its fidelity metric."""

    name: str
    spec: str  # the MODEL argument of the mpqc commands
    metric: str
    fp32: pathlib.Path
    calibration: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    calibration_npz: pathlib.Path
    heldout_npz: pathlib.Path
    mpqc_args: list[str]  # --proxy for a model without bundled data
    info: dict
    heldout_sources: np.ndarray | None = None  # the photograph each held-out sample comes from, where known


# ---------------------------------------------------------------------------------------------
# Models and data


def save_npz(path: pathlib.Path, feeds: dict[str, np.ndarray]) -> pathlib.Path:
    np.savez(path, **feeds)
    return path


def save_fp32(analysis, path: pathlib.Path) -> pathlib.Path:
    import onnx
    import onnx_ir as ir

    onnx.save(ir.to_proto(analysis.model), path)
    return path


def example_case(name: str, work: pathlib.Path) -> Case:
    from mpqc.data.photos import heldout_study_crops
    from mpqc.data.proxy import ProxySource, proxy_feeds
    from mpqc.passes.analysis import analyze

    analysis = analyze(name)
    calibration, origin = proxy_feeds(ProxySource(None), analysis.loaded)
    heldout, _ = analysis.loaded.example.eval_feeds()
    described = f"the example's held-out set ({_count(heldout)} samples)"
    sources = None
    if name == "efficientnet-lite0":  # the example's 128 crops of 4 photographs resolve top-1 to 0.8 points only
        crops, sources = heldout_study_crops(HELDOUT_PER_PHOTO)
        heldout = {analysis.loaded.input_names[0]: crops}
        described = (f"{len(crops)} crops, {HELDOUT_PER_PHOTO} of each held-out photograph: "
                     + ", ".join(dict.fromkeys(sources)) + " (mpqc.data.photos.heldout_study_crops)")
    metric = "top1_agreement" if name == "efficientnet-lite0" else "cosine_mean"
    folder = work / name
    return Case(name, name, metric, save_fp32(analysis, folder / "fp32.onnx"), calibration, heldout,
                save_npz(folder / "calibration.npz", calibration), save_npz(folder / "heldout.npz", heldout), [],
                {"fp32_model": f"mpqc's canonical FP32 model of the bundled example {name}",
                 "data": {"calibration": f"{origin} ({_count(calibration)} samples)", "heldout": described}},
                None if sources is None else np.asarray(sources))


def ocr_model_file() -> tuple[pathlib.Path, str]:
    """The detector inside the installed package, else inside its wheel installed here without deps."""
    spec = importlib.util.find_spec(OCR_PACKAGE)
    if spec is not None and spec.origin:
        path = pathlib.Path(spec.origin).parent / OCR_MODEL
        if path.is_file():
            return path, "importable in this environment"
    target = PEERS_DIR / f"rapidocr-onnxruntime-{OCR_VERSION}"
    path = target / OCR_PACKAGE / OCR_MODEL
    if not path.is_file():
        shutil.rmtree(target, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                   f"rapidocr-onnxruntime=={OCR_VERSION}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(f"pip install rapidocr-onnxruntime=={OCR_VERSION} failed: {_last_line(done.stderr)}")
    return path, f"pip install --no-deps --target {target.relative_to(HERE.parent)}"


def _photo(library: str, name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) RGB float in [0, 255]."""
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    elif library == "matplotlib":
        import matplotlib.cbook
        from matplotlib import image as mpl_image

        image = mpl_image.imread(matplotlib.cbook.get_sample_data(name, asfileobj=False))
        if image.dtype != np.uint8:  # PNGs read as floats in [0, 1]
            image = image * 255.0
    else:
        from skimage import data

        image = getattr(data, name)()
        if name == "stereo_motorcycle":
            image = image[0]  # (left, right, disparity): the left view
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:  # RGBA over white
        alpha = image[:, :, 3:] / 255.0
        image = image[:, :, :3] * alpha + 255.0 * (1 - alpha)
    return image


def ocr_crops(split: str) -> np.ndarray:
    """Square crops (side 35-100% of the photo's shorter side, fixed seed) of the split's photographs,
    resized to OCR_SIZE and preprocessed as rapidocr does: BGR, x / 255, then (x - 0.5) / 0.5."""
    from skimage import transform

    photos = [_photo(*source) for source in OCR_PHOTOS[split]]
    rng = np.random.default_rng(0 if split == "calibration" else 1)
    crops = []
    for i in range(OCR_CROPS[split]):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        side = int(min(h, w) * (1.0 if i < len(photos) else rng.uniform(0.35, 1.0)))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = transform.resize(image[top : top + side, left : left + side], (OCR_SIZE, OCR_SIZE), order=1,
                                anti_aliasing=True, preserve_range=True)
        crops.append(((crop[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32)


def pin_height_and_width(source: pathlib.Path, out: pathlib.Path) -> None:
    """The detector with its input's height and width fixed at OCR_SIZE (the batch stays open)."""
    import onnx

    model = onnx.load(source)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim in dims[2:]:
        dim.Clear()
        dim.dim_value = OCR_SIZE
    del model.graph.value_info[:]  # inferred for open sizes
    onnx.save(model, out)


def ocr_case(work: pathlib.Path, fixed_size: bool) -> Case:
    from mpqc.passes.analysis import analyze

    source, how = ocr_model_file()
    folder = work / "ppocrv4-det"
    original = folder / "ch_PP-OCRv4_det_infer.onnx"
    shutil.copyfile(source, original)
    if fixed_size:
        pinned = original.with_name(f"{original.stem}-{OCR_SIZE}x{OCR_SIZE}.onnx")
        pin_height_and_width(original, pinned)
        original, how = pinned, how + f", height and width pinned at {OCR_SIZE} (--ocr-fixed-size)"
    analysis = analyze(str(original))
    name = analysis.loaded.input_names[0]
    calibration, heldout = {name: ocr_crops("calibration")}, {name: ocr_crops("heldout")}
    calibration_npz = save_npz(folder / "calibration.npz", calibration)
    fp32 = save_fp32(analysis, folder / "fp32.onnx")
    return Case("ppocrv4-det", str(original), "text_mask_iou", fp32, calibration,
                heldout, calibration_npz, save_npz(folder / "heldout.npz", heldout), ["--proxy", str(calibration_npz)],
                {"fp32_model": f"PP-OCRv4 text detector {OCR_MODEL} from the rapidocr-onnxruntime {OCR_VERSION} wheel "
                               f"({how}), as mpqc canonicalizes it; input 1x3x{OCR_SIZE}x{OCR_SIZE}",
                 "metric_definition": "pixel IoU of the text masks (probability > 0.3), pooled over the held-out crops",
                 "data": {split: f"{OCR_CROPS[split]} crops of " + ", ".join(f"{lib}:{n}" for lib, n in OCR_PHOTOS[split])
                          for split in OCR_PHOTOS},
                 "metric_support": text_support(fp32, heldout[name])})


def text_support(fp32_model: pathlib.Path, crops: np.ndarray) -> dict:
    """How much text the FP32 detector finds in the held-out crops: the pixels the IoU is pooled over."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(fp32_model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    per_crop = [int((session.run(None, {name: crops[i : i + 1]})[0] > _WORKER.TEXT_THRESHOLD).sum()) for i in range(len(crops))]
    return {"heldout_crops": len(per_crop), "crops_with_text": sum(n > 0 for n in per_crop), "text_pixels": sum(per_crop),
            "largest_crop_share": max(per_crop) / max(sum(per_crop), 1)}


def make_case(name: str, work: pathlib.Path, ocr_fixed_size: bool = False) -> Case:
    (work / name).mkdir(parents=True, exist_ok=True)
    return ocr_case(work, ocr_fixed_size) if name == "ppocrv4-det" else example_case(name, work)


def _count(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


# ---------------------------------------------------------------------------------------------
# Peers


def ort_quantize(case: Case, op_types: list[str] | None, out: pathlib.Path, timeout_s: int) -> dict:
    """benchmarks/peers_ort_worker.py in a process of its own (see there why)."""
    command = [sys.executable, "-P", str(HERE / "peers_ort_worker.py"), "--model", str(case.fp32), "--calib",
               str(case.calibration_npz), "--out", str(out), *(["--op-types", *op_types] if op_types else [])]
    log = out.with_suffix(".log")
    rc = run_logged(command, log, timeout_s)
    if rc != 0 or not out.is_file():
        return {"error": f"ONNX Runtime's quantizer exited with status {rc}: {_last_line(log.read_text(errors='replace'))}"}
    pre = out.with_name("fp32-preprocessed.json")
    pre_settings = json.loads(pre.read_text()).get("settings", "?") if pre.is_file() else "?"
    return {"model": out, "settings": {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
                                       "weight_type": "QInt8", "calibrate_method": "MinMax",
                                       "op_types_to_quantize": op_types or "all",
                                       "quant_pre_process": pre_settings}}


def inc_python() -> pathlib.Path:
    """INC's virtual environment, created (and its packages installed) when it is not there yet."""
    python = INC_VENV / "bin" / "python"
    marker = INC_VENV / "peers-requirements.txt"
    wanted = "\n".join(INC_REQUIREMENTS) + "\n"
    if python.exists() and marker.is_file() and marker.read_text() == wanted:
        return python
    shutil.rmtree(INC_VENV, ignore_errors=True)
    print(f"creating INC's virtual environment in {INC_VENV} ...", file=sys.stderr, flush=True)
    for command in ([sys.executable, "-m", "venv", str(INC_VENV)],
                    [str(python), "-m", "pip", "install", "--quiet", *INC_REQUIREMENTS]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"'{' '.join(command[:4])} ...' failed: {_last_line(done.stderr or done.stdout)}")
    marker.write_text(wanted)
    return python


def inc_quantize(case: Case, out: pathlib.Path, timeout_s: int, tune_on: str, reuse: bool = False) -> dict:
    import onnx

    fp32 = onnx.load(case.fp32)
    fp32.ir_version = min(fp32.ir_version, 10)  # onnx 1.16 reads IR 10 at most
    # INC optimizes the graph (ONNX Runtime's basic level) and then infers shapes; the recorded
    # intermediate shapes of the unoptimized graph contradict it ("Inferred shape and existing shape
    # differ"), so it gets the model without them.
    del fp32.graph.value_info[:]
    model = out.with_name("fp32-for-inc.onnx")
    result = out.with_name("inc-result.json")
    given = fp32.SerializeToString()
    if reuse and result.is_file() and model.is_file() and model.read_bytes() == given:
        record = json.loads(result.read_text())
        if "error" in record or out.is_file():  # the same FP32 model: INC's tuning would search the same way again
            return record | {"reused": "INC's outcome from an earlier run of this script on the same FP32 model (--reuse-inc)"}
    python = inc_python()
    model.write_bytes(given)
    tuning_npz = case.calibration_npz if tune_on == "calibration" else case.heldout_npz
    command = [str(python), "-P", str(HERE / "peers_inc_worker.py"), "--model", str(model), "--calib", str(case.calibration_npz),
               "--eval", str(tuning_npz), "--metric", case.metric, "--goal", str(INC_GOAL), "--out", str(out),
               "--result", str(result)]
    log = out.with_name("inc.log")
    rc = run_logged(command, log, timeout_s)
    record = json.loads(result.read_text()) if result.is_file() else {}
    record |= {"tuned_on": f"the {tune_on} set", "goal": f"{INC_GOAL:g} x the FP32 {case.metric} (relative loss {1 - INC_GOAL:.2g})",
               "stops": "at the first model that meets the goal (INC's default), else after 100 trials", "limit_s": timeout_s}
    if rc == -9:
        evaluations = log.read_text(errors="replace").count("[inc worker] evaluation")
        record["error"] = f"INC did not finish within {timeout_s} s (--inc-timeout; {evaluations} evaluations, none met the goal)"
    elif rc != 0 and "error" not in record:
        record["error"] = f"INC worker exited with status {rc}: {_last_line(log.read_text(errors='replace'))}"
    if "error" not in record and not out.is_file():
        record["error"] = "INC worker wrote no model"
    return record


# ---------------------------------------------------------------------------------------------
# mpqc, through its command line


def mpqc_command() -> list[str]:
    """The `mpqc` program of this Python environment, as users run it."""
    program = pathlib.Path(sys.executable).with_name("mpqc")
    return [str(program)] if program.is_file() else [sys.executable, "-m", "mpqc.cli"]


def mpqc(args: list[str], log: pathlib.Path, timeout_s: int) -> tuple[int, str]:
    """Run `mpqc ARGS --json` from the log's folder; (exit status, its error line or '')."""
    env = os.environ | {"MPQC_DEBUG": "1"}  # an internal error shows its traceback in the log
    rc = run_logged([*mpqc_command(), *args, "--json"], log, timeout_s, env=env, cwd=log.parent)
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("mpqc: error:")]
    if rc == 0:
        return 0, ""
    if errors:
        return rc, errors[-1]
    if "Traceback (most recent call last)" in text:
        return rc, "traceback: " + _last_line(text) + f" (see {log})"
    return rc, f"exit status {rc}: {_last_line(text)}"


def mpqc_build(case: Case, policy: list[str], out: pathlib.Path, tables: pathlib.Path, timeout_s: int, log_lines: list[str],
               profile_extra: tuple[str, ...] = (), measure: bool = False) -> dict:
    """`mpqc build`, after `mpqc profile` when the build says the latency table lacks this model."""
    args = ["build", case.spec, "--target", "ort-cpu", *policy, "--out", str(out), "--tables", str(tables),
            *([] if measure else ["--no-measure"]), *case.mpqc_args]
    record: dict = {}
    start = time.perf_counter()
    rc, error = mpqc(args, out.with_name(out.name + ".build.log"), timeout_s)
    if rc != 0 and "mpqc profile" in error:
        profile_start = time.perf_counter()
        profile_args = ["profile", case.spec, "--target", "ort-cpu", "--tables", str(tables), *case.mpqc_args]
        refusals = []
        # As the refusal says: profile again (the layer measurements are kept); `profile_extra`
        # (--force-fit) only once every attempt has been refused.
        for attempt in range(PROFILE_ATTEMPTS + bool(profile_extra)):
            if attempt == PROFILE_ATTEMPTS:
                profile_args += profile_extra
            prc, perror = mpqc(profile_args, out.with_name(out.name + f".profile-{attempt}.log"), timeout_s)
            if prc == 0 or "the fit was not written" not in perror:
                break
            refusals.append(perror)
        record["profile_s"] = time.perf_counter() - profile_start
        record["profile_command"] = "mpqc " + " ".join(profile_args)  # --force-fit shows here where given
        record["profile_refusals"] = refusals  # every refused fit, in order: none written
        log_lines += [f"mpqc {' '.join(args)}  # asked for a profile", f"mpqc {' '.join(profile_args)}"]
        if prc != 0:
            return record | {"error": f"mpqc profile: {perror}"}
        start = time.perf_counter()
        rc, error = mpqc(args, out.with_name(out.name + ".build.log"), timeout_s)
    log_lines.append(f"mpqc {' '.join(args)}")
    record["build_s"] = time.perf_counter() - start
    return record | ({"error": f"mpqc build: {error}"} if rc != 0 else {})


def mpqc_front(case: Case, folder: pathlib.Path, tables: pathlib.Path, timeout_s: int, log_lines: list[str],
               profile_extra: tuple[str, ...] = ()) -> list[dict]:
    """One point per policy on the front mpqc's build measured (its searched points, FP32 and the
    uniform policies, timed interleaved; the points another measured point beats are dropped), each
    exported to its own model. The dropped ones are listed, not timed again."""
    build_dir = folder / "search"
    record = mpqc_build(case, ["--policy", "search", "--pareto", "ms"], build_dir, tables, timeout_s, log_lines, profile_extra,
                        measure=True)
    if "error" in record:
        return [{"method": "mpqc:front"} | record]
    front = json.loads((build_dir / "pareto.json").read_text())
    measured = front.get("measured")
    if measured is None:
        return [{"method": "mpqc:front", "error": "the --pareto build wrote no measured points"} | record]
    on_front = [m for m in measured["points"] if m["on_measured_front"] and m["layers"] is not None]
    dropped = [{key: m[key] for key in ("source", "predicted_ms", "measured_ms", "fidelity")}
               for m in measured["points"] if not m["on_measured_front"]]
    points = []
    for index, chosen in enumerate(on_front):
        entry = {"method": "mpqc:front", "source": chosen["source"], "predicted_ms": chosen["predicted_ms"],
                 "build_measured_ms": chosen["measured_ms"], "build_fidelity": chosen["fidelity"],
                 "build_fidelity_metric": measured["metric"], "counts": _counts(chosen["layers"]),
                 "built_point": chosen["source"] == measured["built"]}
        policy = folder / f"policy-{index:02d}.json"
        policy.write_text(json.dumps({"format": "mpqc.policy/1", "source": f"pareto.json measured {chosen['source']}",
                                      "layers": chosen["layers"]}, indent=1) + "\n")
        out = folder / f"point-{index:02d}"
        args = ["export", case.spec, "--target", "ort-cpu", "--policy", str(policy), "--out", str(out), "--no-measure",
                *case.mpqc_args]
        start = time.perf_counter()
        rc, error = mpqc(args, folder / f"point-{index:02d}.export.log", timeout_s)
        log_lines.append(f"mpqc {' '.join(args)}")
        entry["export_s"] = time.perf_counter() - start
        if rc != 0:
            entry["error"] = f"mpqc export: {error}"
        else:
            entry["model"] = out / "model.qdq.onnx"
            if entry["built_point"]:
                entry["same_bytes_as_build"] = (out / "model.qdq.onnx").read_bytes() == (build_dir / "model.qdq.onnx").read_bytes()
        points.append(entry)
    if not points:
        built = next((m for m in measured["points"] if m["source"] == measured["built"]), None)
        if built is None or built["layers"] is None or any(p != "fp32" for p in built["layers"].values()):
            return [{"method": "mpqc:front", "error": "no lowered policy is on the build's measured front (FP32 beat them all)",
                     "dropped_by_measurement": dropped} | record]
        # FP32 beat every quantized policy, so the build returned its float model: mpqc's graph
        # rewrites (folds, fused activations) and no quantized layer. It is what the user gets.
        points.append({"method": "mpqc:front", "source": built["source"], "float_only": True,
                       "note": "no quantized policy is on the build's measured front: this is the float model the build "
                               "returned (mpqc's graph rewrites, every layer fp32)",
                       "predicted_ms": built["predicted_ms"], "build_measured_ms": built["measured_ms"],
                       "build_fidelity": built["fidelity"], "build_fidelity_metric": measured["metric"],
                       "counts": _counts(built["layers"]), "built_point": True, "model": build_dir / "model.qdq.onnx"})
    points[0] |= {"search_build_s": record["build_s"], "dropped_by_measurement": dropped,
                  "predicted_front_points": len(front["points"])}
    points[0] |= {key: record[key] for key in ("profile_s", "profile_command", "profile_refusals") if key in record}
    return points


def _counts(layers: dict[str, str]) -> dict[str, int]:
    return dict(sorted(collections.Counter(layers.values()).items()))


def seed_tables(tables: pathlib.Path, fresh: bool) -> None:
    """A latency-table folder of this run's own, starting from the repository's tables (mpqc's default
    folder) unless --fresh-tables: mpqc profile writes there, not into the checkout."""
    from mpqc.targets import load_target

    tables.mkdir(parents=True, exist_ok=True)
    if fresh:
        return
    default = load_target("ort-cpu").path.parent / "ort-cpu"
    for table in default.glob("*.json") if default.is_dir() else []:
        shutil.copyfile(table, tables / table.name)


# ---------------------------------------------------------------------------------------------
# The harness


def session(path: pathlib.Path):
    import onnxruntime as ort

    from mpqc.backends.onnxruntime.runner import disabled_passes, session_options
    from mpqc.targets import load_target

    return ort.InferenceSession(str(path), session_options(load_target("ort-cpu")), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_passes(str(path)))


def first_output(sess, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return np.concatenate([sess.run(None, {n: feeds[n][i : i + 1] for n in names})[0] for i in range(_count(feeds))])


def fidelity(case: Case, reference: np.ndarray, candidate: np.ndarray) -> tuple[float, dict, np.ndarray | None]:
    """The model's metric, the model-agnostic agreement numbers, and the metric per held-out sample
    where it is a mean over samples (None for the pooled IoU)."""
    from mpqc.bench.fidelity import output_agreement, per_sample_cosine

    agreement = output_agreement(reference, candidate)
    per_sample = None
    if case.metric == "top1_agreement":
        from mpqc.examples import load_example

        value = load_example(case.name).fidelity(reference, candidate, None)["top1_agreement"]
        per_sample = (reference.argmax(axis=1) == candidate.argmax(axis=1)).astype(np.float64)
    elif case.metric == "cosine_mean":
        value = agreement["cosine_mean"]
        per_sample = per_sample_cosine(reference, candidate)
    else:
        value = text_mask_iou(reference, candidate)
    assert case.metric in METRICS
    return float(value), agreement, per_sample


def harness(case: Case, points: list[dict], rounds: int, runs: int, warmup: int) -> None:
    """Fidelity and interleaved latency of every point that has a model; fills the points in place."""
    live = []
    for point in points:
        if "error" in point:
            continue
        try:
            point["_session"] = session(point["model"])
            live.append(point)
        except Exception as exc:
            point["error"] = f"ONNX Runtime cannot load the model: {_first_line(exc)}"
    reference = first_output(live[0]["_session"], case.heldout)  # live[0] is FP32
    for point in live:
        try:
            point["fidelity"], point["output_agreement"], point["_per_sample"] = fidelity(
                case, reference, first_output(point["_session"], case.heldout))
        except Exception as exc:
            point["error"] = f"running the held-out set: {_first_line(exc)}"
    live = [p for p in live if "error" not in p]
    names = [i.name for i in live[0]["_session"].get_inputs()]
    feeds = {n: np.ascontiguousarray(case.heldout[n][:1]) for n in names}
    times = {id(p): [] for p in live}
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for point in order:
            sess = point["_session"]
            for _ in range(warmup):
                sess.run(None, feeds)
            samples = np.empty(runs)
            for i in range(runs):
                start = time.perf_counter()
                sess.run(None, feeds)
                samples[i] = time.perf_counter() - start
            times[id(point)].append(samples * 1e3)
        print(f"  {case.name}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for point in live:
        per_round = times[id(point)]
        point["median_ms"] = float(np.median([np.median(t) for t in per_round]))
        point["p90_ms"] = float(np.percentile(np.concatenate(per_round), 90))
        point["round_medians_ms"] = [float(np.median(t)) for t in per_round]
    fp32_ms = live[0]["median_ms"]
    for point in live:
        point["speedup_vs_fp32"] = fp32_ms / point["median_ms"]
    for point in points:
        point.pop("_session", None)


def model_criteria(case: Case, points: list[dict]) -> dict:
    """peers_criteria.criteria on the measured points, with their per-sample metrics (dropped from the points)."""
    per_sample = {i: values for i, p in enumerate(points) if (values := p.pop("_per_sample", None)) is not None}
    groups = case.heldout_sources if case.heldout_sources is not None and len(case.heldout_sources) == _count(case.heldout) else None
    return criteria(points, per_sample, groups)


# ---------------------------------------------------------------------------------------------


def run_model(name: str, args, work: pathlib.Path, tables: pathlib.Path) -> dict:
    print(f"{name}: preparing the FP32 model and data", file=sys.stderr, flush=True)
    metric = {"efficientnet-lite0": "top1_agreement", "minilm": "cosine_mean", "ppocrv4-det": "text_mask_iou"}[name]
    try:
        case = make_case(name, work, args.ocr_fixed_size)
    except Exception as exc:
        traceback.print_exc()
        return {"metric": metric, "points": [], "error": f"preparing the model: {_first_line(exc, True)}"}
    folder = work / name
    commands: list[str] = []
    points: list[dict] = [{"method": "fp32", "model": case.fp32}]

    def attempt(method: str, make) -> None:
        print(f"{name}: {method}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            made = make()
        except Exception as exc:
            traceback.print_exc()
            made = [{"error": _first_line(exc, True)}]
        made = made if isinstance(made, list) else [made]
        made[0].setdefault("make_s", time.perf_counter() - start)  # all of the method's points together
        points.extend({"method": method} | point for point in made)

    for method, op_types in (("ort:all", None), ("ort:conv-matmul", ["Conv", "Gemm", "MatMul"])):
        out = folder / f"{method.replace(':', '-')}.onnx"
        attempt(method, lambda out=out, op_types=op_types: ort_quantize(case, op_types, out, args.step_timeout))
    if args.skip_inc:
        points.append({"method": "inc:tuned", "error": "skipped (--skip-inc)"})
    else:
        out = folder / "inc" / "inc-tuned.onnx"
        out.parent.mkdir(exist_ok=True)
        attempt("inc:tuned", lambda: _with_model(inc_quantize(case, out, args.inc_timeout, args.inc_tune_on, args.reuse_inc), out))
    uniform = folder / "mpqc-uniform-w8a8"
    attempt("mpqc:uniform:w8a8", lambda: _with_model(
        mpqc_build(case, ["--policy", "uniform:w8a8"], uniform, tables, args.step_timeout, commands),
        uniform / "model.qdq.onnx"))
    front = folder / "mpqc-front"
    front.mkdir(exist_ok=True)
    profile_extra = ("--force-fit",) if args.profile_force_fit else ()
    attempt("mpqc:front", lambda: mpqc_front(case, front, tables, args.step_timeout, commands, profile_extra))

    print(f"{name}: measuring {sum('error' not in p for p in points)} models", file=sys.stderr, flush=True)
    try:
        harness(case, points, args.rounds, args.runs, args.warmup)
    except Exception as exc:
        traceback.print_exc()
        for point in points:
            point.pop("_session", None)
            point.setdefault("error", f"harness: {_first_line(exc, True)}")
    checks = model_criteria(case, points)
    for point in points:
        for key in NUMBERS:
            point.setdefault(key, None)
        if "model" in point:
            point["model"] = str(pathlib.Path(point["model"]).relative_to(work))
    return {"metric": case.metric, **case.info, "mpqc_commands": commands, "points": points, "criteria": checks}


NUMBERS = ("fidelity", "median_ms", "speedup_vs_fp32", "p90_ms")


def schema_problems(result: dict) -> list[str]:
    """What keeps a result from the schema: {"models": {NAME: {"metric": str, "points": [{"method",
    "fidelity", "median_ms", "speedup_vs_fp32", "p90_ms"}]}}}, every method present for every model
    (numbers null only beside an "error"); [] when it fits."""
    problems = []
    models = result.get("models")
    if not isinstance(models, dict) or not models:
        return ["\"models\" must be a non-empty object"]
    for name, model in models.items():
        if not isinstance(model, dict) or not isinstance(model.get("metric"), str) or not isinstance(model.get("points"), list):
            problems.append(f"{name}: needs \"metric\" (string) and \"points\" (array)")
            continue
        methods = [point.get("method") for point in model["points"] if isinstance(point, dict)]
        missing = [m for m in METHODS if m not in methods]
        if missing and "error" not in model:
            problems.append(f"{name}: no point for {', '.join(missing)}")
        for i, point in enumerate(model["points"]):
            if not isinstance(point, dict) or point.get("method") not in METHODS:
                problems.append(f"{name} point {i}: method must be one of {', '.join(METHODS)}")
                continue
            for key in NUMBERS:
                value = point.get(key, "absent")
                number = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
                if not number and not (value is None and isinstance(point.get("error"), str)):
                    problems.append(f"{name} {point['method']}: {key} is {value!r}, not a finite number"
                                    + ("" if "error" in point else " (and no \"error\")"))
    return problems


def _finite(value, folders: dict[str, str] | None = None):
    """The result with every infinite or NaN number (an exact model's SQNR) as null, for strict
    JSON, and each of `folders` (path -> name) written as its name in every string."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, str):
        for path, name in (folders or {}).items():
            value = value.replace(path, name)
        return value
    if isinstance(value, dict):
        return {k: _finite(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, folders) for v in value]
    return value


def _with_model(record: dict, model: pathlib.Path) -> dict:
    return record if "error" in record else record | {"model": model}


def run_logged(command: list[str], log: pathlib.Path, timeout_s: int, env: dict | None = None,
               cwd: pathlib.Path | None = None) -> int:
    """Run with stdout and stderr into `log`, in its own process group, killed whole at the timeout."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd or log.parent,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            handle.write(f"\n[killed after {timeout_s} s]\n")
            return -9
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise


def _first_line(exc: BaseException, with_type: bool = False) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if with_type or not text else text


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1][:500] if lines else "(no output)"


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), squeeze=False)
    styles = {"fp32": ("o", "black"), "ort:all": ("s", "tab:orange"), "ort:conv-matmul": ("D", "tab:red"),
              "inc:tuned": ("^", "tab:purple"), "mpqc:uniform:w8a8": ("v", "tab:green")}
    for ax, name in zip(axes[0], names):
        model = result["models"][name]
        ok = [p for p in model["points"] if p.get("fidelity") is not None and p.get("speedup_vs_fp32") is not None]
        failed = sorted({p["method"] for p in model["points"] if p not in ok})
        front = sorted((p for p in ok if p["method"] == "mpqc:front"), key=lambda p: p["speedup_vs_fp32"])
        if front:
            ax.plot([p["speedup_vs_fp32"] for p in front], [p["fidelity"] for p in front], "-o", color="tab:blue",
                    markersize=4, label="mpqc:front")
        for method, (marker, color) in styles.items():
            for i, p in enumerate(p for p in ok if p["method"] == method):
                ax.scatter(p["speedup_vs_fp32"], p["fidelity"], marker=marker, color=color, s=60, zorder=3,
                           label=method if i == 0 else None)
        ax.set_title(name + (f"\n(no result: {', '.join(failed)})" if failed else ""), fontsize=9)
        ax.set_xlabel("speed-up vs FP32 (median latency, batch 1)")
        ax.set_ylabel(model["metric"] + " vs FP32 (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"ONNX Runtime {result.get('onnxruntime', '')} CPU, batch 1\n{result['machine']['cpu']}; "
                 f"{result['threads']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed runs of every model in each round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of every model before its timed runs in each round")
    parser.add_argument("--skip-inc", action="store_true", help="record inc:tuned as skipped instead of running INC")
    parser.add_argument("--inc-timeout", type=int, default=1800, help="time limit of INC's tuning per model, seconds")
    parser.add_argument("--reuse-inc", action="store_true",
                        help="take INC's tuned model from an earlier run in --work when it tuned the same FP32 model (it is timed again)")
    parser.add_argument("--inc-tune-on", choices=["calibration", "heldout"], default="calibration",
                        help="the data INC's accuracy-aware tuning evaluates on (fidelity is always reported on held-out)")
    parser.add_argument("--step-timeout", type=int, default=7200, help="limit for one mpqc command, seconds")
    parser.add_argument("--fresh-tables", action="store_true", help="profile from an empty latency table")
    parser.add_argument("--profile-force-fit", action="store_true",
                        help=f"after {PROFILE_ATTEMPTS} refused profiles, pass --force-fit to mpqc profile (writes the boundary fit "
                             "even on a noisy machine; the table records why)")
    parser.add_argument("--ocr-fixed-size", action="store_true",
                        help=f"give every method the detector with height and width pinned at {OCR_SIZE} instead of open, as shipped")
    parser.add_argument("--work", help="keep the models and logs in this folder (default: a temporary one)")
    parser.add_argument("--out-json", default=str(RESULTS / "peers_ort_cpu.json"))
    parser.add_argument("--update", action="store_true",
                        help="keep the other models of an existing --out-json (each model records its own run's date and load)")
    args = parser.parse_args()

    import onnxruntime

    from mpqc.targets import load_target
    from mpqc.versions import machine, versions

    runtime = load_target("ort-cpu").runtime
    work = pathlib.Path(args.work).resolve() if args.work else pathlib.Path(tempfile.mkdtemp(prefix="mpqc-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    tables = work / "tables"
    seed_tables(tables, args.fresh_tables)
    start = time.perf_counter()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(),
        "onnxruntime": onnxruntime.__version__,
        "threads": f"intra-op {runtime.intra_op_num_threads}, inter-op {runtime.inter_op_num_threads}, "
                   f"graph optimization {runtime.graph_optimization_level}",
        "batch": 1,
        "rounds": args.rounds,
        "runs_per_round": args.runs,
        "warmup_per_round": args.warmup,
        "inc": {"requirements": INC_REQUIREMENTS, "goal": INC_GOAL, "tuned_on": args.inc_tune_on,
                "timeout_s": args.inc_timeout} if not args.skip_inc else "skipped",
        "work": "WORK in paths: the run's folder of models and logs (--work, else a temporary one)",
        "models": {},
    }
    out = pathlib.Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.is_file():
        result["models"] = {name: model for name, model in json.loads(out.read_text())["models"].items()
                            if name not in args.models}
    for name in args.models:
        load_before = os.getloadavg()
        model_start = time.perf_counter()
        result["models"][name] = run_model(name, args, work, tables) | {
            "run": {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - model_start,
                    "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
                    "rounds": args.rounds, "runs_per_round": args.runs}}
        result["seconds"] = time.perf_counter() - start
        # Paths as WORK/... and ./benchmarks/...: the result names no folder of this machine.
        portable = _finite(result, {str(work): "WORK", str(HERE.parent): "."})
        out.write_text(json.dumps(portable, indent=1, allow_nan=False) + "\n")  # survives a later failure
    plot(result, out.with_suffix(".png"))
    for problem in schema_problems(portable):
        print(f"schema: {problem}", file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s; models and logs in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
