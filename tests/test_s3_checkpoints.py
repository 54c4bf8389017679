"""The S3-backed CheckpointManager against moto's real S3 server on loopback.

The bucket is always read back with plain boto3 calls (list_objects_v2, get_object), never
through the manager, so the manifest is checked against what S3 really holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.common.signals import EXIT_INTERRUPTED
from src.storage.checkpoint_mirror import LEASE_NAME, MirrorInUseError
from src.storage.s3 import S3SettingError
from src.utils.checkpoint_manager import CheckpointManager
from tests.support.experiment import (
    REPO_ROOT,
    assert_bit_identical,
    experiment_env,
    newest_checkpoint_step,
    run_experiment,
    start_experiment,
    wait_for_checkpoint,
)
from tests.support.folder_format import FolderFormat
from tests.support.moto_server import AWS_ENV, MotoS3, running_moto_s3

BUCKET = "ckpt-bucket"


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with running_moto_s3() as server:
        server.reset()  # moto keeps its buckets in this process: each test starts empty
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def bucket_state(s3: MotoS3, prefix: str) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {key: bytes}) read with plain boto3."""
    client = s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    objects = {
        item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for item in listed
    }
    manifest = json.loads(objects.get(f"{prefix}/manifest.json", b'{"checkpoints": []}'))
    return manifest, objects


def assert_manifest_matches_objects(s3: MotoS3, prefix: str) -> list[int]:
    manifest, objects = bucket_state(s3, prefix)
    for record in manifest["checkpoints"]:
        body = objects[f"{prefix}/{record['file']}"]
        assert len(body) == record["size"]
        assert hashlib.sha256(body).hexdigest() == record["sha256"]
    return [record["step"] for record in manifest["checkpoints"]]


def state_at(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(64, 64)}, "step": step}


def test_seed_calls_upload_download_load_work_as_written(s3: MotoS3, tmp_path: Path) -> None:
    manager = CheckpointManager(
        local_dir=tmp_path / "a",
        remote_bucket=BUCKET,
        remote_prefix="checkpoints",
        endpoint_url=s3.endpoint_url,
        keep_last_n=2,
        async_save=False,
    )
    for step in (10, 20, 30):
        manager.save(state_at(step), step, is_best=step == 10)
    info = manager.upload_latest()
    assert info is not None and info.step == 30
    manager.close(remote_timeout=30)
    # Retention in the bucket: newest 2 plus the best; the manifest matches the objects.
    assert assert_manifest_matches_objects(s3, "checkpoints") == [30, 20, 10]

    fresh = CheckpointManager(
        local_dir=tmp_path / "fresh",
        remote_bucket=BUCKET,
        remote_prefix="checkpoints",
        endpoint_url=s3.endpoint_url,
    )
    downloaded = fresh.download_latest()
    assert downloaded is not None and downloaded.step == 30
    checkpoint = fresh.load_latest()
    assert checkpoint is not None
    assert torch.equal(checkpoint.state["model"]["w"], state_at(30)["model"]["w"])
    assert fresh.last_source == f"s3://{BUCKET}/checkpoints/step_000000030.pt"


def test_load_latest_on_an_empty_disk_downloads_the_newest(s3: MotoS3, tmp_path: Path) -> None:
    remote = {"remote_bucket": BUCKET, "remote_prefix": "run", "endpoint_url": s3.endpoint_url}
    writer = CheckpointManager(tmp_path / "one", **remote)
    for step in (5, 6):
        writer.save(state_at(step), step)
    report = writer.close(remote_timeout=30)
    assert report is not None and report.complete and report.uploaded == [5, 6]

    state, info = CheckpointManager(tmp_path / "two", **remote).load_latest()
    assert info.step == 6 and state["step"] == 6
    assert (tmp_path / "two" / "step_000000006.json").is_file()  # committed like a local one


