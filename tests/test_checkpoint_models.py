"""Every complete checkpoint is a servable model, the best one is marked and kept, `kubetune export
--checkpoint` copies one out, and early stopping ends a run with a checkpoint of where it stopped.

Real 2-rank DeepSpeed runs on CPU (gloo) of a tiny from-config Llama, local and s3:// (moto) outputs;
the pruning and reference rules also on checkpoint folders laid out by hand.
"""

import json
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train import checkpoint
from test_train_distributed import generates
from test_trainer_kills import finish, make_job, rows


def fake_run(out: Path, losses: dict[int, float]) -> None:
    """Complete checkpoints with these validation losses (markers only: the rules read nothing else)."""
    for step, loss in losses.items():
        folder = out / "checkpoints" / checkpoint.tag(step)
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
        metrics = {"valid_loss": loss, "valid_mean_token_accuracy": 1 / loss}
        (folder / checkpoint.MARKER).write_text(json.dumps({"step": step, "metrics": metrics}))


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    fake_run(tmp_path, {1: 3.0, 2: 1.0, 4: 2.0, 5: 2.5})
    torn = tmp_path / "checkpoints" / checkpoint.tag(3)  # files, no marker: removed too
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    checkpoint._prune(str(tmp_path), None, 1, "valid_loss")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [checkpoint.tag(2), checkpoint.tag(5)]
    infos = checkpoint.infos(str(tmp_path), None, "valid_loss")
    assert [(i.name, i.best) for i in infos] == [("step-2", True), ("step-5", None)]
    assert infos[0].model == str(tmp_path / "checkpoints" / checkpoint.tag(2) / "model")
    assert infos[0].metrics["valid_loss"] == 1.0
    # accuracy: higher is better
    assert checkpoint.best_step(checkpoint.markers(str(tmp_path), None), "valid_mean_token_accuracy") == 2


def test_references_resolve_and_a_bad_one_names_the_available(tmp_path):
    fake_run(tmp_path, {10: 2.0, 20: 1.5, 30: 1.8})
    out = str(tmp_path)
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.resolve(out, None, "best") == str(ckpt / checkpoint.tag(20) / "model")
    assert checkpoint.resolve(out, None, "step-10") == str(ckpt / checkpoint.tag(10) / "model")
    assert checkpoint.resolve(out, None, "last") == str(ckpt / checkpoint.tag(30) / "model")  # not finished yet
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"'step-15'.*step-10, step-20 \(best\), step-30"):
        checkpoint.resolve(out, None, "step-15")
    (tmp_path / "progress.json").write_text(json.dumps({"phase": "done"}))
    assert checkpoint.resolve(out, None, "last") == str(tmp_path / "model")  # the final model once finished
    with pytest.raises(checkpoint.CheckpointNotFound, match="none yet"):
        checkpoint.resolve(str(tmp_path / "empty"), None, "best")


@pytest.mark.slow
def test_each_checkpoint_is_a_model_best_kept_and_exported(tmp_path, capsys):
    out = tmp_path / "out"
    # evalEvery beyond the run: validation still runs at each checkpoint, for its marker
    job = make_job(tmp_path, str(out), "models", training={"maxSteps": 6, "evalEvery": 100, "checkpointEvery": 2,
                                                            "keepCheckpoints": 1})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    finish(job, tmp_path / "scratch")

    metrics = rows((out / "metrics.csv").read_text())
    assert [r["step"] for r in metrics if r["valid_loss"]] == ["2", "4", "6"]
    listed = json.loads((out / "checkpoints.json").read_text())
    steps = [c["step"] for c in listed]
    assert steps == sorted(steps) and steps[-1] == 6
    best = [c for c in listed if c.get("best")]
    assert len(best) == 1 and best[0]["metrics"]["valid_loss"] == min(
        float(r["valid_loss"]) for r in metrics if r["valid_loss"])
    assert len(listed) == (1 if best[0]["step"] == 6 else 2)  # keepCheckpoints 1, and the best
    on_disk = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/*/COMPLETE"))
    assert on_disk == steps
    marker = json.loads((out / "checkpoints" / checkpoint.tag(6) / "COMPLETE").read_text())
    assert marker["metrics"]["valid_loss"] == pytest.approx(float(metrics[-1]["valid_loss"]))
    for c in listed:
        assert c["model"] == str(out / "checkpoints" / checkpoint.tag(c["step"]) / "model")
        generates(Path(c["model"]))  # plain from_pretrained, and it generates

    progress = json.loads((out / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["gpuHours"] is None and progress["mfu"] is None  # CPU

    assert main(["export", str(job), "--checkpoint", "best"]) == 0
    generates(out / "exports" / "best")
    assert main(["export", str(job), "--checkpoint", "last", "--to", str(tmp_path / "last")]) == 0
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", str(job), "--checkpoint", "step-3"]) == 3  # invalid input (kubetune.errors)
    err = capsys.readouterr().err
    assert "no checkpoint 'step-3'" in err and all(f"step-{s}" in err for s in steps), err


@pytest.mark.slow
def test_early_stopping_lora_s3_stops_with_a_checkpoint(tmp_path, s3, s3_server):
    client, bucket = s3
    out = f"s3://{bucket}/jobs/es/"
    # minDelta far beyond any change: the second validation does not count as an improvement
    job = make_job(tmp_path, out, "es", training={"method": "lora", "maxSteps": 8, "evalEvery": 1, "checkpointEvery": 3,
                                                   "keepCheckpoints": 1, "earlyStopping": {"patience": 1, "minDelta": 100}},
                   storage={"endpoint": s3_server})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    log = finish(job, tmp_path / "pod-1")
    assert "stopping early at step 2 of 8" in log, log[-3000:]

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"jobs/es/{key}")["Body"].read()

    progress = json.loads(read("progress.json"))
    assert progress["phase"] == "done" and progress["step"] == progress["totalSteps"] == 2
    assert progress["metrics"]["stopped_early_at"] == 2
    assert [r["step"] for r in rows(read("metrics.csv").decode())] == ["1", "2"]
    listed = json.loads(read("checkpoints.json"))
    assert [c["step"] for c in listed] == [2] and listed[0]["best"]  # the only checkpoint: the stop
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/es/")["Contents"]}
    assert {"jobs/es/checkpoints/step-00000002/COMPLETE", "jobs/es/checkpoints/step-00000002/model/model.safetensors",
            "jobs/es/checkpoints/step-00000002/adapter/adapter_config.json",
            "jobs/es/model/model.safetensors"} <= keys

    assert main(["export", str(job), "--checkpoint", "step-2", "--to", str(tmp_path / "step-2")]) == 0
    generates(tmp_path / "step-2")
    assert main(["export", str(job), "--checkpoint", "best"]) == 0  # default: OUTPUT/exports/best/ on s3
    assert "jobs/es/exports/best/model.safetensors" in {
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/es/exports/")["Contents"]}

