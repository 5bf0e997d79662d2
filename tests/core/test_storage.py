"""brainmri.core.storage: local paths, file:// URIs and S3 (a real S3-protocol server on loopback)."""

from __future__ import annotations

import os
import time

import boto3
import pyarrow.fs as pafs
import pytest

from brainmri.core.storage import StorageError, check_name, open_location


# -- local -------------------------------------------------------------------------------------
def test_local_path_and_file_uri_are_the_same_place(tmp_path):
    a = open_location(str(tmp_path / "store"))
    b = open_location(f"file://{tmp_path}/store")
    assert a.path == b.path == str(tmp_path / "store")
    assert isinstance(a.fs, pafs.LocalFileSystem) and not a.is_s3
    (a / "x" / "y.json").write_json({"k": [1, 2]})
    assert (b / "x/y.json").read_json() == {"k": [1, 2]}
    assert (tmp_path / "store" / "x" / "y.json").is_file()


def test_relative_and_home_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_location("rel/dir").path == str(tmp_path / "rel" / "dir")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_location("~/h").path == str(tmp_path / "h")


def test_local_queries(tmp_path):
    loc = open_location(tmp_path / "s")
    assert not loc.exists() and loc.listdir() == [] and loc.files() == []
    (loc / "b.txt").write_bytes(b"bb")
    (loc / "a" / "c.bin").write_bytes(b"c")
    (loc / "a" / "d.txt").write_bytes(b"d")
    assert loc.exists() and not loc.is_file() and (loc / "b.txt").is_file()
    assert loc.listdir() == ["a", "b.txt"]
    assert [f.path for f in loc.files(".txt")] == [str(tmp_path / "s/a/d.txt"),
                                                   str(tmp_path / "s/b.txt")]
    assert (loc / "a" / "c.bin").name == "c.bin"
    (loc / "a").delete()
    assert loc.listdir() == ["b.txt"]
    (loc / "b.txt").delete()
    (loc / "never").delete()  # deleting nothing is fine
    assert loc.listdir() == []


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    f = open_location(tmp_path) / "d" / "data.bin"
    for i in range(5):
        f.write_bytes(bytes([i]) * (1000 + i))
    assert f.read_bytes() == bytes([4]) * 1004
    assert os.listdir(tmp_path / "d") == ["data.bin"]
    # overwrite replaces the inode (rename), so an open reader keeps the whole old file
    with open(tmp_path / "d" / "data.bin", "rb") as reader:
        f.write_bytes(b"new")
        assert reader.read() == bytes([4]) * 1004
    assert f.read_bytes() == b"new"
    assert os.listdir(tmp_path / "d") == ["data.bin"]


@pytest.mark.parametrize("seg", ["..", "a/../b", ".", "a/./b", "", "/"])
def test_bad_path_segments_rejected(tmp_path, seg):
    with pytest.raises(StorageError, match="invalid path segment"):
        open_location(tmp_path) / seg


def test_join_strips_slashes(tmp_path):
    loc = open_location(tmp_path)
    assert (loc / "/a/b/").path == str(tmp_path / "a" / "b")
    assert (loc / "a/b").uri == f"{tmp_path}/a/b"


@pytest.mark.parametrize("name", ["brain-tumor-mri", "v1.2", "A_b-c", "x" * 128, "9"])
def test_check_name_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a..b", "../x", "a/b", "-x", ".hidden", "a b",
                                  "x" * 129, "a\\b", "ä"])
def test_check_name_rejects(name):
    with pytest.raises(StorageError, match="invalid dataset name"):
        check_name(name, "dataset name")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x", "https://h/x", "hdfs://n/x",
                                 "azure://c/x"])
def test_unsupported_schemes_rejected(uri):
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_location(uri)


def test_empty_uri_rejected():
    with pytest.raises(StorageError, match="empty"):
        open_location("")


def test_local_check(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="inside a file"):
        open_location(tmp_path / "file" / "sub", check=True)
    loc = open_location(tmp_path / "new" / "deep", check=True)  # may not exist yet
    assert not loc.exists()
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(StorageError, match="not writable"):
            open_location(ro / "x", check=True)


def test_relative_storage_paths_are_refused_in_a_job_with_a_working_dir(tmp_path, monkeypatch):
    """In a `ray job submit --working-dir` driver (Ray's job supervisor sets this variable to
    the job's config), `./lake` would be the job's temporary copy: one line, not a lost model."""
    import json

    monkeypatch.chdir(tmp_path)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    for rel in ("./lake", "lake/datasets", "file://lake"):
        with pytest.raises(StorageError, match=r"is relative: in a Ray job .*\$PWD/lake"):
            open_location(rel, check=True)
        assert open_location(rel).path == str(tmp_path / rel.removeprefix("file://"))  # unchecked
    assert open_location(str(tmp_path / "lake"), check=True).path == str(tmp_path / "lake")
    # without a working dir there is no copy to lose: a relative path is resolved as anywhere
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert open_location("./lake", check=True).path == str(tmp_path / "lake")