def test_local_copy_is_kept_until_verified_in_s3(s3: MotoS3, tmp_path: Path) -> None:
    """S3 down: nothing local is pruned; back up: the backlog goes up, then pruning resumes."""
    manager = CheckpointManager(
        tmp_path,
        keep_last_n=1,
        async_save=False,
        remote_bucket=BUCKET,
        remote_prefix="p",
        endpoint_url=s3.endpoint_url,
    )
    manager.save(state_at(1), 1)
    assert manager.mirror is not None
    manager.mirror.flush(30)
    s3.stop()
    for step in (2, 3, 4):
        manager.save(state_at(step), step)
    assert [info.step for info in manager.list_checkpoints()] == [4, 3, 2]  # step 1 was safe
    s3.start()
    report = manager.close(remote_timeout=60)
    assert report is not None and report.complete
    assert [info.step for info in manager.list_checkpoints()] == [4]
    assert assert_manifest_matches_objects(s3, "p") == [4]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"remote_bucket": "absent-bucket"}, "bucket 'absent-bucket' does not exist"),
        ({"remote_bucket": "Not_A_Bucket"}, "is not a valid bucket name"),
        ({"endpoint_url": "http://127.0.0.1:9"}, "cannot reach S3"),
        ({"env": {"AWS_ACCESS_KEY_ID": ""}}, "no AWS credentials"),
    ],
)
def test_bad_settings_fail_at_construction_with_one_line(
    s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, expected: str
) -> None:
    for name, value in change.pop("env", {}).items():
        monkeypatch.delenv(name) if not value else monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = {"remote_bucket": BUCKET, "endpoint_url": s3.endpoint_url, **change}
    with pytest.raises(S3SettingError) as raised:
        CheckpointManager(tmp_path / "ckpt", **settings)
    line = raised.value.line
    assert expected in line and "\n" not in line
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in line


def test_a_second_machine_on_the_same_prefix_is_refused(s3: MotoS3, tmp_path: Path) -> None:
    remote = {"remote_bucket": BUCKET, "remote_prefix": "shared", "endpoint_url": s3.endpoint_url}
    other = json.dumps({"host": "other-machine", "pid": 4242, "lease_id": "x"}).encode()
    s3.client().put_object(Bucket=BUCKET, Key=f"shared/{LEASE_NAME}", Body=other)
    manager = CheckpointManager(tmp_path, **remote)
    with pytest.raises(MirrorInUseError) as raised:
        manager.start_mirror()
    assert "pid 4242 on other-machine" in raised.value.line
    assert raised.value.line.startswith("error: ")

    # The same host (the run lock already proved the old process gone) takes over.
    mine = json.dumps({"host": socket.gethostname(), "pid": 1, "lease_id": "y"}).encode()
    s3.client().put_object(Bucket=BUCKET, Key=f"shared/{LEASE_NAME}", Body=mine)
    manager.save(state_at(1), 1)
    manager.close(remote_timeout=30)
    assert assert_manifest_matches_objects(s3, "shared") == [1]
    _, objects = bucket_state(s3, "shared")
    assert f"shared/{LEASE_NAME}" not in objects  # released at close


def test_a_multi_file_checkpoint_goes_up_and_comes_back(s3: MotoS3, tmp_path: Path) -> None:
    """The mirror moves the files a record lists: a folder checkpoint needs no mirror code."""
    remote = {"remote_bucket": BUCKET, "remote_prefix": "folder", "endpoint_url": s3.endpoint_url}
    writer = CheckpointManager(tmp_path / "one", checkpoint_format=FolderFormat(), **remote)
    for step in (1, 2):
        writer.save(state_at(step), step)
    assert writer.close(remote_timeout=30).complete
    manifest, objects = bucket_state(s3, "folder")
    assert [record["step"] for record in manifest["checkpoints"]] == [2, 1]
    assert "folder/step_000000002/model.pt" in objects

    reader = CheckpointManager(tmp_path / "two", checkpoint_format=FolderFormat(), **remote)
    state, info = reader.load_latest()
    assert info.step == 2 and torch.equal(state["model"]["w"], state_at(2)["model"]["w"])
    assert reader.last_source == f"s3://{BUCKET}/folder/step_000000002"


# ----- the trainer, as a user runs it: real processes, real signals ---------------------------

