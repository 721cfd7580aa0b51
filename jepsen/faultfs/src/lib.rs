//! A fault filesystem for power cuts (docs/architecture.md section 15,
//! docs/decisions/019-power-cuts-fault-filesystem.md).
//!
//! [`FaultFs::mount`] mounts a FUSE pass-through of a backing directory.
//! Everything a program does on the mount reaches the backing files at
//! once, so reads see unsynced writes as they would through a page cache;
//! but the filesystem remembers what has not been made durable yet:
//!
//! - for every file written since its last `fsync`/`fdatasync`: its length
//!   at that sync and the synced bytes that later writes or truncations
//!   overwrote (saved page by page before they are overwritten);
//! - for every file created since then: that its creation is unsynced,
//!   until the file itself or its directory is synced.
//!
//! [`FaultFs::power_cut`] is the power cut: it rolls every file back to its
//! last sync (synced bytes put back, the length cut to the synced one) and
//! removes the files whose creation was never synced. A program started
//! on the mount afterwards finds what a machine would find after losing
//! power with that page cache.
//!
//! Modelled: unsynced file data (writes, truncations, hole punching),
//! unsynced file creation. Not modelled: renames, unlinks and directory
//! creation are durable at once (as on a journaling filesystem that
//! commits metadata in order), a sync is all or nothing (no torn pages),
//! and data is never reordered or partly written back before a sync.
//!
//! Every file is opened with `FOPEN_DIRECT_IO`, so the kernel keeps no page
//! cache of its own for the mount and a rollback is seen at once; memory
//! maps of files on the mount are therefore not supported, and geokv's
//! RocksDB options use none.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

/// Granularity of the saved synced bytes.
const PAGE: u64 = 4096;
/// Attributes and entries are never cached by the kernel: after a power
/// cut a file's length and existence change behind its back.
const TTL: Duration = Duration::ZERO;
/// How often [`FaultFs::power_cut`] looks for the last handle to close.
const POLL: Duration = Duration::from_millis(5);

/// What a file has that is not durable yet.
#[derive(Debug, Default)]
struct Dirty {
    /// Length at the last sync.
    synced_len: u64,
    /// Synced bytes overwritten since, by page index (each at most
    /// [`PAGE`] bytes, shorter where the synced length ends).
    saved: BTreeMap<u64, Vec<u8>>,
    /// Created since the last sync of the file or of its directory.
    created: bool,
}

#[derive(Default)]
struct Inner {
    /// Inode number -> path relative to the backing root ("" is the root).
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Open files by handle: the backing file and its inode.
    files: HashMap<u64, (File, u64)>,
    next_fh: u64,
    dirty: HashMap<u64, Dirty>,
    /// Since mount: syncs seen (file and directory).
    syncs: u64,
}

/// What a power cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files put back to their last sync.
    pub files_rolled_back: usize,
    /// Files removed because their creation was never synced.
    pub files_removed: usize,
    /// Unsynced bytes dropped: bytes past the synced length plus synced
    /// bytes put back.
    pub bytes_dropped: u64,
}

/// Unsynced state now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsynced {
    pub files: usize,
    pub syncs_seen: u64,
}

struct Shared {
    backing: PathBuf,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.backing.clone()
        } else {
            self.backing.join(rel)
        }
    }
}

impl Inner {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// The inode of `rel`, numbered on first sight.
    fn ino_for(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.inos.get(rel) {
            return *i;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, rel.to_path_buf());
        self.inos.insert(rel.to_path_buf(), ino);
        ino
    }

