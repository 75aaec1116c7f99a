"""The local directory store under operators and faults: objects restored without their metadata,
directories removed under a running writer, a metadata sidecar write that fails (real files only)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from publisher.stores.local import LocalDirStore


def meta(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "dtype": "float32", "shape": "[2, 2]"}


def _has_user_xattrs(path) -> bool:
    probe = path / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()


def test_head_many_returns_empty_metadata_for_objects_without_readable_metadata(tmp_path):
    """cp/rsync without xattrs, a truncated or hostile sidecar: the object is there but not the
    publisher's ({}), and the good object checked in the same batch keeps its metadata."""
    if not _has_user_xattrs(tmp_path):
        pytest.skip("this filesystem has no user xattrs")
    store = LocalDirStore(tmp_path / "objects")
    datas = {k: k.encode() * 10 for k in ("m/good", "m/stripped", "m/garbled", "m/deep")}
    assert store.put_many([(k, d, meta(d)) for k, d in datas.items()]) == [True] * 4
    root = tmp_path / "objects"
    for k in ("m/stripped", "m/garbled", "m/deep"):
        os.removexattr(root / k, LocalDirStore.XATTR)  # as cp/rsync without -X leaves it
    (root / "m/garbled.meta.json").write_bytes(b"{not json")
    (root / "m/deep.meta.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)  # past the parser's depth

    infos = store.head_many(list(datas))
    assert infos[0].metadata == meta(datas["m/good"])
    assert [(i.key, i.size, i.metadata) for i in infos[1:]] == [
        (k, len(datas[k]), {}) for k in ("m/stripped", "m/garbled", "m/deep")]
    assert store.head("m/absent") is None


def test_head_without_xattrs_returns_empty_metadata_when_the_sidecar_is_gone(tmp_path):
    store = LocalDirStore(tmp_path / "objects", xattrs=False)
    assert store.put_if_absent("m/a", b"abc", meta(b"abc")) is True
    assert store.head("m/a").metadata == meta(b"abc")
    (tmp_path / "objects/m/a.meta.json").unlink()
    info = store.head("m/a")
    assert (info.size, info.metadata) == (3, {})


@pytest.mark.parametrize("tmpfile", [True, False], ids=["unnamed", "named-temp-files"])
@pytest.mark.parametrize("xattrs", [True, False], ids=["xattrs", "sidecars"])
def test_put_into_a_directory_removed_under_the_writer(tmp_path, tmpfile, xattrs):
    """rm -rf objects/<model> (or find -empty -delete) while the writer runs: the next put into
    that directory makes it again instead of failing until a restart."""
    store = LocalDirStore(tmp_path / "objects", xattrs=xattrs, tmpfile=tmpfile)
    assert store.put_if_absent("model/x/a", b"first", meta(b"first")) is True
    shutil.rmtree(tmp_path / "objects/model")
    assert store.put_if_absent("model/x/b", b"second", meta(b"second")) is True
    assert store.put_many([("model/x/c", b"third", meta(b"third"))]) == [True]
    info = store.head("model/x/b")
    assert (info.size, info.metadata) == (6, meta(b"second"))
    assert store.get("model/x/c") == b"third"


_FAILED_SIDECAR_WRITE = textwrap.dedent("""
    import json, os, resource, signal, sys
    from publisher.stores.local import LocalDirStore

    root = sys.argv[1]
    store = LocalDirStore(root, xattrs=False)  # metadata in <key>.meta.json sidecars
    big = {"sha256": "0" * 64, "dtype": "float32", "shape": "[2, 2]", "pad": "p" * 4000}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as a full disk gives ENOSPC
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # the 1-byte object fits, its sidecar does not
    try:
        store.put_if_absent("m/a", b"x", big)
        failed = None
    except OSError as e:
        failed = e.errno
    left = sorted(n for n in os.listdir(root + "/m"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        retried = store.put_if_absent("m/a", b"x", big)  # the same thread, the limit lifted
    except OSError as e:
        retried = repr(e)
    info = store.head("m/a")
    print(json.dumps({"failed": failed, "left": left, "retried": retried,
                      "meta": info and info.metadata == big, "after": sorted(os.listdir(root + "/m"))}))
""")


def test_failed_sidecar_write_leaves_no_temp_file_and_a_retry_succeeds(tmp_path):
    root = str(tmp_path / "objects")
    cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _FAILED_SIDECAR_WRITE, root], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failed"] is not None, "the sidecar write was expected to fail under RLIMIT_FSIZE"
    assert out["left"] == [], "a failed write left files behind"
    assert out["retried"] is True and out["meta"] is True
    assert out["after"] == ["a", "a.meta.json"]
