"""The local directory store: the embedded default (a local or shared filesystem, no server)."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

from publisher.stores.base import ObjectInfo, ObjectNotFound, ObjectStore, ObjectTooLarge, PermanentStoreError
from schemas.uris import object_uri


class LocalDirStore(ObjectStore):
    """A directory on a local or shared filesystem (the embedded default).

    Data appears through ``link()``, which is atomic and fails if the key exists:
    put-if-absent without locks, across processes. Objects are written to unnamed files
    (O_TMPFILE) and linked into place, so a crash leaves no partial object and no temporary
    file; where the filesystem cannot, to temporary names removed after the link. Metadata
    rides on the file as an extended attribute set before the link, so an object that exists
    always has it; where the filesystem has no user xattrs, a ``<key>.meta.json`` sidecar
    written before the link does the same job.
    """

    XATTR = "user.vllm_mm_events"

    def __init__(self, root: str | os.PathLike, fsync: bool = True, xattrs: bool = True, tmpfile: bool = True):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.xattrs = xattrs and hasattr(os, "setxattr")
        # One sync per batch costs about as much as one per object: batch for up to 50 ms
        # (the events wait for these objects, so this bounds their extra latency too).
        self.commit_linger_s = 0.05 if fsync else 0.0
        self._dirs: set[str] = set()
        self._seq = 0
        self._lock = threading.Lock()
        # Unnamed files need O_TMPFILE and /proc to name them by (linkat without /proc needs a
        # capability); without either, temporary names.
        self._tmpfile = tmpfile and hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

    def _path(self, key: str) -> str:
        # Keys are ours (content-addressed), but never let one escape the root.
        if not key or key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"object key {key!r}: expected a relative path without '.', '..' or empty parts")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        return object_uri("file", self.root, key)

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        return self.put_many([(key, data, metadata)])[0]

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        """Group commit: write every file (data + metadata), make them all durable with one sync,
        then link them all into place and fsync each directory once. Each object is durable when
        this returns."""
        try:
            return self._put_many(items)
        except FileNotFoundError:
            # A directory made earlier was removed (rm -rf objects/<model>, find -empty -delete):
            # forget it and make it again, once, rather than fail every put into it until a restart.
            parents = {self._path(key).rsplit("/", 1)[0] for key, _, _ in items}
            if not parents & self._dirs:
                raise
            self._dirs.difference_update(parents)
            return self._put_many(items)

    def _put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        staged: list[tuple[str, int, str | None]] = []  # (path, open fd, temp name or None)
        dirs: dict[str, int] = {}  # parent -> an open fd of it (linked into, then fsynced)
        try:
            for key, data, metadata in items:
                path = self._path(key)
                parent = path.rsplit("/", 1)[0]
                if parent not in self._dirs:
                    os.makedirs(parent, mode=0o750, exist_ok=True)
                    self._dirs.add(parent)
                if parent not in dirs:
                    dirs[parent] = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fd, tmp = self._stage(path, dirs[parent], data, json.dumps(metadata).encode())
                staged.append((path, fd, tmp))
            if self.fsync:
                self._sync([fd for _, fd, _ in staged])
            results, linked = [], set()
            for path, fd, tmp in staged:
                parent, name = path.rsplit("/", 1)
                try:
                    if tmp is None:  # an O_TMPFILE: named through its /proc link (linkat follows it)
                        self._link_unnamed(fd, name, dirs[parent])
                    else:
                        os.link(tmp, path)
                    results.append(True)
                    linked.add(parent)
                except FileExistsError:
                    results.append(False)
            if self.fsync:
                for parent in linked:
                    os.fsync(dirs[parent])  # the links themselves must survive a crash
            return results
        finally:
            for _, fd, tmp in staged:
                os.close(fd)
                if tmp is not None:
                    os.unlink(tmp)
            for fd in dirs.values():
                os.close(fd)

    def _link_unnamed(self, fd: int, name: str, dir_fd: int) -> None:
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd)
        except FileExistsError:
            raise
        except OSError as e:  # a /proc that refuses (some sandboxes): the caller retries with temporary names
            self._tmpfile = False
            raise OSError(e.errno, f"cannot name an unnamed file through /proc ({e.strerror}); "
                                   "temporary names from now on") from e

    def _stage(self, path: str, dir_fd: int, data: bytes, meta: bytes) -> tuple[int, str | None]:
        """Write one object's bytes and metadata to an unnamed file in its directory (O_TMPFILE:
        nothing to name, nothing to remove, nothing left behind by a crash), or, where the
        filesystem or /proc cannot do that, to a temporary name. Returns the open fd and the
        temporary name (None for an unnamed file)."""
        fd, tmp = None, None
        if self._tmpfile:
            try:
                # Objects are the server's data, not the world's: group-readable (a consumer sharing
                # the volume).
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o640, dir_fd=dir_fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile = False  # this filesystem has none: temporary names from now on
        if fd is None:
            parent, name = path.rsplit("/", 1)
            with self._lock:
                self._seq += 1
                tmp = f"{parent}/.{name}.{os.getpid()}.{self._seq}.tmp"
            # Never following a link planted where a temp file goes.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.xattrs:
                try:
                    os.setxattr(fd, self.XATTR, meta)
                except OSError as e:
                    if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    self.xattrs = False  # this filesystem has none: fall back to sidecars
            if not self.xattrs:
                self._write_sidecar(path, meta)
        except BaseException:
            os.close(fd)
            if tmp is not None:
                os.unlink(tmp)
            raise
        return fd, tmp

    def _sync(self, fds: list[int]) -> None:
        """Make staged files durable: one syncfs(2) for the batch where Linux has it
        (a fraction of per-file fsyncs at any batch size), else an fsync per file."""
        if not fds:
            return
        if _SYNCFS is not None and _SYNCFS(fds[0]) == 0:
            return
        for fd in fds:
            os.fsync(fd)

    def _write_sidecar(self, path: str, meta: bytes) -> None:
        side = path + ".meta.json"
        with self._lock:  # a name per attempt: one left by a crash never blocks the next
            self._seq += 1
            tmp = f"{side}.{os.getpid()}.{self._seq}.tmp"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640),
                           "wb") as f:
                f.write(meta)
                f.flush()  # the buffered bytes reach the file before fsync, not at close
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, side)
        except BaseException:
            # A full disk, a write error: leave nothing behind.
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        try:
            meta = os.getxattr(path, self.XATTR)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None  # removed since the stat
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise  # EIO and the like: the store is failing, not this object
            try:
                meta = Path(path + ".meta.json").read_bytes()
            except FileNotFoundError:
                meta = None
        # An object with no metadata, or metadata that does not parse (restored without xattrs, a
        # damaged sidecar), exists but is not the publisher's: {} for it, so that a batch of heads
        # still answers for the other objects.
        try:
            metadata = json.loads(meta) if meta is not None else {}
        except (ValueError, RecursionError):
            metadata = {}
        return ObjectInfo(key, size, metadata if isinstance(metadata, dict) else {})

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        # The publisher writes regular files only: a symlink (O_NOFOLLOW), a directory, a FIFO or a
        # device (O_NONBLOCK: opening one never waits) under a key is not an object.
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise PermanentStoreError(f"{self.uri(key)}: {e.strerror}") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise PermanentStoreError(f"{self.uri(key)}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            if max_bytes is not None and st.st_size > max_bytes:
                raise ObjectTooLarge(f"{self.uri(key)}: {st.st_size} bytes, over the {max_bytes}-byte cap")
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew while we read
            raise ObjectTooLarge(f"{self.uri(key)}: over the {max_bytes}-byte cap")
        return data


def _load_syncfs():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()

