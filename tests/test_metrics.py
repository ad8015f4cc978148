"""ACC, BWT, forgetting and FWT against hand-computed values (DESIGN §6)."""

import pytest

from sparsecl import metrics

R = [[0.9, None, None],
     [0.8, 0.95, None],
     [0.7, 0.9, 0.85]]


def test_average_accuracy():
    assert metrics.average_accuracy(R) == pytest.approx((0.7 + 0.9 + 0.85) / 3)


def test_backward_transfer():
    assert metrics.backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy():
    R2 = [[0.6, None, None], [0.8, 0.9, None], [0.7, 0.9, 0.5]]
    # task 0: best before the end is 0.8 (after task 1), final 0.7; task 1: 0.9 → 0.9
    assert metrics.forgetting(R2) == pytest.approx((0.1 + 0.0) / 2)
    assert metrics.backward_transfer(R2) == pytest.approx(((0.7 - 0.6) + 0.0) / 2)


def test_forward_transfer():
    full = [[0.9, 0.6, 0.5], [0.8, 0.95, 0.55], [0.7, 0.9, 0.85]]
    assert metrics.forward_transfer(full, [0.5, 0.5, 0.5]) == pytest.approx(((0.6 - 0.5) + (0.55 - 0.5)) / 2)
    with pytest.raises(ValueError, match="R\\[i-1\\]\\[i\\]"):
        metrics.forward_transfer(R, [0.5, 0.5, 0.5])


def test_single_task_has_no_bwt_or_forgetting():
    assert metrics.average_accuracy([[0.5]]) == 0.5
    assert metrics.backward_transfer([[0.5]]) is None and metrics.forgetting([[0.5]]) is None


@pytest.mark.parametrize("bad", [[], [[0.5, None]], [[None]], [[0.5, None], [None, 0.4]]])
def test_malformed_matrices_are_refused(bad):
    with pytest.raises(ValueError):
        metrics.average_accuracy(bad)


def test_per_class_accuracy_and_mean_class_drop():
    labels = [0, 0, 1, 1, 1, 2]
    assert metrics.per_class_accuracy(labels, [True, False, True, True, False, True], 4) == \
        [0.5, pytest.approx(2 / 3), 1.0, None]  # class 3 has no sample
    assert metrics.mean_class_drop([0.9, 1.0, None, 0.5], [0.7, 1.0, 0.4, None]) == pytest.approx(0.1)
    assert metrics.mean_class_drop([None], [0.3]) is None
    with pytest.raises(ValueError, match="outside the classes 0..1"):
        metrics.per_class_accuracy([2], [True], 2)
    with pytest.raises(ValueError):
        metrics.mean_class_drop([0.5], [])


def test_unmeasured_cells_are_left_out_of_bwt_and_forgetting():
    nan = float("nan")
    # eval_every=2 over 4 tasks: row 0 and row 2 keep only the diagonal, rows 1 and 3 are complete
    R = [[0.9, None, None, None],
         [0.8, 0.95, None, None],
         [None, nan, 0.7, None],
         [0.6, 0.9, 0.65, 0.8]]
    assert metrics.average_accuracy(R) == pytest.approx((0.6 + 0.9 + 0.65 + 0.8) / 4)
    assert metrics.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.9 - 0.95) + (0.65 - 0.7)) / 3)
    # task 0: best measured before the end 0.9 (R[1][0] = 0.8, R[2][0] unmeasured); task 1: 0.95
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.95 - 0.9) + (0.7 - 0.65)) / 3)
    # a task whose diagonal was not measured: left out of BWT, its other cells still count for forgetting
    R[1][1] = None
    assert metrics.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.65 - 0.7)) / 2)
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.65)) / 2)
    assert metrics.forgetting([[None, None], [0.5, 0.6]]) is None  # nothing measured before the end
    assert metrics.backward_transfer([[None, None], [0.5, 0.6]]) is None


def test_an_unmeasured_cell_of_the_last_row_is_refused():
    with pytest.raises(ValueError, match="row 1 .*unmeasured entries at tasks \\[0\\]"):
        metrics.average_accuracy([[0.5, None], [float("nan"), 0.4]])
