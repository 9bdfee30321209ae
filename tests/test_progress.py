import json

from kubetune.status import StatusSink
from kubetune.train.progress import LocalSink, Reporter


def record(step: int, percent: float = 0.0) -> dict:
    return {"phase": "training", "step": step, "totalSteps": 10, "epoch": 0.1 * step, "percent": percent,
            "tokensPerSecond": 100.0}


def test_local_sink_writes_progress_json_and_a_line(tmp_path, capsys):
    Reporter([LocalSink(str(tmp_path), None)]).update(
        {"phase": "training", "step": 5, "totalSteps": 10, "epoch": 0.5, "percent": 50.0, "etaSeconds": 75,
         "tokensPerSecond": 1234.0, "metrics": {"train_loss": 1.5}}, force=True)
    record = json.loads((tmp_path / "progress.json").read_text())
    assert record["step"] == 5 and record["updatedAt"].endswith("Z")
    line = capsys.readouterr().err
    assert "50.0%" in line and "step 5/10" in line and "train_loss 1.5000" in line and "ETA 1m15s" in line


def test_a_failing_sink_never_stops_training(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("not-a-real-token")
    # A real HTTP attempt against a closed port: the API server is unreachable.
    dead = StatusSink("job", "ns", "https://127.0.0.1:9", token, None)
    local = LocalSink(str(tmp_path), None)
    reporter = Reporter([dead, local], interval=0)
    for step in (1, 2):
        reporter.update(record(step, step * 10.0), force=True)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 2  # the other sink still works
    err = capsys.readouterr().err
    assert err.count("status report to StatusSink failed") == 1 and "not-a-real-token" not in err


def test_reports_are_throttled(tmp_path):
    reporter = Reporter([LocalSink(str(tmp_path), None)], interval=60)
    reporter.update(record(1), force=True)
    reporter.update(record(2))
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 1
    reporter.update(record(3), force=True)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 3