# -- S3 URIs that never reach a server -------------------------------------------------------
@pytest.mark.parametrize("uri,msg", [
    ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
    ("s3://ab/x", "invalid S3 bucket name"),
    ("s3:///x", "invalid S3 bucket name"),
    ("s3://bucket/a/../b", "'.' or '..'"),
    ("s3://bucket/./b", "'.' or '..'"),
])
def test_bad_s3_uris(uri, msg):
    with pytest.raises(StorageError, match=msg):
        open_location(uri)


# -- S3 against the loopback server ---------------------------------------------------------
def test_s3_write_read_list(s3_bucket):
    loc = open_location(f"s3://{s3_bucket}/lake/", check=True)
    assert loc.is_s3 and loc.uri == f"s3://{s3_bucket}/lake" and loc.path == f"{s3_bucket}/lake"
    assert loc.listdir() == [] and not loc.exists()
    (loc / "datasets" / "a.json").write_json({"n": 1, "s": "é"})
    (loc / "datasets" / "sub" / "b.bin").write_bytes(b"\x00\x01" * 100_000)
    (loc / "top.txt").write_bytes(b"t")
    assert (loc / "datasets/a.json").read_json() == {"n": 1, "s": "é"}
    assert (loc / "datasets/sub/b.bin").read_bytes() == b"\x00\x01" * 100_000
    assert loc.listdir() == ["datasets", "top.txt"]
    assert (loc / "datasets").listdir() == ["a.json", "sub"]
    assert [f.uri for f in loc.files(".json")] == [f"s3://{s3_bucket}/lake/datasets/a.json"]
    assert (loc / "top.txt").is_file() and not (loc / "nothing").exists()
    # what the objects look like to any other S3 client
    s3 = boto3.client("s3", endpoint_url=os.environ["BRAINMRI_S3_ENDPOINT"])
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["lake/datasets/a.json", "lake/datasets/sub/b.bin", "lake/top.txt"]
    (loc / "datasets").delete()
    assert loc.listdir() == ["top.txt"]


def test_s3_keys_are_not_resolved_against_the_working_directory(s3_bucket, tmp_path, monkeypatch):
    """Listing below an S3 prefix is string work on keys: it must not read the process's working
    directory, which a Ray job's node may have deleted under it (its working-dir copy)."""
    loc = open_location(f"s3://{s3_bucket}/lake")
    (loc / "a" / "b.json").write_json({})
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError):
        os.getcwd()
    assert [f.uri for f in loc.files(".json")] == [f"s3://{s3_bucket}/lake/a/b.json"]
    assert loc.relative(f"{s3_bucket}/lake/a/b.json") == "a/b.json"
    with pytest.raises(StorageError, match="not below"):
        loc.relative(f"{s3_bucket}/lakes/a.json")  # a sibling sharing the prefix's first letters


def test_s3_nonexistent_bucket(s3_server):
    with pytest.raises(StorageError) as e:
        open_location("s3://no-such-bucket-here/lake", check=True)
    msg = str(e.value)
    assert "does not exist" in msg and "no-such-bucket-here" in msg and s3_server in msg
    assert "\n" not in msg


def test_s3_endpoint_variables(s3_server, monkeypatch):
    from brainmri.core.storage import s3_endpoint

    monkeypatch.delenv("BRAINMRI_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert s3_endpoint() == "http://s3only:2"
    monkeypatch.setenv("BRAINMRI_S3_ENDPOINT", s3_server)
    assert s3_endpoint() == s3_server


def test_s3_bad_credentials_are_not_checked_by_moto_so_test_unreachable(s3_bucket, monkeypatch):
    """moto (server mode, default settings) does not verify request signatures: a wrong
    secret key is accepted. This records that, so the denial path is tested elsewhere
    (against real S3) and here we test the failure moto can produce: a dead endpoint."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    open_location(f"s3://{s3_bucket}/x", check=True)  # accepted by moto

    monkeypatch.setenv("BRAINMRI_S3_ENDPOINT", "http://127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_location(f"s3://{s3_bucket}/x", check=True)
    assert time.monotonic() - t0 < 10
    assert "cannot reach" in str(e.value) and "127.0.0.1:1" in str(e.value)


def test_s3_no_credentials(s3_bucket, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="no S3 credentials"):
        open_location(f"s3://{s3_bucket}/x", check=True)
    assert time.monotonic() - t0 < 10


def test_s3_endpoint_without_scheme_is_one_line_error(monkeypatch):
    from brainmri.core.storage import s3_endpoint

    monkeypatch.setenv("BRAINMRI_S3_ENDPOINT", "localhost:9000")
    with pytest.raises(StorageError, match="must start with http:// or https://") as e:
        s3_endpoint()
    assert "\n" not in str(e.value)
    with pytest.raises(StorageError, match="BRAINMRI_S3_ENDPOINT"):
        open_location("s3://some-bucket/lake")


def test_local_write_fsyncs_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    loc = open_location(str(tmp_path)) / "manifest.json"
    loc.write_json({"a": 1})
    assert calls == ["fsync", "replace"] and loc.read_json() == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
