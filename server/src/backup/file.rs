//! Backup files: one zone's rows of one node, split into numbered pieces of
//! bounded size (docs/decisions/029-zone-strict-backups.md).
//!
//! A piece is
//! - a header: `GKVBAK1\n`, the format (u32), the zone (u32 length, bytes);
//! - records: tag 1, the table (u32 length, bytes), the key (u32 length,
//!   bytes), the stored row (u32 length, its sealed, CRC-checked envelope);
//! - a trailer: tag 0, the row count (u64), `GKVEND1\n`.
//!
//! Integers are big-endian. The manifest holds each piece's size, row
//! count and SHA-256, so a truncated, extended or altered piece is found
//! before anything of it is restored.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::KvError;
use crate::kv::row::{display_key, Row};

const MAGIC: &[u8; 8] = b"GKVBAK1\n";
const END_MAGIC: &[u8; 8] = b"GKVEND1\n";
const TAG_ROW: u8 = 1;
const TAG_END: u8 = 0;
const TRAILER_BYTES: u64 = 1 + 8 + 8;
/// Longest table name and key a piece may hold (a longer length field is
/// corruption, not a reason to allocate).
const TABLE_BYTES_MAX: u32 = 1024;
const KEY_BYTES_MAX: u32 = 1 << 20;

/// One piece of one zone's rows, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneFile {
    pub zone: String,
    /// Relative to the zone's destination folder.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the whole piece.
    pub sha256: String,
}

/// Refuses a path that could leave the zone's folder.
pub fn check_relative(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("must be a relative path of plain names".into());
    }
    Ok(())
}

struct Open {
    out: BufWriter<File>,
    path: PathBuf,
    relative: String,
    hasher: Sha256,
    bytes: u64,
    rows: u64,
}

impl Open {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn put_field(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| std::io::Error::other(format!("a field of {} bytes", bytes.len())))?;
        self.put(&len.to_be_bytes())?;
        self.put(bytes)
    }
}

/// Writes one zone's rows into numbered pieces under `dir/folder`.
pub struct PieceWriter {
    zone: String,
    dir: PathBuf,
    folder: PathBuf,
    piece_bytes_max: u64,
    current: Option<Open>,
    next_piece: u32,
    done: Vec<ZoneFile>,
}

impl PieceWriter {
    pub fn new(zone: &str, dir: &Path, folder: &Path, piece_bytes_max: u64) -> Self {
        Self {
            zone: zone.to_string(),
            dir: dir.to_path_buf(),
            folder: folder.to_path_buf(),
            piece_bytes_max,
            current: None,
            next_piece: 1,
            done: Vec::new(),
        }
    }

    /// The zone's destination folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one stored row (its sealed bytes as stored).
    pub fn append(&mut self, table: &str, key: &[u8], sealed: &[u8]) -> std::io::Result<()> {
        let size = 1 + 12 + (table.len() + key.len() + sealed.len()) as u64;
        if let Some(open) = &self.current {
            if open.rows > 0 && open.bytes + size + TRAILER_BYTES > self.piece_bytes_max {
                self.close()?;
            }
        }
        if self.current.is_none() {
            self.open()?;
        }
        let open = self.current.as_mut().expect("a piece was just opened");
        open.put(&[TAG_ROW])?;
        open.put_field(table.as_bytes())?;
        open.put_field(key)?;
        open.put_field(sealed)?;
        open.rows += 1;
        Ok(())
    }

    fn open(&mut self) -> std::io::Result<()> {
        let relative = self.folder.join(format!("piece-{:05}.gkb", self.next_piece));
        self.next_piece += 1;
        let path = self.dir.join(&relative);
        let file = File::options().write(true).create_new(true).open(&path)?;
        let mut open = Open {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            relative: relative.to_string_lossy().into_owned(),
            hasher: Sha256::new(),
            bytes: 0,
            rows: 0,
        };
        open.put(MAGIC)?;
        open.put(&super::FORMAT.to_be_bytes())?;
        open.put_field(self.zone.as_bytes())?;
        self.current = Some(open);
        Ok(())
    }

    fn close(&mut self) -> std::io::Result<()> {
        let Some(mut open) = self.current.take() else { return Ok(()) };
        open.put(&[TAG_END])?;
        let rows = open.rows;
        open.put(&rows.to_be_bytes())?;
        open.put(END_MAGIC)?;
        let file = open.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        self.done.push(ZoneFile {
            zone: self.zone.clone(),
            path: open.relative,
            rows,
            bytes: open.bytes,
            sha256: hex::encode(open.hasher.finalize()),
        });
        let _ = open.path;
        Ok(())
    }

