import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase_ray.storage import ChecksumError, Storage, StorageError, open_storage, split_uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trips(root):
    st, root = open_storage(root)
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    st.write_parquet(st.join(root, "t", "data.parquet"), table)
    assert st.read_parquet(st.join(root, "t", "data.parquet")).equals(table)
    st.write_json(st.join(root, "t", "meta.json"), {"k": [1, 2]})
    assert st.read_json(st.join(root, "t", "meta.json")) == {"k": [1, 2]}
    st.write_bytes(st.join(root, "blob.bin"), b"\x00\x01")
    assert st.read_bytes(st.join(root, "blob.bin")) == b"\x00\x01"
    assert [u.rsplit("/", 1)[-1] for u in st.ls(st.join(root, "t"))] == ["data.parquet",
                                                                         "meta.json"]
    assert st.exists(st.join(root, "blob.bin"))
    assert not st.exists(st.join(root, "nothing"))


def test_pyarrow_filesystem_reads_what_fsspec_wrote(root):
    st, root = open_storage(root)
    st.write_parquet(st.join(root, "p.parquet"), pa.table({"v": [7]}))
    assert pq.read_table(st.path(st.join(root, "p.parquet")), filesystem=st.pa_fs)["v"][0].as_py() == 7


def test_manifest_checksums(root):
    st, root = open_storage(root)
    st.write_bytes(st.join(root, "a.bin"), b"hello")
    st.write_bytes(st.join(root, "sub", "b.bin"), b"world")
    m = st.write_manifest(root, {"stage": "x"}, ["a.bin", "sub/b.bin"])
    assert m["files"]["a.bin"]["sha256"] == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    assert st.read_manifest(root)["stage"] == "x"
    st.verify(root)
    st.write_bytes(st.join(root, "a.bin"), b"tampered")
    with pytest.raises(ChecksumError, match="was modified"):
        st.verify(root)
    st.delete(st.join(root, "sub", "b.bin"))
    with pytest.raises(ChecksumError, match="missing"):
        st.verify(root, only=["sub/b.bin"])


def test_failed_write_leaves_nothing_visible(tmp_path):
    st, root = open_storage(str(tmp_path))
    target = st.join(root, "out.parquet")

    class Boom:
        def __bytes__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        st.write_bytes(target, Boom())  # not bytes: fails inside the write
    assert os.listdir(tmp_path) == []
    st.write_bytes(target, b"v1")
    with pytest.raises(TypeError):
        st.write_bytes(target, Boom())
    assert st.read_bytes(target) == b"v1"  # the old version stays whole
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_s3_write_is_single_put(s3_bucket):
    st, root = open_storage(s3_bucket)
    target = st.join(root, "big.bin")
    data = os.urandom(3 << 20)
    st.write_bytes(target, data)
    assert st.read_bytes(target) == data
    assert [u for u in st.ls(root)] == [target]  # no temporary objects left behind


def test_bad_uris_and_missing_things(s3_server, tmp_path):
    with pytest.raises(StorageError, match="unsupported URI scheme 'ftp://'"):
        split_uri("ftp://host/x")
    with pytest.raises(StorageError, match="without a bucket"):
        split_uri("s3:///key")
    with pytest.raises(StorageError, match="empty"):
        split_uri("  ")
    st, _ = open_storage("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        st.read_bytes("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        st.write_bytes("s3://no-such-bucket-here/x", b"1")
    local, root = open_storage(str(tmp_path))
    with pytest.raises(StorageError, match="no such object"):
        local.read_bytes(local.join(root, "missing.json"))
    local.write_bytes(local.join(root, "bad.json"), b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        local.read_json(local.join(root, "bad.json"))


def test_upload_download_dir(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "d" / "y.txt").write_text("y")
    st, root = open_storage(s3_bucket + "/dir")
    assert len(st.upload_dir(str(src), root)) == 2
    out = st.download_dir(root, str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "d" / "y.txt").read_text() == "y"
    assert json.dumps(sorted(os.listdir(out))) == '["d", "x.txt"]'


def test_explicit_s3_config_overrides_env(s3_server, s3_bucket, monkeypatch):
    from rebase_ray.config import S3Config

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    st = Storage("s3", S3Config(endpoint_url=s3_server, key="testing", secret="testing"))
    st.write_bytes(s3_bucket + "/cfg.txt", b"ok")
    assert st.read_bytes(s3_bucket + "/cfg.txt") == b"ok"