    /// Forgets `rel` (unlinked or replaced): its inode keeps working
    /// through open handles but is no longer tracked for rollback.
    fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.inos.remove(rel) {
            self.paths.remove(&ino);
            self.dirty.remove(&ino);
        }
    }

    /// Makes `ino` dirty (recording its length as the synced one on the
    /// first unsynced change) and saves the synced bytes of
    /// `[from, to)` before they are changed. Untracked inodes (unlinked)
    /// are left alone.
    fn before_change(&mut self, ino: u64, file: &File, from: u64, to: u64) -> io::Result<()> {
        if !self.paths.contains_key(&ino) {
            return Ok(());
        }
        let d = match self.dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let synced_len = file.metadata()?.len();
                e.insert(Dirty { synced_len, ..Dirty::default() })
            }
        };
        let to = to.min(d.synced_len);
        if from >= to {
            return Ok(());
        }
        for page in from / PAGE..to.div_ceil(PAGE) {
            if d.saved.contains_key(&page) {
                continue;
            }
            let start = page * PAGE;
            let len = PAGE.min(d.synced_len - start) as usize;
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                let n = file.read_at(&mut buf[got..], start + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            d.saved.insert(page, buf);
        }
        Ok(())
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn attr(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    let time = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.len(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.mtime(), md.mtime_nsec()),
        kind: FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn cstr(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

/// The filesystem the FUSE session serves.
struct Fs {
    shared: Arc<Shared>,
}

impl Fs {
    fn child(&self, inner: &Inner, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(inner.path(parent)?.join(name))
    }

    fn open_backing(&self, full: &Path, flags: i32, mode: Option<u32>) -> io::Result<File> {
        let acc = flags & libc::O_ACCMODE;
        let mut o = OpenOptions::new();
        // Always readable: synced bytes are read back before a write
        // overwrites them.
        o.read(true);
        o.write(acc == libc::O_WRONLY || acc == libc::O_RDWR);
        // Kept: append; dropped: what the kernel or this layer already did
        // (create, exclusive, truncate) and what would bypass the layer.
        let keep = flags & libc::O_APPEND;
        o.custom_flags(keep);
        if let Some(mode) = mode {
            o.create_new(true).mode(mode);
        }
        o.open(full)
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut inner = self.shared.lock();
        let rel = match self.child(&inner, parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        match std::fs::symlink_metadata(self.shared.full(&rel)) {
            Ok(md) => {
                let ino = inner.ino_for(&rel);
                reply.entry(&TTL, &attr(ino, &md), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = self.shared.lock();
        let md = match fh.and_then(|fh| inner.files.get(&fh.0)) {
            Some((file, _)) => file.metadata(),
            None => match inner.path(ino) {
                Ok(rel) => std::fs::symlink_metadata(self.shared.full(&rel)),
                Err(e) => return reply.error(e),
            },
        };
        match md {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut inner = self.shared.lock();
        let result: io::Result<std::fs::Metadata> = (|| {
            let rel = inner.path(ino).ok();
            let file = match fh.and_then(|fh| inner.files.get(&fh.0)) {
                Some((f, _)) => f.try_clone()?,
                None => {
                    let rel = rel.clone().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
                    let full = self.shared.full(&rel);
                    if size.is_some() {
                        OpenOptions::new().read(true).write(true).open(&full)?
                    } else {
                        File::open(&full)?
                    }
                }
            };
            if let Some(size) = size {
                inner.before_change(ino.0, &file, size, u64::MAX)?;
                file.set_len(size)?;
            }
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if atime.is_some() || mtime.is_some() {
                let to = |t: Option<TimeOrNow>| -> Option<SystemTime> {
                    match t? {
                        TimeOrNow::Now => Some(SystemTime::now()),
                        TimeOrNow::SpecificTime(t) => Some(t),
                    }
                };
                let mut times = std::fs::FileTimes::new();
                if let Some(a) = to(atime) {
                    times = times.set_accessed(a);
                }
                if let Some(m) = to(mtime) {
                    times = times.set_modified(m);
                }
                file.set_times(times)?;
            }
            file.metadata()
        })();
        match result {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut inner = self.shared.lock();
        let rel = match self.child(&inner, parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let full = self.shared.full(&rel);
        let made = (|| {
            let c = cstr(&full).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: mkdir(2) reads the NUL-terminated path only.
            if unsafe { libc::mkdir(c.as_ptr(), (mode & !umask) as libc::mode_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::fs::symlink_metadata(&full)
        })();
        match made {
            Ok(md) => {
                let ino = inner.ino_for(&rel);
                reply.entry(&TTL, &attr(ino, &md), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let rel = match self.child(&inner, parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        match std::fs::remove_file(self.shared.full(&rel)) {
            Ok(()) => {
                inner.forget_path(&rel);
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let rel = match self.child(&inner, parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        match std::fs::remove_dir(self.shared.full(&rel)) {
            Ok(()) => {
                inner.forget_path(&rel);
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.bits() != 0 {
            return reply.error(Errno::EINVAL);
        }
        let mut inner = self.shared.lock();
        let (from, to) = match (self.child(&inner, parent, name), self.child(&inner, newparent, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if let Err(e) = std::fs::rename(self.shared.full(&from), self.shared.full(&to)) {
            return reply.error(errno(e));
        }
        // The replaced file is gone; the moved one (and, for a directory,
        // everything under it) keeps its inode under the new name.
        inner.forget_path(&to);
        let moved: Vec<(PathBuf, u64)> =
            inner.inos.iter().filter(|(p, _)| p.starts_with(&from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            let new = match old.strip_prefix(&from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.clone(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            inner.inos.remove(&old);
            inner.inos.insert(new.clone(), ino);
            inner.paths.insert(ino, new);
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = self.shared.lock();
        let rel = match inner.path(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let opened = (|| {
            let file = self.open_backing(&self.shared.full(&rel), flags.0, None)?;
            if flags.0 & libc::O_TRUNC != 0 {
                inner.before_change(ino.0, &file, 0, u64::MAX)?;
                file.set_len(0)?;
            }
            Ok::<File, io::Error>(file)
        })();
        match opened {
            Ok(file) => {
                let fh = inner.next_fh;
                inner.next_fh += 1;
                inner.files.insert(fh, (file, ino.0));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut inner = self.shared.lock();
        let rel = match self.child(&inner, parent, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let full = self.shared.full(&rel);
        // A create of a file that exists is an open (unless exclusive).
        let existed = full.exists();
        if existed && flags & libc::O_EXCL != 0 {
            return reply.error(Errno::EEXIST);
        }
        let opened = if existed {
            self.open_backing(&full, flags, None)
        } else {
            self.open_backing(&full, flags, Some(mode & !umask & 0o7777))
        };
        let file = match opened {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        let ino = inner.ino_for(&rel);
        if existed && flags & libc::O_TRUNC != 0 {
            if let Err(e) = inner.before_change(ino, &file, 0, u64::MAX).and_then(|()| file.set_len(0)) {
                return reply.error(errno(e));
            }
        }
        if !existed {
            inner.dirty.insert(ino, Dirty { synced_len: 0, saved: BTreeMap::new(), created: true });
        }
        let md = match file.metadata() {
            Ok(md) => md,
            Err(e) => return reply.error(errno(e)),
        };
        let fh = inner.next_fh;
        inner.next_fh += 1;
        inner.files.insert(fh, (file, ino));
        reply.created(&TTL, &attr(ino, &md), Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = self.shared.lock();
        let Some((file, _)) = inner.files.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut inner = self.shared.lock();
        let Some((file, _)) = inner.files.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        if let Err(e) = inner.before_change(ino.0, &file, offset, offset + data.len() as u64) {
            return reply.error(errno(e));
        }
        match file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().files.remove(&fh.0);
        reply.ok();
    }

    /// A file's sync makes its data and its creation durable.
    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        inner.dirty.remove(&ino.0);
        inner.syncs += 1;
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let inner = self.shared.lock();
        match inner.path(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut inner = self.shared.lock();
        let rel = match inner.path(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let parent = rel.parent().map(|p| inner.ino_for(p)).unwrap_or(ino.0);
        let mut entries: Vec<(u64, FileType, std::ffi::OsString)> =
            vec![(ino.0, FileType::Directory, ".".into()), (parent, FileType::Directory, "..".into())];
        let listing = match std::fs::read_dir(self.shared.full(&rel)) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        let mut names: Vec<(std::ffi::OsString, FileType)> = Vec::new();
        for entry in listing {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => return reply.error(errno(e)),
            };
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            names.push((entry.file_name(), kind));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            let child = inner.ino_for(&rel.join(&name));
            entries.push((child, kind, name));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// A directory's sync makes the creation of the files in it durable.
    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let Ok(dir) = inner.path(ino) else { return reply.error(Errno::ENOENT) };
        let children: Vec<u64> = inner
            .dirty
            .keys()
            .copied()
            .filter(|i| inner.paths.get(i).and_then(|p| p.parent()) == Some(dir.as_path()))
            .collect();
        for child in children {
            if let Some(d) = inner.dirty.get_mut(&child) {
                d.created = false;
            }
        }
        inner.syncs += 1;
        reply.ok();
    }

    /// No extended attributes and no permission checks of its own: the
    /// kernel stops asking after the first `ENOSYS` (said here so that it
    /// is not logged as missing).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Ok(c) = cstr(&self.shared.backing) else { return reply.error(Errno::EINVAL) };
        // SAFETY: statvfs(2) fills the zeroed struct and reads the path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return reply.error(errno(io::Error::last_os_error()));
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.shared.lock();
        let Some((file, _)) = inner.files.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        // Plain allocation keeps every byte; hole punching and the like
        // change them, so their synced bytes are saved first.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            if let Err(e) = inner.before_change(ino.0, &file, offset, u64::MAX) {
                return reply.error(errno(e));
            }
        } else if let Err(e) = inner.before_change(ino.0, &file, u64::MAX, u64::MAX) {
            return reply.error(errno(e));
        }
        // SAFETY: fallocate(2) on a descriptor this filesystem owns.
        let rc =
            unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, length as libc::off_t) };
        if rc != 0 {
            return reply.error(errno(io::Error::last_os_error()));
        }
        reply.ok();
    }
}

/// A mounted fault filesystem; unmounted when dropped.
pub struct FaultFs {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl FaultFs {
    /// Mounts a pass-through of `backing` (created if missing) at
    /// `mountpoint` (created if missing). Needs `/dev/fuse` and root (or
    /// `fusermount3`).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<FaultFs> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let backing = backing.canonicalize()?;
        let mut inner = Inner { next_ino: 2, next_fh: 1, ..Inner::default() };
        inner.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        inner.inos.insert(PathBuf::new(), INodeNo::ROOT.0);
        let shared = Arc::new(Shared { backing, inner: Mutex::new(inner) });
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("geokv-faultfs".into()), MountOption::RW];
        let session = fuser::spawn_mount(Fs { shared: shared.clone() }, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting the fault filesystem at {} failed: {e} (needs /dev/fuse and root, or fusermount3 from the fuse3 package: scripts/deps)",
                    mountpoint.display()
                ),
            )
        })?;
        Ok(FaultFs { shared, mountpoint: mountpoint.to_path_buf(), session: Some(session) })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.shared.backing
    }

    /// Files with unsynced changes now, and syncs seen since mount.
    pub fn unsynced(&self) -> Unsynced {
        let inner = self.shared.lock();
        Unsynced { files: inner.dirty.len(), syncs_seen: inner.syncs }
    }

    /// The power cut: drops every unsynced change. The program using the
    /// mount must be dead already; this waits (up to `quiet_within`) for
    /// its last open file to be released, which is also when the last of
    /// its requests has been served, so no write lands after the cut.
    pub fn power_cut(&self, quiet_within: Duration) -> io::Result<CutReport> {
        let started = Instant::now();
        loop {
            let mut inner = self.shared.lock();
            if inner.files.is_empty() {
                return self.roll_back(&mut inner);
            }
            if started.elapsed() > quiet_within {
                return Err(io::Error::other(format!(
                    "{} files still open on {} {quiet_within:?} after the power cut was asked for; is the program on it dead?",
                    inner.files.len(),
                    self.mountpoint.display()
                )));
            }
            drop(inner);
            std::thread::sleep(POLL);
        }
    }

    fn roll_back(&self, inner: &mut Inner) -> io::Result<CutReport> {
        let mut report = CutReport::default();
        let dirty: Vec<(u64, Dirty)> = inner.dirty.drain().collect();
        for (ino, d) in dirty {
            let Some(rel) = inner.paths.get(&ino).cloned() else { continue };
            let full = self.shared.full(&rel);
            if d.created {
                if let Ok(md) = std::fs::metadata(&full) {
                    report.bytes_dropped += md.len();
                }
                match std::fs::remove_file(&full) {
                    Ok(()) => report.files_removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                inner.forget_path(&rel);
                continue;
            }
            let file = match OpenOptions::new().write(true).open(&full) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            report.bytes_dropped += len.saturating_sub(d.synced_len);
            file.set_len(d.synced_len)?;
            for (page, bytes) in &d.saved {
                file.write_all_at(bytes, page * PAGE)?;
                report.bytes_dropped += bytes.len() as u64;
            }
            report.files_rolled_back += 1;
        }
        tracing::info!(mount = %self.mountpoint.display(), ?report, "power cut: unsynced changes dropped");
        Ok(report)
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // Dropping the session unmounts (lazily, so files still open
        // elsewhere do not keep it); its thread ends with the connection.
        drop(self.session.take());
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn mounted() -> (tempfile::TempDir, FaultFs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::mount(&dir.path().join("backing"), &dir.path().join("mnt"))
            .expect("FUSE mount (needs /dev/fuse and root, or fusermount3)");
        (dir, fs)
    }

    fn read(p: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn unsynced_writes_are_read_back_then_dropped_by_a_power_cut() {
        let (_dir, fs) = mounted();
        let m = fs.mountpoint().to_path_buf();
        let synced = m.join("synced");
        let mut f = File::create(&synced).unwrap();
        f.write_all(&vec![b'a'; 10_000]).unwrap();
        f.sync_all().unwrap();
        // Overwrite the middle and append, both unsynced.
        f.write_all_at(&[b'b'; 100], 5_000).unwrap();
        f.write_all_at(b"tail", 10_000).unwrap();
        drop(f);
        let unsynced = m.join("unsynced");
        File::create(&unsynced).unwrap().write_all(b"never synced").unwrap();
        let later = read(&synced);
        assert_eq!(later.len(), 10_004, "reads see unsynced writes");
        assert_eq!(&later[5_000..5_100], &[b'b'; 100][..]);
        assert_eq!(fs.unsynced().files, 2);

        let report = fs.power_cut(Duration::from_secs(5)).unwrap();
        assert_eq!(report.files_rolled_back, 1);
        assert_eq!(report.files_removed, 1);
        assert_eq!(read(&synced), vec![b'a'; 10_000], "back to the last sync");
        assert!(!unsynced.exists(), "an unsynced creation is gone");
        assert_eq!(fs.unsynced().files, 0);
    }

    #[test]
    fn synced_data_and_directory_synced_creations_survive() {
        let (_dir, fs) = mounted();
        let m = fs.mountpoint().to_path_buf();
        std::fs::create_dir(m.join("d")).unwrap();
        let kept = m.join("d/kept");
        let mut f = File::create(&kept).unwrap();
        f.write_all(b"durable").unwrap();
        f.sync_data().unwrap();
        f.write_all(b" and not").unwrap();
        drop(f);
        // Created, not written through a sync, but its directory synced:
        // the name survives, its data does not.
        let named = m.join("d/named");
        File::create(&named).unwrap().write_all(b"data").unwrap();
        File::open(m.join("d")).unwrap().sync_all().unwrap();
        // A rename is durable at once (not modelled as lost).
        std::fs::rename(&kept, m.join("d/renamed")).unwrap();

        fs.power_cut(Duration::from_secs(5)).unwrap();
        assert_eq!(read(&m.join("d/renamed")), b"durable");
        assert!(named.exists());
        assert_eq!(read(&named), b"");
        let mut names: Vec<String> = std::fs::read_dir(m.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["named", "renamed"]);
    }

    #[test]
    fn truncation_of_synced_data_is_undone() {
        let (_dir, fs) = mounted();
        let p = fs.mountpoint().join("t");
        let mut f = File::create(&p).unwrap();
        f.write_all(&[7u8; 9_000]).unwrap();
        f.sync_all().unwrap();
        f.set_len(10).unwrap();
        f.write_all_at(&[1u8; 20], 5).unwrap();
        drop(f);
        assert_eq!(read(&p).len(), 25);
        fs.power_cut(Duration::from_secs(5)).unwrap();
        assert_eq!(read(&p), vec![7u8; 9_000]);
    }

    #[test]
    fn a_power_cut_waits_for_open_files() {
        let (_dir, fs) = mounted();
        let f = File::create(fs.mountpoint().join("open")).unwrap();
        let err = fs.power_cut(Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("still open"), "{err}");
        drop(f);
        assert_eq!(fs.power_cut(Duration::from_secs(5)).unwrap().files_removed, 1);
    }
}