    /// Closes the last piece, syncs the folder and lists every piece.
    pub fn finish(mut self) -> std::io::Result<Vec<ZoneFile>> {
        self.close()?;
        File::open(self.dir.join(&self.folder))?.sync_all()?;
        Ok(self.done)
    }
}

/// Reads through a hasher, counting bytes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// What [`check`] calls per row: its table, key and sealed bytes.
pub type RowVisit<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<(), KvError> + 'a;

/// Reads the piece at `path` listed as `expected`, checking its size,
/// framing, zone, every row (envelope checksum, and its zone is the
/// piece's), the row count and the SHA-256; `visit` sees each row's table,
/// key and sealed bytes as it is read. Returns the rows read.
pub fn check(path: &Path, expected: &ZoneFile, visit: &mut RowVisit<'_>) -> Result<u64, KvError> {
    let corrupt = |why: String| KvError::BackupCorrupt { file: path.display().to_string(), why };
    let file = File::open(path).map_err(|e| corrupt(format!("cannot be read: {e}")))?;
    let len = file.metadata().map_err(|e| corrupt(format!("cannot be read: {e}")))?.len();
    if len != expected.bytes {
        return Err(corrupt(format!("it is {len} bytes, the manifest says {}", expected.bytes)));
    }
    let mut r = Hashing { inner: BufReader::with_capacity(1 << 20, file), hasher: Sha256::new(), read: 0 };
    let io = |e: std::io::Error| corrupt(format!("truncated or unreadable: {e}"));
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io)?;
    if &magic != MAGIC {
        return Err(corrupt("not a geokv backup file (bad magic)".into()));
    }
    let format = read_u32(&mut r).map_err(io)?;
    if format != super::FORMAT {
        return Err(corrupt(format!("format {format}, this build reads {}", super::FORMAT)));
    }
    let zone = read_field(&mut r, 256, len).map_err(|e| corrupt(e.to_string()))?;
    if zone != expected.zone.as_bytes() {
        return Err(corrupt(format!(
            "it holds zone `{}`, the manifest lists it for zone `{}`",
            String::from_utf8_lossy(&zone),
            expected.zone
        )));
    }
    let mut rows = 0u64;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(io)?;
        match tag[0] {
            TAG_ROW => {
                let table = read_field(&mut r, TABLE_BYTES_MAX, len).map_err(|e| corrupt(e.to_string()))?;
                let key = read_field(&mut r, KEY_BYTES_MAX, len).map_err(|e| corrupt(e.to_string()))?;
                let sealed = read_field(&mut r, u32::MAX, len).map_err(|e| corrupt(e.to_string()))?;
                let table =
                    std::str::from_utf8(&table).map_err(|_| corrupt("a table name is not UTF-8".into()))?;
                let row = Row::open(&sealed, || display_key(table, &key))
                    .map_err(|e| corrupt(format!("row {}: {e}", display_key(table, &key))))?;
                if row.zone != expected.zone {
                    return Err(corrupt(format!(
                        "row {} is of zone `{}` in a file of zone `{}`",
                        display_key(table, &key),
                        row.zone,
                        expected.zone
                    )));
                }
                visit(table, &key, &sealed)?;
                rows += 1;
            }
            TAG_END => {
                let count = u64::from_be_bytes({
                    let mut b = [0u8; 8];
                    r.read_exact(&mut b).map_err(io)?;
                    b
                });
                let mut end = [0u8; 8];
                r.read_exact(&mut end).map_err(io)?;
                if &end != END_MAGIC {
                    return Err(corrupt("bad trailer".into()));
                }
                if count != rows {
                    return Err(corrupt(format!("its trailer says {count} rows, it holds {rows}")));
                }
                let mut rest = [0u8; 1];
                if r.read(&mut rest).map_err(io)? != 0 {
                    return Err(corrupt("bytes after the trailer".into()));
                }
                break;
            }
            other => return Err(corrupt(format!("unknown record tag {other} at byte {}", r.read - 1))),
        }
    }
    if rows != expected.rows {
        return Err(corrupt(format!("it holds {rows} rows, the manifest says {}", expected.rows)));
    }
    let sha = hex::encode(r.hasher.finalize());
    if sha != expected.sha256 {
        return Err(corrupt(format!("its SHA-256 is {sha}, the manifest says {}", expected.sha256)));
    }
    Ok(rows)
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A length-prefixed field of at most `max` bytes, and never longer than
/// the file (`file_len`), so a corrupt length allocates nothing large.
fn read_field(r: &mut impl Read, max: u32, file_len: u64) -> std::io::Result<Vec<u8>> {
    let n = read_u32(r)?;
    if n > max || u64::from(n) > file_len {
        return Err(std::io::Error::other(format!("a field claims {n} bytes (at most {max})")));
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}
