"""The sentences state the numbers they are given and judge comparisons from them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnstats.report.captions import (
    accuracy_sentences,
    batch_size_sentences,
    batch_sizes_text,
    chance_relation,
    debias_factor,
    lecture_sentences,
    steps_until_debiased,
)
from bnstats.report.lecture import LectureTrace

ACCURACY = {
    "batch@1": 0.113,
    "batch@8": 0.871,
    "batch@all": 0.944,
    "ema": 0.951,
    "ema_debiased": 0.952,
    "cumulative": 0.917,
    "population": 0.949,
}


def synthetic_trace(stat: str, ema_offset: float, rng: np.random.Generator) -> LectureTrace:
    """20 steps of 4 units scattered around ``population``; the EMA ends ``ema_offset`` away."""
    population = np.array([0.5, 1.0, 2.0, 4.0])
    batch = population + 0.1 * rng.normal(size=(20, 4))
    ema = np.tile(population + ema_offset, (20, 1))
    return LectureTrace(
        layer="bn7",
        stat=stat,
        units=(2, 0),
        momentum=0.25,
        batch_size=np.array([32] * 9 + [5] + [32] * 9 + [5]),
        batch=batch,
        ema=ema,
        ema_debiased=ema + 0.001,
        population=population,
    )


def test_lecture_sentences_state_the_traces_numbers(rng):
    trace = synthetic_trace("mean", 0.0, rng)
    text = " ".join(lecture_sentences(trace, epochs=2, train_rows=330))
    assert "Layer bn7, units 2, 0 of its 4" in text
    assert "one of the 20 training steps of 2 epochs" in text
    assert "18 batches of 32 rows and 2 batches of 5 rows" in text
    assert f"unit 2's EMA is {trace.ema[0, 2]:.3g}" in text
    assert f"that batch's μ was {trace.batch[0, 2]:.3g}" in text
    assert "momentum 0.25" in text and "all 330 training rows" in text
    assert f"below 1.01 from step {steps_until_debiased(0.25)} on" in text
    assert f"(the debiased EMA by {0.001:.3g})" in text
    assert "removes most of that scatter" in text


def test_the_verdict_follows_the_numbers(rng):
    far = " ".join(lecture_sentences(synthetic_trace("mean", 1.0, rng), 2, 330))
    assert "no closer to it than a typical single batch" in far
    assert "final EMA differs from it by 1 on average" in far


def test_var_sentences_explain_the_conversion_and_use_relative_gaps(rng):
    trace = synthetic_trace("var", 0.05, rng)
    sentences = lecture_sentences(trace, epochs=2, train_rows=330)
    text = " ".join(sentences)
    assert "biased variance" in text and "n/(n − 1)" in text
    gap = np.mean(0.05 / trace.population) * 100
    assert f"final EMA differs from it by {gap:.3g} % of the population value" in text
    assert "starts at 1" in text and "σ²" in text


def test_batch_sizes_text_for_uniform_and_mixed_runs():
    assert batch_sizes_text(np.array([16, 16, 16])) == "3 batches of 16 rows"
    assert batch_sizes_text(np.array([16, 4, 16])) == (
        "2 batches of 16 rows and 1 batch of 4 rows (the short ones drawn as open circles)"
    )


def test_accuracy_sentences_carry_every_number():
    sentences = accuracy_sentences(ACCURACY, chance=0.113, test_rows=450, classes_at_one=1)
    text = " ".join(sentences)
    for name, value in ACCURACY.items():
        assert f"{value:.3f}" in text, name
    assert "(batch@1) gives 0.113, chance level" in text
    assert "answered 1 distinct class for the 450 rows" in text
    assert "the best here is debiased EMA (0.952)" in text


def test_accuracy_sentences_name_ties_and_plural_classes():
    tied = {**ACCURACY, "ema": 0.952}
    text = " ".join(accuracy_sentences(tied, chance=0.2, test_rows=90, classes_at_one=3))
    assert "the best here is EMA and debiased EMA (0.952)" in text
    assert "below chance level" in text and "3 distinct classes for the 90 rows" in text


@pytest.mark.parametrize(
    ("value", "chance", "expected"),
    [
        (0.1, 0.1004, "chance level"),
        (0.1, 0.102, "below chance level"),
        (0.3, 0.102, "above chance level"),
    ],
)
def test_chance_relation(value, chance, expected):
    assert chance_relation(value, chance) == expected


def test_batch_size_sentences_find_where_batches_catch_up():
    by_size = {1: 0.1, 4: 0.8, 16: 0.945, 64: 0.95}
    text = " ".join(batch_size_sentences(by_size, {"ema": 0.951, "population": 0.949}))
    assert "accuracy rises from 0.100 with batches of 1 to 0.950 with batches of 64" in text
    assert "within 0.01 of the EMA's 0.951 with batches of 16" in text
    assert "(EMA 0.951, population 0.949)" in text


def test_batch_size_sentences_when_batches_never_catch_up():
    text = " ".join(batch_size_sentences({2: 0.5, 8: 0.4}, {"ema": 0.9}))
    assert "accuracy falls from 0.500" in text
    assert "At no size tried does it come within 0.01 of the EMA's 0.900" in text


@given(st.floats(min_value=0.001, max_value=1.0))
def test_steps_until_debiased_is_the_first_step_below_the_threshold(momentum):
    t = steps_until_debiased(momentum)
    assert debias_factor(momentum, t) <= 1.01
    assert t == 1 or debias_factor(momentum, t - 1) > 1.01


def test_debias_factor_at_the_lectures_momentum():
    assert debias_factor(0.1, 1) == pytest.approx(10.0)
    assert steps_until_debiased(0.1) == 44  # 0.9**43 = 0.0108 > 1/101, 0.9**44 = 0.0097


def test_a_run_too_short_for_the_debiasing_to_settle_says_so(rng):
    """Momentum 0.1 needs 44 steps to bring the correction below 1.01; 20 steps do not."""
    trace = synthetic_trace("mean", 0.0, rng)
    short = LectureTrace(**{**trace.__dict__, "momentum": 0.1})
    text = " ".join(lecture_sentences(short, epochs=2, train_rows=330))
    assert "below 1.01 from step 44 on" not in text
    assert f"still {debias_factor(0.1, 20):.3g} at this run's last step, 20" in text
    assert "below 1.01 only from step 44 on" in text


def test_equal_counts_put_the_full_batches_first():
    """20 batches of 64 and 20 of 41 (a small CSV): the 41-row ones are the short ones."""
    text = batch_sizes_text(np.array([64, 41] * 20))
    assert text.startswith("20 batches of 64 rows and 20 batches of 41 rows (the short ones")


def test_virtual_batches_are_named_as_such(rng):
    trace = synthetic_trace("mean", 0.0, rng)
    ghost = LectureTrace(**{**trace.__dict__, "training_steps": 5})
    text = " ".join(lecture_sentences(ghost, epochs=1, train_rows=100))
    assert "Each dot is the μ of one virtual batch" in text
    assert "each of the 5 training batches" in text and "20 in all" in text
    assert "after update 1 unit 2's EMA" in text and "training steps" not in text
