"""The score cache key holds every setting of a sensitivity context, so none can be forgotten."""

import dataclasses

import numpy as np

from mpqc.search import cache
from mpqc.sensitivity.context import DATA_FIELDS, SensitivityContext, settings_of
from mpqc.targets import load_target


def _context(**settings) -> SensitivityContext:
    return SensitivityContext(float_model=None, layers=[], candidates={"conv": ["fp32", "w8a8"]}, target=load_target("ort-cpu"),
                              feeds={"x": np.zeros((2, 3), np.float32)}, input_names=("x",), **settings)


def _key(context: SensitivityContext) -> str:
    return cache.score_key("model", "feeds", "seam", context.seed, context.target, context.candidates, settings_of(context))


def test_every_field_but_the_data_is_a_setting_of_the_key():
    fields = {field.name for field in dataclasses.fields(SensitivityContext)}
    assert set(DATA_FIELDS) <= fields
    assert set(settings_of(_context())) == (fields - set(DATA_FIELDS)) | {"labels_sha256"}


def test_changing_any_setting_changes_the_key():
    base = _context()
    changed = {"labels_match_model": False, "classifier": False, "seed": 1, "iterations": 50, "epochs": 4,
               "batch_size": 16, "gmpq": True, "fixed_ends": True, "labels": np.array([0, 1]),
               "seam_terms": (1.0, 0.0, 0.0), "calibration": "percentile"}
    assert set(changed) >= set(settings_of(base)) - {"labels_sha256"}  # this test covers every setting
    keys = {_key(dataclasses.replace(base, **{name: value})) for name, value in changed.items()}
    assert len(keys | {_key(base)}) == len(changed) + 1
