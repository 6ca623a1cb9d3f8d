"""bnstats._levels: the one refusal of data that can be gone over only once (the settling rule
itself is tested through the passes that use it: tests/test_host_pass.py, tests/torch)."""

from __future__ import annotations

import pytest

from bnstats._levels import require_reusable


class _Reiterable:
    """A fresh iterator on every ``iter()``, as a DataLoader or a PyDataset gives."""

    def __iter__(self):
        return iter([1, 2])


@pytest.mark.parametrize("batches", [[1, 2], (1, 2), range(2), _Reiterable()])
def test_data_that_can_be_gone_over_again_passes(batches):
    require_reusable(batches)


@pytest.mark.parametrize(
    "make", [lambda: iter([1, 2]), lambda: (b for b in [1, 2]), lambda: map(abs, [1, 2])]
)
def test_one_shot_iterators_are_refused_in_one_wording(make):
    with pytest.raises(TypeError) as caught:
        require_reusable(make())
    assert str(caught.value) == (
        "mode='eval' passes over batches several times and needs an iterable it can go over "
        "again (a list), not a one-shot iterator or generator"
    )


def test_the_wording_names_who_needs_it_the_argument_and_what_to_pass():
    with pytest.raises(TypeError) as caught:
        require_reusable(
            iter([]), who="diagnose", argument="test_batches", examples="a list, a DataLoader"
        )
    assert str(caught.value) == (
        "diagnose passes over test_batches several times and needs an iterable it can go over "
        "again (a list, a DataLoader), not a one-shot iterator or generator"
    )


def test_telling_reusable_data_apart_does_not_start_an_iteration():
    """A DataLoader with workers starts them at each ``iter``: the check must not call it."""

    class Counting:
        started = 0

        def __iter__(self):
            Counting.started += 1
            return iter([1, 2])

    require_reusable(Counting())
    assert Counting.started == 0
