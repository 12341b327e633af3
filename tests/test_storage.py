"""Outputs on storage URIs (core/storage.py), against a local S3-compatible server: what is written is
staged and uploaded whole, checkpoints are found and resumed from there, and a location that cannot be
written is refused before anything starts, by the field's name."""

import json

import pytest

from cluster import checkpoint
from core import storage
from core.config import ConfigError
from tests.helpers import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


def test_a_staged_directory_reaches_the_uri_whole_and_comes_back(s3, tmp_path):
    with storage.staged("s3://runs/staged") as local:
        (local / "model").mkdir()
        (local / "model" / "weights.bin").write_bytes(b"\x01" * 1000)
        (local / "meta.json").write_text("{}")
        assert not storage.Location("s3://runs/staged").is_file("meta.json")  # nothing before the block ends
    place = storage.Location("s3://runs/staged")
    assert sorted(place.names()) == ["meta.json", "model"] and place.subdirs() == ["model"]
    with storage.fetched("s3://runs/staged", ("model",)) as got:
        assert (got / "model" / "weights.bin").read_bytes() == b"\x01" * 1000
        assert not (got / "meta.json").exists()
    assert not got.exists()


def test_a_writer_that_fails_uploads_nothing_and_says_where_its_files_are(s3, caplog):
    with pytest.raises(RuntimeError), storage.staged("s3://runs/failed") as local:
        (local / "half.bin").write_bytes(b"x")
        raise RuntimeError("the writer died")
    assert not storage.Location("s3://runs/failed").is_dir()
    assert str(local) in caplog.text and (local / "half.bin").exists()


def test_checkpoints_on_a_uri_are_found_whole_oldest_first(s3):
    run = "s3://runs/ckpt"
    root = storage.Location(checkpoint.checkpoints_dir(run))
    for step, whole in [(2, True), (10, True), (12, False)]:
        root.write_text(f"step-{step:06d}/stream.json", "{}")
        if whole:
            root.write_text(f"step-{step:06d}/meta.json", json.dumps({"step": step}))
    found = checkpoint.complete_checkpoints(run)
    assert found == [f"{run}/checkpoints/step-000002", f"{run}/checkpoints/step-000010"]  # 12 was cut off
    assert checkpoint.resume_from("auto", run) == found[-1] and checkpoint.read_meta(found[-1]) == {"step": 10}
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.resume_from(f"{run}/checkpoints/step-000012", run)


def test_a_location_that_cannot_be_written_is_refused_by_its_field(s3, tmp_path):
    storage.check_writable("s3://runs/fine", "train.output_dir")
    assert storage.Location("s3://runs/fine").names() == []  # the probe is gone
    with pytest.raises(storage.StorageError, match=r"train.output_dir = s3://no-such-bucket/run cannot be written"):
        storage.check_writable("s3://no-such-bucket/run", "train.output_dir")
    with pytest.raises(storage.StorageError, match="cannot open nosuchscheme://x"):
        storage.check_writable("nosuchscheme://x", "sft.output_dir")


def test_a_job_with_an_unwritable_output_uri_stops_before_ray_starts(s3):
    import ray

    from cluster.commands import DEFAULT_CONFIG
    from cluster.job import train
    from core.config import load_config

    started = ray.is_initialized()
    with pytest.raises(storage.StorageError, match="train.output_dir = s3://no-such-bucket/run"):
        train(load_config(DEFAULT_CONFIG.parent / "tiny.yaml", ["train.output_dir=s3://no-such-bucket/run"]))
    assert ray.is_initialized() == started


def test_run_metrics_on_a_uri_are_uploaded_and_a_resumed_run_appends_to_them(s3):
    from learner.metrics import RunLogger

    for step in (1, 2):
        logger = RunLogger("s3://runs/metrics", {}, wandb_mode="disabled")
        logger.log(step, {"x": float(step)})
        logger.close({"steps": step})
    place = storage.Location("s3://runs/metrics")
    lines = [json.loads(line) for line in place.read_text("metrics.jsonl").splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and json.loads(place.read_text("summary.json")) == {"steps": 2}
    assert not logger.dir.exists()  # the staging directory is gone


def test_a_command_writes_its_output_to_a_uri_through_local_staging(s3):
    from cluster.commands import DEFAULT_CONFIG, staged_output
    from core.config import load_config

    cfg = load_config(DEFAULT_CONFIG, ["sft.output_dir=s3://runs/sft"])
    with staged_output(cfg, "sft") as local_cfg:
        assert not storage.is_uri(local_cfg.sft.output_dir)
        storage.Location(local_cfg.sft.output_dir).write_text("config.json", "{}")
    assert storage.Location("s3://runs/sft").is_file("config.json")
    same = load_config(DEFAULT_CONFIG, ["sft.output_dir=runs/sft"])
    with staged_output(same, "sft") as local_cfg:
        assert local_cfg is same
