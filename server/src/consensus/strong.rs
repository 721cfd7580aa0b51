//! The state machine of a STRONG group: linearizable registers.
//!
//! Rows of STRONG tables live in their group's replicated state machine,
//! keyed `r/<table>\0<key>`, so every committed command is applied in the
//! same order by every replica region. A value's version is the Raft log
//! index of the command that wrote it.

use serde::{Deserialize, Serialize};

use super::store::{Machine, MachineView};
use super::{Command, Reply};

/// A stored STRONG value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrongValue {
    pub value: Vec<u8>,
    /// Log index of the write that produced it.
    pub version: u64,
}

/// A linearizable write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrongCommand {
    Put {
        table: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: String,
        key: Vec<u8>,
    },
    /// Writes `value` (None deletes) only if the current value is
    /// `expected` (None = absent).
    Cas {
        table: String,
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    },
}

/// The outcome of a STRONG write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrongReply {
    Written {
        version: u64,
    },
    /// A CAS whose expectation did not hold; nothing was written.
    CasFailed {
        current: Option<StrongValue>,
    },
    /// The stored value could not be read (corruption); nothing was written.
    Failed {
        why: String,
    },
}

/// State-machine key of a row.
pub fn row_key(table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// Decodes a stored value.
pub fn decode_value(bytes: &[u8]) -> Result<StrongValue, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("stored STRONG value does not decode: {e}"))
}

/// Applies STRONG commands.
pub struct StrongMachine;

impl StrongMachine {
    fn write(
        view: &mut MachineView<'_>,
        k: Vec<u8>,
        value: Option<Vec<u8>>,
        index: u64,
    ) -> Result<StrongReply, String> {
        match value {
            Some(value) => {
                let v =
                    serde_json::to_vec(&StrongValue { value, version: index }).map_err(|e| e.to_string())?;
                view.put(&k, v);
            }
            None => view.delete(&k),
        }
        Ok(StrongReply::Written { version: index })
    }

    fn run(index: u64, cmd: &StrongCommand, view: &mut MachineView<'_>) -> Result<StrongReply, String> {
        match cmd {
            StrongCommand::Put { table, key, value } => {
                Self::write(view, row_key(table, key), Some(value.clone()), index)
            }
            StrongCommand::Delete { table, key } => Self::write(view, row_key(table, key), None, index),
            StrongCommand::Cas { table, key, expected, value } => {
                let k = row_key(table, key);
                let current = view.get(&k)?.map(|b| decode_value(&b)).transpose()?;
                if current.as_ref().map(|c| &c.value) != expected.as_ref() {
                    return Ok(StrongReply::CasFailed { current });
                }
                Self::write(view, k, value.clone(), index)
            }
        }
    }
}

impl Machine for StrongMachine {
    fn apply(&self, index: u64, command: &Command, view: &mut MachineView<'_>) -> Reply {
        match command {
            Command::Strong { request_id, op } => {
                let idem_key = request_id.as_ref().map(|id| {
                    let mut k = b"i/".to_vec();
                    k.extend_from_slice(id.as_bytes());
                    k
                });
                if let Some(k) = &idem_key {
                    if let Ok(Some(stored)) = view.get(k) {
                        if let Ok(reply) = serde_json::from_slice::<StrongReply>(&stored) {
                            return Reply::Strong(reply);
                        }
                    }
                }
                let reply = Self::run(index, op, view).unwrap_or_else(|why| StrongReply::Failed { why });
                if let (Some(k), Ok(bytes)) = (idem_key, serde_json::to_vec(&reply)) {
                    view.put(&k, bytes);
                }
                Reply::Strong(reply)
            }
            other => Reply::Rejected { why: format!("a STRONG group cannot apply {other:?}") },
        }
    }
}
