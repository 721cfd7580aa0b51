//! A node's part of subject erasure and export (docs/architecture.md
//! section 13): finding a subject's rows in its store, fencing them, and
//! the receipt.

use std::time::Instant;

use tokio::sync::oneshot;

use super::commit::{CommitJob, Work};
use super::row::{data_key, display_key, split_data_key, Row};
use super::Node;
use crate::causality::{context_stamp, HlcTimestamp};
use crate::error::KvError;
use crate::lifecycle::{fence_row, LedgerEntry, Lifecycle};
use crate::storage::{prefix_end, Cf, Engine};

/// Rows read from the store per page while looking for a subject's rows.
const PAGE_ROWS: usize = 512;

/// One page (at most [`PAGE_ROWS`]) of the rows in `data` from `start` up
/// to `end`, and where the next page starts (None: the range is done).
fn subject_page(
    engine: &dyn Engine,
    start: &[u8],
    end: Option<&[u8]>,
) -> Result<(Vec<SubjectRow>, Option<Vec<u8>>), KvError> {
    let page = engine.scan(Cf::Data, start, end, PAGE_ROWS).map_err(|e| KvError::Storage(e.to_string()))?;
    let after = match page.last() {
        Some((k, _)) if page.len() == PAGE_ROWS => {
            let mut next = k.clone();
            next.push(0);
            Some(next)
        }
        _ => None,
    };
    let mut rows = Vec::with_capacity(page.len());
    for (k, v) in &page {
        let Some((t, key)) = split_data_key(k) else { continue };
        let row = Row::open(v, || display_key(t, key))?;
        rows.push(SubjectRow { table: t.to_string(), key: key.to_vec(), row });
    }
    Ok((rows, after))
}

/// A range of `data` keys: its start, and its end (None: to the last key).
type KeyRange = (Vec<u8>, Option<Vec<u8>>);

/// One row of a subject, as this node stores it.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    pub table: String,
    pub key: Vec<u8>,
    pub row: Row,
}

/// What one node's erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub subject_hash: String,
    pub fence_hlc: u64,
    /// Rows of the subject found, and of them those that held values.
    pub rows: u64,
    /// Values and value bytes stripped.
    pub values: u64,
    pub bytes: u64,
    /// Counter rows of the subject, which erasure cannot empty (reported).
    pub counters_kept: u64,
    pub erased_at_ms: u64,
    pub took_ms: u64,
}

impl Node {
    /// Subjects and erasure fences of this node.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Refuses a write whose causal context was handed out before the
    /// erasure fence of its row's subject: writing back what was read then
    /// could put erased data back (`SUBJECT_ERASED`). A blind write (no
    /// context) is new data and passes.
    pub fn check_context(
        &self,
        row: &Option<geokv_proto::v1::RowRef>,
        context: &[u8],
    ) -> Result<(), KvError> {
        let Some(row) = row else { return Ok(()) };
        let Some(fence) = self.lifecycle.fence_of(&row.table, &row.key) else { return Ok(()) };
        let (clock, stamp) =
            context_stamp(context).map_err(|e| KvError::MalformedContext { why: e.to_string() })?;
        if clock.is_empty() || stamp > fence {
            return Ok(());
        }
        Err(KvError::SubjectErased { key: display_key(&row.table, &row.key), fence_hlc: fence })
    }

    /// Every row of `subject` this node stores, in every table that
    /// declares subjects, deleted ones included; at most `max` of them.
    pub fn subject_rows(&self, subject: &[u8], max: usize) -> Result<Vec<SubjectRow>, KvError> {
        let mut out = Vec::new();
        for (start, end) in self.subject_ranges(subject)? {
            let mut next = Some(start);
            while let Some(start) = next.take() {
                let (page, after) = subject_page(self.engine.as_ref(), &start, end.as_deref())?;
                if out.len() + page.len() > max {
                    return Err(KvError::InvalidField {
                        field: "subject",
                        why: format!(
                            "the subject has more than {max} rows on node {} (lifecycle.export_rows_max)",
                            self.cfg.actor()
                        ),
                    });
                }
                out.extend(page);
                next = after;
            }
        }
        Ok(out)
    }

    /// The `data` key ranges (start, end) holding `subject`'s rows: one per
    /// table that declares subjects, in table order.
    fn subject_ranges(&self, subject: &[u8]) -> Result<Vec<KeyRange>, KvError> {
        crate::lifecycle::check_subject(subject)?;
        let mut tables: Vec<(&str, &[u8])> = self.lifecycle.subject_tables().collect();
        tables.sort_unstable();
        Ok(tables
            .into_iter()
            .map(|(table, sep)| {
                let base = data_key(table, &Lifecycle::key_prefix(subject, sep));
                let end = prefix_end(&base);
                (base, end)
            })
            .collect())
    }

