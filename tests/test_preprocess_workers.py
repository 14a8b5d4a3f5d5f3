"""The run summary's featuriser utilisation (`preprocess.worker_utilisation`)."""
import pytest

from echo_stream.preprocess import worker_utilisation


def test_utilisation_and_gaps_per_worker():
    busy = [("n:1", 0.0, 1.0), ("n:1", 1.5, 2.5), ("n:2", 0.5, 2.5)]
    u = worker_utilisation(busy)
    assert u["workers"] == 2 and u["span_s"] == 2.5 and u["busy_s"] == 4.0
    assert u["utilisation"] == pytest.approx(4.0 / 5.0)
    assert u["mean_gap_s"] == 0.5              # only n:1 has two conversations; 1.0 -> 1.5


def test_no_intervals_no_figures():
    assert worker_utilisation([]) is None
    assert worker_utilisation([("n:1", 2.0, 3.0)])["mean_gap_s"] is None
