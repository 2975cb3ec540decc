"""bench/soak.py's accounting, on made-up records: a wrong minute or a missed
late answer would make the soak's PASS lines say nothing."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def record(due, latency, status=200, version="1", error=None, lag=0.0):
    return {"due": due, "sent": due + lag, "answered": due + lag + latency, "status": status,
            "version": version, "error": error}


def test_rows_count_each_request_in_the_minute_it_was_due():
    records = [record(i * 0.5, 0.010) for i in range(120)]  # minute 1: 10 ms each
    records += [record(60 + i * 0.5, 0.020, version="2") for i in range(59)]  # minute 2
    records.append(record(119.5, 5.0, status=503, version=None))  # due in minute 2, answered after the end
    records.append(record(61, 0, status=None, version=None, error="ConnectionResetError", lag=0.3))
    memory = [(0.0, {10: 600.0, 11: 601.0}), (55.0, {10: 610.0, 11: 611.0}),
              (60.0, {10: 612.0, 12: 500.0}), (121.0, {10: 620.0, 12: 630.0})]  # 121: after the last answer
    first, second = soak.per_minute(records, memory, 120)
    assert (first["requests"], first["statuses"], first["versions"]) == (120, {200: 120}, {"1": 120})
    assert round(first["p50_ms"]) == round(first["p99_ms"]) == 10
    assert first["rss_mib"] == {"10": 610.0, "11": 611.0} and first["rss_total_mib"] == 1221.0
    assert second["requests"] == 61 and second["statuses"] == {200: 59, 503: 1}
    assert second["connection_errors"] == 1 and second["versions"] == {"2": 59}
    assert round(second["p50_ms"]) == 20 and round(second["p99_ms"]) == 5000  # the 503's 5 s, nearest rank
    assert round(second["max_send_lag_ms"]) == 300
    assert second["rss_mib"] == {"10": 620.0, "12": 630.0}
    # A run of 1.5 minutes ends with a half-minute row.
    assert [(r["from_s"], r["to_s"]) for r in soak.per_minute(records, memory, 90)] == [(0, 60), (60, 90)]


def test_checks_fail_on_any_failure_and_on_an_old_answer_sent_after_the_first_new():
    clean = [record(0, 1.0), record(0.5, 0.1, version="2"), record(0.55, 0.1, version="1"),  # sent before 0.6
             record(1.0, 0.1, version="2")]
    assert soak.checks(clean, "2") == {"failed_requests": 0, "zero_failed": True, "first_new_answer_s": 0.6,
                                       "old_answers_after_first_new": 0, "never_backwards": True}
    backwards = [*clean, record(0.8, 0.1, version="1")]  # sent at 0.8, after 0.6's answer from version 2
    assert soak.checks(backwards, "2")["old_answers_after_first_new"] == 1
    assert not soak.checks(backwards, "2")["never_backwards"]
    failed = soak.checks([*clean, record(2, 0.1, status=503, version=None),
                          record(2, 0.1, status=None, version=None, error="ConnectionRefusedError")], "2")
    assert failed["failed_requests"] == 2 and not failed["zero_failed"] and failed["never_backwards"]
    # The new version never answered: the reload was not seen, which is no pass.
    assert not soak.checks([record(0, 0.1)], "2")["never_backwards"]