    /// Erases `subject` on this node at fence `fence_hlc` (0: this node's
    /// clock now): records the fence in the ledger (synced) so every later
    /// arrival is fenced, moves the clock past it, strips every value of
    /// the subject's rows written through it, and compacts the store so
    /// the values leave the files (data, replication log, write-ahead log).
    pub async fn erase_subject(&self, subject: &[u8], fence_hlc: u64) -> Result<Receipt, KvError> {
        let started = Instant::now();
        let hash = self.lifecycle.hash(subject)?;
        let fence = if fence_hlc == 0 { self.hlc.now().0 } else { fence_hlc };
        // Writes this node accepts from now on are stamped past the fence.
        self.hlc
            .observe(HlcTimestamp(fence))
            .map_err(|e| KvError::ClockOffset { ahead_ms: e.ahead_ms, max_ms: e.max_offset_ms })?;
        let erased_at_ms = self.hlc.wall_ms();
        let mut entry = LedgerEntry {
            subject_hash: hex::encode(hash),
            fence_hlc: fence,
            erased_at_ms,
            rows: 0,
            bytes: 0,
        };
        self.lifecycle.record(self.engine.as_ref(), hash, &entry)?;
        let mut receipt = Receipt {
            subject_hash: entry.subject_hash.clone(),
            fence_hlc: fence,
            rows: 0,
            values: 0,
            bytes: 0,
            counters_kept: 0,
            erased_at_ms,
            took_ms: 0,
        };
        // A page at a time, read off the async workers: memory stays
        // bounded by a page however many rows the subject has.
        for (start, end) in self.subject_ranges(subject)? {
            let mut next = Some(start);
            while let Some(start) = next.take() {
                let engine = self.engine.clone();
                let end = end.clone();
                let (page, after) = tokio::task::spawn_blocking(move || {
                    subject_page(engine.as_ref(), &start, end.as_deref())
                })
                .await
                .map_err(|e| KvError::Storage(e.to_string()))??;
                receipt.rows += page.len() as u64;
                for r in &page {
                    let mut copy = r.row.clone();
                    let fenced = fence_row(&mut copy, fence);
                    receipt.values += fenced.values as u64;
                    receipt.bytes += fenced.bytes as u64;
                    if matches!(r.row.value, super::RowValue::Counter(_)) {
                        receipt.counters_kept += 1;
                    }
                }
                if !page.is_empty() {
                    let keys = page.into_iter().map(|r| (r.table, r.key)).collect();
                    self.submit(Work::Fence { rows: keys, fence }).await?;
                }
                next = after;
            }
        }
        entry.rows = receipt.rows;
        entry.bytes = receipt.bytes;
        self.lifecycle.record(self.engine.as_ref(), hash, &entry)?;
        // Into every backup destination too, so no restore brings the
        // subject back.
        crate::lifecycle::publish(&self.cfg, &entry)?;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.compact())
            .await
            .map_err(|e| KvError::Storage(e.to_string()))?
            .map_err(|e| KvError::Storage(e.to_string()))?;
        receipt.took_ms = started.elapsed().as_millis() as u64;
        metrics::counter!("geokv_erasures_total").increment(1);
        metrics::counter!("geokv_erased_values_total").increment(receipt.values);
        tracing::info!(subject_hash = %receipt.subject_hash, fence, rows = receipt.rows, values = receipt.values,
            bytes = receipt.bytes, took_ms = receipt.took_ms, "subject erased");
        Ok(receipt)
    }

    /// The rows of `subject` a reader sees on this node (live, not
    /// expired), at most `lifecycle.export_rows_max`.
    pub fn export_subject(&self, subject: &[u8]) -> Result<Vec<SubjectRow>, KvError> {
        let now_ms = super::expiry::read_ms(&self.hlc);
        let rows = self.subject_rows(subject, self.cfg.lifecycle.export_rows_max)?;
        Ok(rows.into_iter().filter(|r| !super::row_is_invisible(&r.row, now_ms)).collect())
    }

    /// Runs one job through the committer and waits for it.
    async fn submit(&self, work: Work) -> Result<(), KvError> {
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CommitJob { work, reply }).await.map_err(|_| KvError::ShuttingDown)?;
        rx.await.map_err(|_| KvError::ShuttingDown)??;
        Ok(())
    }
}
