"""The measured front's dominance: a point stays when it is clearly faster than every more faithful one;
and the check of the cost model's predictions against the same measured points."""

from mpqc.pipeline.measured import PAIRED_ROUNDS, MeasuredPoint, prediction_check, undominated


def _point(source, rounds, fidelity):
    rounds = tuple(rounds)
    return MeasuredPoint(source, None, None, sorted(rounds)[len(rounds) // 2], rounds, fidelity, {})


def test_a_steady_small_gain_in_every_paired_round_keeps_a_point_a_noise_margin_would_drop():
    # Each round the machine's load moves both by up to 20%; the mixed point is 3% faster in each.
    load = [1.0, 1.2, 0.9, 1.1, 1.0, 1.15, 0.95]
    fp32 = _point("fp32", [5.0 * x for x in load], 1.0)
    mixed = _point("front:12", [4.85 * x for x in load], 0.9995)
    assert not mixed.median_ms * 1.10 < fp32.median_ms  # within a 10% noise margin
    assert mixed.clearly_faster(fp32, margin=0.10) and not fp32.clearly_faster(mixed, margin=0.10)
    assert [p.source for p in undominated([fp32, mixed], margin=0.10)] == ["front:12", "fp32"]


def test_a_gain_that_flips_between_rounds_is_noise_and_the_less_faithful_point_goes():
    fp32 = _point("fp32", [5.0, 5.3, 4.9, 5.2, 5.1], 1.0)
    mixed = _point("front:12", [4.9, 5.4, 4.8, 5.1, 5.2], 0.999)
    assert not mixed.clearly_faster(fp32, margin=0.10)
    assert [p.source for p in undominated([fp32, mixed], margin=0.10)] == ["fp32"]


def test_a_median_gain_beyond_the_margin_that_most_rounds_do_not_back_is_noise():
    # Two front points of a PP-OCRv4 build on a loaded VM: 14% apart by the medians, 6 of 9 rounds.
    faster = _point("front:0", [5.08, 5.16, 5.46, 6.96, 7.33, 7.21, 6.81, 5.79, 5.11], 0.9987)
    slower = _point("front:4", [5.15, 5.93, 6.79, 7.29, 7.07, 6.92, 6.44, 6.46, 6.6], 0.9998)
    assert faster.median_ms * 1.10 < slower.median_ms and not faster.clearly_faster(slower, margin=0.10)
    assert [p.source for p in undominated([faster, slower], margin=0.10)] == ["front:4"]
    # 8 of 9 is past the sign test's 5% level (10 in 512): the same medians then count.
    backed = _point("front:0", [5.08, 5.16, 5.46, 6.96, 6.5, 6.5, 6.81, 5.79, 5.11], 0.9987)
    assert backed.clearly_faster(slower, margin=0.10) and not backed.clearly_faster(slower, margin=0.30)


def test_too_few_rounds_to_pair_fall_back_to_the_noise_margin():
    fp32 = _point("fp32", [5.0] * (PAIRED_ROUNDS - 1), 1.0)
    mixed = _point("front:12", [4.9] * (PAIRED_ROUNDS - 1), 0.999)
    assert not mixed.clearly_faster(fp32, margin=0.10) and mixed.clearly_faster(fp32, margin=0.01)


def test_a_point_both_slower_and_less_faithful_is_dropped_however_it_was_timed():
    uniform = _point("uniform:w8a8", [3.0, 3.1, 3.2, 3.0, 3.1], 0.99)
    mixed = _point("front:3", [3.5, 3.6, 3.4, 3.5, 3.6], 0.98)
    assert uniform.beats(mixed) and not mixed.beats(uniform)
    assert [p.source for p in undominated([uniform, mixed])] == ["uniform:w8a8"]


def _predicted(source, measured_ms, predicted_ms):
    return MeasuredPoint(source, None, predicted_ms, measured_ms, (measured_ms,) * PAIRED_ROUNDS, 0.99, {})


def test_predictions_that_match_the_measurements_give_no_note():
    points = [_point("fp32", [3.9] * 5, 1.0), _predicted("uniform:w8a8", 2.0, 2.1), _predicted("uniform:w4a16", 3.7, 3.6),
              _predicted("front:0", 2.3, 2.4), _predicted("front:1", 3.1, 3.0)]
    check = prediction_check(points, margin=0.09)
    assert check["note"] is None and check["points"] == 4 and check["kendall_tau"] == 1.0
    assert check["median_relative_error"] < 0.05 and check["predicted_below_fastest_uniform"] == []


def test_a_front_predicted_faster_than_every_uniform_policy_ran_is_called_out():
    # A noisy machine's forced fit: what an EfficientNet-Lite0 build measured (front:0 predicted 0.81 ms).
    points = [_point("fp32", [3.94] * 5, 1.0), _predicted("uniform:w8a8", 1.99, 2.14), _predicted("uniform:w4a16", 3.72, 3.71),
              _predicted("front:0", 2.23, 0.81), _predicted("front:1", 2.52, 1.05), _predicted("front:7", 3.12, 2.65)]
    check = prediction_check(points, margin=0.09)
    assert check["predicted_below_fastest_uniform"] == ["front:0", "front:1"]
    assert check["fastest_uniform"] == "uniform:w8a8" and check["median_relative_error"] > 0.10
    assert check["note"].startswith("the cost model does not fit this machine now: its predictions are off by")
    assert "faster than uniform:w8a8, the fastest uniform policy, measured at 1.990 ms" in check["note"]


def test_without_latency_predictions_there_is_nothing_to_check():
    points = [_point("fp32", [3.9] * 5, 1.0), _point("uniform:w8a8", [2.0] * 5, 0.99)]
    assert prediction_check(points, margin=0.09) == {"points": 0, "note": None}
