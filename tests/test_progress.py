"""Progress of a long model build, as log lines: throttled, with a last line at the end."""

from recserve.engine.progress import Progress


def test_progress_logs_at_most_every_interval_and_once_at_the_end(caplog):
    now = [100.0]
    progress = Progress("building m", 5, every_s=5.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="recserve.engine"):
        for seconds in (1.0, 6.0, 7.0, 12.5, 13.0):  # when each step finishes
            now[0] = 100.0 + seconds
            progress.step(f"step at {seconds}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["building m: 2/5 (step at 6.0), 6 s so far",
                     "building m: 4/5 (step at 12.5), 12 s so far",
                     "building m: 5/5 done in 13.0 s"]