TINY_LM = REPO_ROOT / "tests" / "support" / "tiny_lm_experiment.py"
TOTAL_STEPS = 30  # 160 sequences / batch 16 = 10 steps per epoch, 3 epochs
RUN_PREFIX = "ckpts/tiny"  # <s3_prefix>/<run_name>
CKPT_PREFIX = f"{RUN_PREFIX}/checkpoints"


def tiny_args(output_dir: Path, s3: MotoS3 | None, *extra: str) -> list[str]:
    args = [
        f"paths.output_dir={output_dir}",
        "run_name=tiny",
        "data.num_sequences=160",
        "logging.tensorboard=true",
        "trainer.log_every_n_steps=1",
        *extra,
    ]
    if s3 is not None:
        args += [
            f"checkpoint.s3_bucket={BUCKET}",
            "checkpoint.s3_prefix=ckpts",
            f"checkpoint.endpoint_url={s3.endpoint_url}",
        ]
    return args


def tiny_env(step_seconds: str = "0.05") -> dict[str, str]:
    # Slow steps, so signals and outages land mid-run on a fast or a loaded machine.
    return experiment_env(**AWS_ENV, TINY_LM_STEP_SECONDS=step_seconds)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted, S3 off."""
    output_dir = tmp_path_factory.mktemp("s3-reference")
    result = run_experiment(tiny_args(output_dir, None), tiny_env("0"), experiment=TINY_LM)
    assert result.returncode == 0, result.stderr
    return output_dir / "tiny"


def test_sigterm_wipe_the_disk_and_resume_from_s3_is_bit_identical(
    s3: MotoS3, tmp_path: Path, tiny_reference: Path
) -> None:
    args = tiny_args(tmp_path, s3)
    run_dir = tmp_path / "tiny"
    process = start_experiment(args, tiny_env(), experiment=TINY_LM)
    wait_for_checkpoint(process, run_dir, 12)  # after epoch 1 was validated and logged
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    stopped_at = newest_checkpoint_step(run_dir)
    assert f"S3 mirror up to date: step {stopped_at}" in out
    shutil.rmtree(run_dir)  # the instance is gone, and its disk with it

    resumed = run_experiment(args, tiny_env("0"), experiment=TINY_LM)
    assert resumed.returncode == 0, resumed.stderr
    source = f"s3://{BUCKET}/{CKPT_PREFIX}/step_{stopped_at:09d}.pt"
    assert f"resuming from {source} at step {stopped_at} " in resumed.stdout
    assert "download step" in resumed.stderr  # the progress bar
    assert_bit_identical(run_dir / "final_model.pt", tiny_reference / "final_model.pt")
    assert_bit_identical(run_dir / "best_model.pt", tiny_reference / "best_model.pt")
    log = json.loads((run_dir / "training_log.json").read_text())
    assert [record["epoch"] for record in log] == [0, 1, 2]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/loss")] == [10, 20, 30]
    assert [event.step for event in events.Scalars("train/loss")][:2] == [1, 2]  # restored

    steps = assert_manifest_matches_objects(s3, CKPT_PREFIX)
    assert steps[0] == TOTAL_STEPS
    _, objects = bucket_state(s3, RUN_PREFIX)
    for name in ("config.json", "training_log.json", "final_model.pt", "test_results.json"):
        assert f"{RUN_PREFIX}/{name}" in objects
    secret = AWS_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    assert all(secret not in body for body in objects.values())
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in out + err + resumed.stdout + resumed.stderr


def test_outage_mid_run_loses_nothing_and_the_backlog_goes_up(
    s3: MotoS3, tmp_path: Path, tiny_reference: Path
) -> None:
    puts = RequestLog()
    args = tiny_args(tmp_path, s3, "checkpoint.every_n_steps=2", "checkpoint.keep_last_n=2")
    run_dir = tmp_path / "tiny"
    process = start_experiment(args, tiny_env("0.1"), experiment=TINY_LM)
    wait_for_checkpoint(process, run_dir, 6)
    s3.stop()
    outage_start, stopped_at = newest_checkpoint_step(run_dir), time.monotonic()
    wait_for_checkpoint(process, run_dir, outage_start + 8)  # four checkpoint intervals
    time.sleep(max(0.0, 1.5 - (time.monotonic() - stopped_at)))  # past any upload in flight
    during = sorted(local_steps(run_dir))
    s3.start()
    out, err = process.communicate(timeout=120)
    puts.close()
    assert process.returncode == 0, err
    assert err.count("S3 upload to") == 1, err  # one warning line for the whole outage
    assert "S3 answers again" in err
    # Nothing written during the outage was pruned while S3 was down ...
    assert len([step for step in during if step > outage_start]) >= 4
    # ... and every one of them went up before its local copy could go.
    uploaded = puts.checkpoint_steps()
    assert set(during) <= uploaded, (during, uploaded)
    steps = assert_manifest_matches_objects(s3, CKPT_PREFIX)
    assert steps[:2] == [TOTAL_STEPS, TOTAL_STEPS - 2]
    assert_bit_identical(run_dir / "final_model.pt", tiny_reference / "final_model.pt")


def test_sigkill_during_uploads_never_lists_a_partial_checkpoint(
    s3: MotoS3, tmp_path: Path, tiny_reference: Path
) -> None:
    args = tiny_args(tmp_path, s3, "checkpoint.every_n_steps=1")
    run_dir = tmp_path / "tiny"
    rng = random.Random(9)
    for target in (4, 13):
        process = start_experiment(args, tiny_env("0.02"), experiment=TINY_LM)
        wait_for_checkpoint(process, run_dir, target)
        time.sleep(rng.uniform(0, 0.02))  # somewhere inside an upload, usually
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        listed = assert_manifest_matches_objects(s3, CKPT_PREFIX)  # complete ones only
        assert not listed or listed[0] <= newest_checkpoint_step(run_dir)

    finished = run_experiment(args, tiny_env("0"), experiment=TINY_LM)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert assert_manifest_matches_objects(s3, CKPT_PREFIX)[0] == TOTAL_STEPS
    assert_bit_identical(run_dir / "final_model.pt", tiny_reference / "final_model.pt")


def test_stop_while_s3_is_down_says_what_waits_and_the_next_run_uploads_it(
    s3: MotoS3, tmp_path: Path
) -> None:
    args = tiny_args(tmp_path, s3, "checkpoint.s3_stop_grace_s=1")
    run_dir = tmp_path / "tiny"
    process = start_experiment(args, tiny_env(), experiment=TINY_LM)
    wait_for_checkpoint(process, run_dir, 5)
    s3.stop()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    stopped_at = newest_checkpoint_step(run_dir)
    line = next(line for line in out.splitlines() if "S3 upload not finished" in line)
    waiting = re.search(r"step ([\d, ]+) still local", line)
    assert waiting and str(stopped_at) in waiting.group(1).split(", "), line
    assert "the next run of this command uploads it" in line

    s3.start()
    resumed = run_experiment([*args, "trainer.max_steps=12"], tiny_env("0"), experiment=TINY_LM)
    assert resumed.returncode == 0, resumed.stderr
    assert "a previous run left on this disk" in resumed.stderr
    assert assert_manifest_matches_objects(s3, CKPT_PREFIX)[0] == 12


def test_bad_bucket_from_the_command_line_is_one_line_exit_2_and_writes_nothing(
    s3: MotoS3, tmp_path: Path
) -> None:
    args = [*tiny_args(tmp_path, s3), "checkpoint.s3_bucket=no-such-bucket"]
    result = run_experiment(args, tiny_env("0"), experiment=TINY_LM)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    expected = "bucket 'no-such-bucket' does not exist: create it, or fix checkpoint.s3_bucket"
    assert lines == [f"s3 error: {expected}"]
    assert not (tmp_path / "tiny").exists()


def local_steps(run_dir: Path) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.json")}


class RequestLog(logging.Handler):
    """What moto's server answered (werkzeug's access log): which checkpoints were PUT."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        logging.getLogger("werkzeug").addHandler(self)
        logging.getLogger("werkzeug").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def close(self) -> None:
        logging.getLogger("werkzeug").removeHandler(self)
        super().close()

    def checkpoint_steps(self) -> set[int]:
        found = re.findall(r'"PUT /[^ ]*/step_(\d+)\.pt[ ?][^"]*" 200', "\n".join(self.lines))
        return {int(step) for step in found}
