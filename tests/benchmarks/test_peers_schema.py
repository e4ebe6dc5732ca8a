"""benchmarks/peers_ort_cpu.py: its result schema, its metrics and its plot, without running a peer."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "peers_ort_cpu.json"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_ort_cpu", ROOT / "benchmarks" / "peers_ort_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its sibling peers_criteria.py
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
        sys.modules.pop("peers_criteria", None)
        sys.path.remove(str(ROOT / "benchmarks"))


def point(method, fidelity=0.99, ms=5.0, speedup=1.5, **extra):
    return {"method": method, "fidelity": fidelity, "median_ms": ms, "speedup_vs_fp32": speedup, "p90_ms": ms * 1.1} | extra


def result(points):
    return {"machine": {"cpu": "test CPU"}, "threads": "intra-op 2", "models": {"m": {"metric": "top1_agreement", "points": points}}}


def every_method(peers):
    return [point(m) for m in peers.METHODS] + [point("mpqc:front", 0.9, 3.0, 2.0)]


def test_a_complete_result_fits_the_schema(peers):
    assert peers.schema_problems(result(every_method(peers))) == []


def test_a_failed_peer_keeps_its_point_with_an_error_and_null_numbers(peers):
    points = every_method(peers)
    points[3] = {"method": "inc:tuned", "error": "INC failed", "fidelity": None, "median_ms": None,
                 "speedup_vs_fp32": None, "p90_ms": None}
    assert peers.schema_problems(result(points)) == []
    del points[3]["error"]
    assert any("inc:tuned: fidelity is None" in p for p in peers.schema_problems(result(points)))


def test_a_missing_method_an_unknown_method_or_a_non_number_is_named(peers):
    problems = peers.schema_problems(result([point("fp32"), point("tflite"), point("ort:all", fidelity=float("nan"))]))
    text = "\n".join(problems)
    assert "no point for ort:conv-matmul, inc:tuned, mpqc:uniform:w8a8, mpqc:front" in text
    assert "point 1: method must be one of" in text
    assert "ort:all: fidelity is nan" in text
    assert peers.schema_problems({"models": {}}) == ['"models" must be a non-empty object']


def test_non_finite_numbers_become_null_so_the_file_is_strict_json(peers):
    cleaned = peers._finite({"a": [1.0, float("inf")], "b": {"c": float("nan"), "d": "x"}})
    assert cleaned == {"a": [1.0, None], "b": {"c": None, "d": "x"}}
    json.dumps(cleaned, allow_nan=False)


def test_text_mask_iou_pools_pixels_over_images(peers):
    reference = np.zeros((2, 1, 4, 4), np.float32)
    candidate = reference.copy()
    assert peers.text_mask_iou(reference, candidate) == 1.0  # no text anywhere: they agree
    reference[0, 0, :2] = 0.9  # 8 text pixels in image 0, none in image 1
    candidate[0, 0, :1] = 0.9  # 4 of them found
    candidate[1, 0, 0, 0] = 0.5  # and one false pixel in image 1
    assert peers.text_mask_iou(reference, candidate) == pytest.approx(4 / 9)
    assert peers.text_mask_iou(reference, reference + 0.05) == 1.0  # 0.05 stays under the 0.3 threshold


def test_the_tuner_metrics_agree_with_mpqc_where_the_harness_uses_mpqc(peers):
    from mpqc.bench.fidelity import output_agreement

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(16, 8))
    candidate = reference + 0.3 * rng.normal(size=reference.shape)
    assert peers.METRICS["cosine_mean"](reference, candidate) == pytest.approx(output_agreement(reference, candidate)["cosine_mean"])
    assert peers.METRICS["top1_agreement"](reference, reference) == 1.0


def test_the_plot_draws_a_panel_per_model_and_skips_failed_points(peers, tmp_path):
    data = result(every_method(peers))
    data["models"]["n"] = {"metric": "cosine_mean", "points": [point("fp32", 1.0, 4.0, 1.0),
                                                                {"method": "ort:all", "error": "x", "fidelity": None,
                                                                 "median_ms": None, "speedup_vs_fp32": None, "p90_ms": None}]}
    peers.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not RESULT.is_file(), reason="no committed benchmarks/results/peers_ort_cpu.json yet")
def test_the_committed_result_fits_the_schema(peers):
    data = json.loads(RESULT.read_text(), parse_constant=lambda name: math.nan)
    assert peers.schema_problems(data) == []
    assert set(data["models"]) <= set(peers.MODELS)


def test_a_refused_profile_is_run_again_and_forced_only_when_asked_after_every_refusal(peers, tmp_path, monkeypatch):
    """What the refusal tells a user: profile again; --profile-force-fit forces only the last try.
    (The mpqc commands are replayed: a noisy machine cannot be made to order.)"""
    refused = "mpqc: error: this machine is too noisy to fit a latency model: ...; the fit was not written (...)"
    case = peers.Case("m", "m.onnx", "cosine_mean", tmp_path / "m.onnx", {}, {}, tmp_path / "c.npz", tmp_path / "h.npz", [], {})

    def replay(accepting_after: int):
        calls = []

        def mpqc(args, log, timeout_s):
            calls.append(args)
            if args[0] == "build":
                return (1, "mpqc: error: ...; run 'mpqc profile m.onnx'") if len(calls) == 1 else (0, "")
            accepted = len(calls) - 1 > accepting_after or "--force-fit" in args
            return (0, "") if accepted else (2, refused)

        monkeypatch.setattr(peers, "mpqc", mpqc)
        return calls

    calls = replay(accepting_after=2)
    record = peers.mpqc_build(case, ["--policy", "search"], tmp_path / "out", tmp_path, 60, [], ("--force-fit",))
    profiles = [c for c in calls if c[0] == "profile"]
    assert len(profiles) == 3 and not any("--force-fit" in c for c in profiles)
    assert record["profile_refusals"] == [refused, refused] and "error" not in record

    calls = replay(accepting_after=99)
    record = peers.mpqc_build(case, ["--policy", "search"], tmp_path / "out", tmp_path, 60, [], ())
    assert len([c for c in calls if c[0] == "profile"]) == peers.PROFILE_ATTEMPTS
    assert record["error"] == f"mpqc profile: {refused}" and len(record["profile_refusals"]) == peers.PROFILE_ATTEMPTS

    calls = replay(accepting_after=99)
    record = peers.mpqc_build(case, ["--policy", "search"], tmp_path / "out", tmp_path, 60, [], ("--force-fit",))
    profiles = [c for c in calls if c[0] == "profile"]
    assert len(profiles) == peers.PROFILE_ATTEMPTS + 1 and "--force-fit" in profiles[-1]
    assert "error" not in record and len(record["profile_refusals"]) == peers.PROFILE_ATTEMPTS


def test_the_criteria_are_computed_from_the_measured_points(peers):
    import peers_criteria

    points = [point("fp32", 1.0, 4.0, 1.0), point("ort:all", 0.90, 2.4, 1.69), point("ort:conv-matmul", 0.70, 3.5, 1.13),
              point("inc:tuned", 0.99, 4.2, 0.96), point("mpqc:uniform:w8a8", 0.97, 1.8, 2.17),
              point("mpqc:front", 0.98, 2.3, 1.74), point("mpqc:front", 0.99, 2.5, 1.59), point("mpqc:front", 0.979, 2.9, 1.40)]
    checks = peers_criteria.criteria(points)
    assert checks["every_peer_matched"] and {c["peer"]: c["by"]["method"] for c in checks["peers"]}["inc:tuned"] == "mpqc:front"
    assert checks["uniform_w8a8_vs_ort_all"]["met"]
    front = checks["front"]
    assert front["at_least_fp32_speed"] and not front["monotone"] and len(front["violations"]) == 1
    assert front["violations"][0]["slower"]["index"] == 7 and front["violations"][0]["interval"] is None
    assert not front["monotone_within_resolution"]  # no per-sample metric: nothing says it is within the data's resolution
    # Two points tied in speed (within the tolerance) are no violation the timings resolve.
    tied = peers_criteria.criteria(points[:7] + [point("mpqc:front", 0.985, 2.51, 1.585)])["front"]
    assert not tied["monotone"] and tied["monotone_within_resolution"]
    assert checks["at_inc_fidelity"]["ratio_to_inc"] == pytest.approx(1.59 / 0.96) and checks["at_inc_fidelity"]["met"]
    # A peer faster than every mpqc point at its fidelity is not matched.
    points[1] = point("ort:all", 0.90, 1.0, 4.0)
    assert not peers_criteria.criteria(points)["every_peer_matched"]


def test_a_front_violation_gets_a_paired_interval_clustered_by_source(peers):
    import peers_criteria

    points = [point("fp32", 1.0, 4.0, 1.0), point("mpqc:front", 1.0, 2.0, 2.0), point("mpqc:front", 0.88, 3.0, 1.3)]
    groups = np.repeat(["a", "b", "c", "d"], 25)
    faster = np.ones(100)
    slower = faster.copy()
    slower[[0, 5, 10, 25, 30, 35, 50, 55, 60, 75, 80, 85]] = 0  # three samples lost in every photograph
    violation = peers_criteria.criteria(points, {1: faster, 2: slower}, groups)["front"]["violations"][0]
    low, high = violation["interval"]
    assert violation["difference"] == pytest.approx(-0.12) and low <= -0.12 <= high < 0  # outside the resolution
    # The same 12 losses all in one photograph: resampling photographs leaves it out often enough
    # that the interval reaches 0, where resampling samples alone would not.
    concentrated = faster.copy()
    concentrated[:12] = 0
    assert peers_criteria.paired_interval(concentrated - faster, groups)[1] >= 0
    assert peers_criteria.paired_interval(concentrated - faster)[1] < 0


def test_paired_speedups_divide_fp32_by_the_point_round_by_round(peers):
    import peers_criteria

    points = [point("fp32", round_medians_ms=[4.0, 8.0, 4.0]), point("ort:all", round_medians_ms=[2.0, 2.0, 4.0]),
              {"method": "inc:tuned", "error": "x"}]
    paired = peers_criteria.criteria(points)["paired_speedup_vs_fp32"]
    assert paired[1] == {"method": "ort:all", "median": 2.0, "min": 1.0, "max": 4.0} and paired[2] is None
    assert paired[0]["median"] == 1.0


def test_a_peer_match_is_also_decided_on_the_paired_rounds(peers):
    import peers_criteria

    fp32 = point("fp32", 1.0, 4.0, 1.0, round_medians_ms=[4.0, 4.0, 4.0, 4.0, 4.0])
    # By medians the peer (2.0 ms) and mpqc (2.0 ms) tie; round by round mpqc loses 4 of 5 by 10%:
    # a load that hit mpqc's one fast round shows in the paired ratio, not in the ratio of medians.
    peer = point("ort:all", 0.90, 2.0, 2.0, round_medians_ms=[1.8, 1.8, 1.8, 1.8, 3.0])
    mpqc = point("mpqc:uniform:w8a8", 0.97, 2.0, 2.0, round_medians_ms=[2.0, 2.0, 2.0, 2.0, 1.5])
    check = peers_criteria.criteria([fp32, peer, mpqc])
    (peer_check,) = check["peers"]
    assert peer_check["matched"] and not peer_check["matched_paired"] and not check["every_peer_matched_paired"]
    paired = peer_check["by"]["paired_speed_ratio"]
    assert paired["median"] == pytest.approx(0.9) and paired["rounds"] == 5 and paired["rounds_faster"] == 1
    assert paired["max"] == pytest.approx(2.0)
    # Without round medians there is no paired decision, and nothing claims one.
    plain = peers_criteria.criteria([point("fp32", 1.0, 4.0, 1.0), point("ort:all", 0.9, 2.0, 2.0), point("mpqc:uniform:w8a8", 0.97, 2.0, 2.0)])
    assert "matched_paired" not in plain["peers"][0] and not plain["every_peer_matched_paired"]


def test_a_written_result_gets_its_peer_checks_recomputed_and_keeps_the_rest(peers, tmp_path):
    import peers_criteria

    points = [point("fp32", 1.0, 4.0, 1.0, round_medians_ms=[4.0, 4.0, 4.0]),
              point("ort:all", 0.90, 2.0, 2.0, round_medians_ms=[2.0, 2.0, 2.0]),
              point("mpqc:uniform:w8a8", 0.97, 1.9, 2.1, round_medians_ms=[1.9, 1.9, 1.9])]
    written = result(points)
    written["models"]["m"]["criteria"] = {"front": {"violations": ["kept"]}, "peers": []}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(written))
    peers_criteria.refresh_from_points(path)
    criteria = json.loads(path.read_text())["models"]["m"]["criteria"]
    assert criteria["front"] == {"violations": ["kept"]} and criteria["every_peer_matched_paired"]
    assert criteria["peers"][0]["by"]["paired_speed_ratio"]["median"] == pytest.approx(2.0 / 1.9)
