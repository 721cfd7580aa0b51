//! The faults of one link: what each direction does to bytes, and the
//! link-wide states (partition, stall, refuse).
//!
//! [`LinkFaults`] is the whole setting, replaced atomically; [`FaultsPatch`]
//! changes only the fields it names (what `PUT /links/{name}` and the
//! `--link` options carry). Both are plain data with a `validate()` that
//! names the offending field, so an impossible setting is rejected before it
//! reaches a live link.

use serde::{Deserialize, Serialize};

/// Largest accepted one-way latency, in milliseconds. Larger values are almost
/// certainly a unit mistake (seconds typed as milliseconds times 1000).
pub const LATENCY_MS_MAX: u64 = 60_000;

/// Largest accepted jitter, in milliseconds.
pub const JITTER_MS_MAX: u64 = 60_000;

/// Smallest non-zero bandwidth cap, in bytes per second. Below this a single
/// read chunk would take minutes to pace out.
pub const BANDWIDTH_BYTES_PER_S_MIN: u64 = 1_024;

/// Which way bytes travel through a link. The *client* is whoever connected to
/// the proxy's listener; the *upstream* is the address the proxy dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Bytes the client sent, on their way to the upstream.
    ToUpstream,
    /// Bytes the upstream sent, on their way back to the client.
    ToClient,
}

impl Direction {
    /// Both directions, client to upstream first.
    pub const BOTH: [Direction; 2] = [Direction::ToUpstream, Direction::ToClient];

    /// The name used in JSON and in `--link` options.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToUpstream => "to_upstream",
            Direction::ToClient => "to_client",
        }
    }
}

/// What one direction of a link does to every chunk of bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionFaults {
    /// One-way delay added to every chunk, in milliseconds. Chunks are
    /// scheduled for delivery at arrival + delay and pipelined, so a delay
    /// adds latency without dividing throughput.
    pub latency_ms: u64,
    /// Uniform jitter around `latency_ms`, in milliseconds (+/- this much).
    /// Order is preserved: a chunk is never delivered before the one read
    /// ahead of it, so jitter stretches gaps but never reorders bytes.
    pub jitter_ms: u64,
    /// Bandwidth cap, in bytes per second, shared by every connection of the
    /// link in this direction; 0 means unlimited.
    pub bandwidth_bytes_per_s: u64,
    /// One-way black hole: bytes read in this direction are dropped (the
    /// other direction still flows). A request gets through and its reply
    /// is lost, as when one side's egress fails. Like a partition, a loss
    /// dooms that direction of the connection, and the connection is reset
    /// when the link heals.
    pub black_hole: bool,
}

impl DirectionFaults {
    /// A direction that only adds `latency_ms` of one-way delay.
    pub fn latency(latency_ms: u64) -> Self {
        DirectionFaults { latency_ms, ..Default::default() }
    }

    fn validate(&self, direction: Direction) -> Result<(), FaultsError> {
        if self.latency_ms > LATENCY_MS_MAX {
            return Err(FaultsError::new(
                direction,
                "latency_ms",
                self.latency_ms,
                format!("must be at most {LATENCY_MS_MAX}"),
            ));
        }
        if self.jitter_ms > JITTER_MS_MAX {
            return Err(FaultsError::new(
                direction,
                "jitter_ms",
                self.jitter_ms,
                format!("must be at most {JITTER_MS_MAX}"),
            ));
        }
        if self.bandwidth_bytes_per_s != 0 && self.bandwidth_bytes_per_s < BANDWIDTH_BYTES_PER_S_MIN {
            return Err(FaultsError::new(
                direction,
                "bandwidth_bytes_per_s",
                self.bandwidth_bytes_per_s,
                format!("must be 0 (unlimited) or at least {BANDWIDTH_BYTES_PER_S_MIN}"),
            ));
        }
        Ok(())
    }
}

/// The complete fault setting of a link. The default is a clean link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkFaults {
    /// What happens to bytes from the client to the upstream.
    pub to_upstream: DirectionFaults,
    /// What happens to bytes from the upstream back to the client.
    pub to_client: DirectionFaults,
    /// Black-hole: bytes read in either direction are dropped silently and
    /// new connections are accepted but never dialled upstream. A connection
    /// that lost bytes is reset when the partition heals (see the crate docs:
    /// a TCP stream never continues after a gap).
    pub partition: bool,
    /// Hold bytes in both directions without dropping them; they are
    /// delivered, in order, once the stall is lifted. Back-pressure applies
    /// once the per-connection queue bound is reached.
    pub stall: bool,
    /// Reset (RST) every new connection right after accepting it, as a host
    /// whose process is down would.
    pub refuse: bool,
}

impl LinkFaults {
    /// A link with the same one-way latency in both directions.
    pub fn symmetric_latency(latency_ms: u64) -> Self {
        LinkFaults {
            to_upstream: DirectionFaults::latency(latency_ms),
            to_client: DirectionFaults::latency(latency_ms),
            ..Default::default()
        }
    }

    /// The settings of one direction.
    pub fn direction(&self, direction: Direction) -> &DirectionFaults {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }

    fn direction_mut(&mut self, direction: Direction) -> &mut DirectionFaults {
        match direction {
            Direction::ToUpstream => &mut self.to_upstream,
            Direction::ToClient => &mut self.to_client,
        }
    }

    /// True when bytes read in `direction` are dropped: the link is
    /// partitioned or that direction is black-holed.
    pub fn dropping(&self, direction: Direction) -> bool {
        self.partition || self.direction(direction).black_hole
    }

    /// True when any bytes are being dropped (see [`LinkFaults::dropping`]).
    pub fn dropping_any(&self) -> bool {
        Direction::BOTH.iter().any(|d| self.dropping(*d))
    }

    /// True when bytes may be delivered right now (neither partitioned nor
    /// stalled).
    pub fn flowing(&self) -> bool {
        !self.partition && !self.stall
    }

    /// The link after `heal`: partition, one-way black holes, stall, refuse
    /// and the bandwidth caps cleared; latency and jitter (the link's
    /// distance) kept.
    pub fn healed(&self) -> LinkFaults {
        let keep = |d: &DirectionFaults| DirectionFaults {
            latency_ms: d.latency_ms,
            jitter_ms: d.jitter_ms,
            bandwidth_bytes_per_s: 0,
            black_hole: false,
        };
        LinkFaults {
            to_upstream: keep(&self.to_upstream),
            to_client: keep(&self.to_client),
            partition: false,
            stall: false,
            refuse: false,
        }
    }

    /// Rejects settings a live link cannot apply, naming the field.
    pub fn validate(&self) -> Result<(), FaultsError> {
        for direction in Direction::BOTH {
            self.direction(direction).validate(direction)?;
        }
        Ok(())
    }
}

/// A change to one direction: fields left out keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionPatch {
    /// New one-way delay, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// New jitter, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// New bandwidth cap, in bytes per second (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Set or clear this direction's one-way black hole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub black_hole: Option<bool>,
}

impl DirectionPatch {
    fn is_empty(&self) -> bool {
        self == &DirectionPatch::default()
    }

    fn apply(&self, to: &mut DirectionFaults) {
        if let Some(v) = self.latency_ms {
            to.latency_ms = v;
        }
        if let Some(v) = self.jitter_ms {
            to.jitter_ms = v;
        }
        if let Some(v) = self.bandwidth_bytes_per_s {
            to.bandwidth_bytes_per_s = v;
        }
        if let Some(v) = self.black_hole {
            to.black_hole = v;
        }
    }
}

/// A change to a link's faults: only the fields given change. The top-level
/// `latency_ms`, `jitter_ms` and `bandwidth_bytes_per_s` set both directions;
/// `to_upstream` / `to_client` then override one direction.
///
/// ```
/// # use geokv_proxy::{FaultsPatch, LinkFaults};
/// let patch: FaultsPatch = serde_json::from_str(r#"{"latency_ms": 80, "partition": true}"#).unwrap();
/// let faults = patch.apply(&LinkFaults::default()).unwrap();
/// assert_eq!(faults.to_client.latency_ms, 80);
/// assert!(faults.partition);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsPatch {
    /// One-way delay for both directions, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Jitter for both directions, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// Bandwidth cap for both directions, in bytes per second (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Overrides for the client-to-upstream direction.
    #[serde(skip_serializing_if = "DirectionPatch::is_empty")]
    pub to_upstream: DirectionPatch,
    /// Overrides for the upstream-to-client direction.
    #[serde(skip_serializing_if = "DirectionPatch::is_empty")]
    pub to_client: DirectionPatch,
    /// Set or clear the black-hole partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<bool>,
    /// Set or clear the stall.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall: Option<bool>,
    /// Set or clear refusing (resetting) new connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refuse: Option<bool>,
}

impl FaultsPatch {
    /// The faults after this patch, validated.
    pub fn apply(&self, base: &LinkFaults) -> Result<LinkFaults, FaultsError> {
        let mut out = base.clone();
        let both = DirectionPatch {
            latency_ms: self.latency_ms,
            jitter_ms: self.jitter_ms,
            bandwidth_bytes_per_s: self.bandwidth_bytes_per_s,
            black_hole: None,
        };
        for direction in Direction::BOTH {
            both.apply(out.direction_mut(direction));
        }
        self.to_upstream.apply(&mut out.to_upstream);
        self.to_client.apply(&mut out.to_client);
        if let Some(v) = self.partition {
            out.partition = v;
        }
        if let Some(v) = self.stall {
            out.stall = v;
        }
        if let Some(v) = self.refuse {
            out.refuse = v;
        }
        out.validate()?;
        Ok(out)
    }

    /// Sets one option given as `key=value`, the syntax of `--link` options
    /// and `geokv-proxy ctl set`. Keys are the JSON field names; a direction
    /// is selected with a `to_upstream.` or `to_client.` prefix. Booleans
    /// accept `true`/`false`/`1`/`0`/`on`/`off`.
    pub fn set_option(&mut self, option: &str) -> Result<(), SpecError> {
        let (key, value) =
            option.split_once('=').ok_or_else(|| SpecError::new(option, "expected key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| SpecError::new(option, format!("{key} takes a whole number, got {value:?}")))
        };
        let boolean = || match value {
            "true" | "1" | "on" | "yes" => Ok(true),
            "false" | "0" | "off" | "no" => Ok(false),
            _ => Err(SpecError::new(option, format!("{key} takes true or false, got {value:?}"))),
        };
        let (scope, field) = match key.split_once('.') {
            Some((scope, field)) => (Some(scope), field),
            None => (None, key),
        };
        let direction = match scope {
            None => None,
            Some("to_upstream") => Some(&mut self.to_upstream),
            Some("to_client") => Some(&mut self.to_client),
            Some(other) => {
                return Err(SpecError::new(
                    option,
                    format!("unknown direction {other:?} (use to_upstream or to_client)"),
                ))
            }
        };
        match (direction, field) {
            (Some(d), "latency_ms") => d.latency_ms = Some(number()?),
            (Some(d), "jitter_ms") => d.jitter_ms = Some(number()?),
            (Some(d), "bandwidth_bytes_per_s") => d.bandwidth_bytes_per_s = Some(number()?),
            (Some(d), "black_hole") => d.black_hole = Some(boolean()?),
            (None, "latency_ms") => self.latency_ms = Some(number()?),
            (None, "jitter_ms") => self.jitter_ms = Some(number()?),
            (None, "bandwidth_bytes_per_s") => self.bandwidth_bytes_per_s = Some(number()?),
            (None, "partition") => self.partition = Some(boolean()?),
            (None, "stall") => self.stall = Some(boolean()?),
            (None, "refuse") => self.refuse = Some(boolean()?),
            _ => {
                return Err(SpecError::new(
                    option,
                    format!(
                        "unknown option {key:?} (known: latency_ms, jitter_ms, bandwidth_bytes_per_s, \
                         each optionally prefixed by to_upstream. or to_client.; to_upstream.black_hole, \
                         to_client.black_hole; partition, stall, refuse)"
                    ),
                ))
            }
        }
        Ok(())
    }
}

/// A fault setting that cannot be applied; names the field and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{direction}.{field} = {value}: {why}")]
pub struct FaultsError {
    /// `to_upstream` or `to_client`.
    pub direction: &'static str,
    /// The JSON name of the field.
    pub field: &'static str,
    /// The rejected value.
    pub value: u64,
    /// What would be accepted.
    pub why: String,
}

impl FaultsError {
    fn new(direction: Direction, field: &'static str, value: u64, why: String) -> Self {
        FaultsError { direction: direction.as_str(), field, value, why }
    }
}

/// A `--link` spec or `key=value` option that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad spec {spec:?}: {why}")]
pub struct SpecError {
    /// The text that failed.
    pub spec: String,
    /// What is wrong with it.
    pub why: String,
}

impl SpecError {
    pub(crate) fn new(spec: &str, why: impl Into<String>) -> Self {
        SpecError { spec: spec.to_string(), why: why.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_sets_both_directions_then_overrides_one() {
        let mut patch = FaultsPatch::default();
        patch.set_option("latency_ms=80").unwrap();
        patch.set_option("to_client.latency_ms=20").unwrap();
        patch.set_option("jitter_ms=5").unwrap();
        patch.set_option("stall=on").unwrap();
        let f = patch.apply(&LinkFaults::default()).unwrap();
        assert_eq!(
            f.to_upstream,
            DirectionFaults { latency_ms: 80, jitter_ms: 5, bandwidth_bytes_per_s: 0, black_hole: false }
        );
        assert_eq!(
            f.to_client,
            DirectionFaults { latency_ms: 20, jitter_ms: 5, bandwidth_bytes_per_s: 0, black_hole: false }
        );
        assert!(f.stall && !f.partition && !f.refuse);
    }

    #[test]
    fn patch_keeps_fields_it_does_not_name() {
        let base = LinkFaults { partition: true, ..LinkFaults::symmetric_latency(40) };
        let patch: FaultsPatch = serde_json::from_str(r#"{"to_upstream": {"jitter_ms": 3}}"#).unwrap();
        let f = patch.apply(&base).unwrap();
        assert_eq!(f.to_upstream.latency_ms, 40);
        assert_eq!(f.to_upstream.jitter_ms, 3);
        assert_eq!(f.to_client.jitter_ms, 0);
        assert!(f.partition);
    }

    #[test]
    fn heal_keeps_latency_and_jitter_only() {
        let f = LinkFaults {
            to_upstream: DirectionFaults {
                latency_ms: 80,
                jitter_ms: 5,
                bandwidth_bytes_per_s: 4096,
                black_hole: false,
            },
            to_client: DirectionFaults::latency(70),
            partition: true,
            stall: true,
            refuse: true,
        };
        let h = f.healed();
        assert_eq!(
            h.to_upstream,
            DirectionFaults { latency_ms: 80, jitter_ms: 5, bandwidth_bytes_per_s: 0, black_hole: false }
        );
        assert_eq!(h.to_client, DirectionFaults::latency(70));
        assert!(h.flowing() && !h.refuse);
    }

    #[test]
    fn validate_names_the_field() {
        let mut f = LinkFaults::default();
        f.to_client.bandwidth_bytes_per_s = 10;
        let err = f.validate().unwrap_err();
        assert_eq!((err.direction, err.field), ("to_client", "bandwidth_bytes_per_s"));
        f.to_client.bandwidth_bytes_per_s = 0;
        f.to_upstream.latency_ms = LATENCY_MS_MAX + 1;
        assert_eq!(f.validate().unwrap_err().field, "latency_ms");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let mut p = FaultsPatch::default();
        assert!(p.set_option("latency_ms").unwrap_err().why.contains("key=value"));
        assert!(p.set_option("latency_ms=fast").unwrap_err().why.contains("whole number"));
        assert!(p.set_option("partition=maybe").unwrap_err().why.contains("true or false"));
        assert!(p.set_option("sideways.latency_ms=1").unwrap_err().why.contains("unknown direction"));
        assert!(p.set_option("loss_pct=1").unwrap_err().why.contains("unknown option"));
        assert!(p.set_option("to_client.partition=true").unwrap_err().why.contains("unknown option"));
    }

    #[test]
    fn json_rejects_unknown_fields() {
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"latncy_ms": 5}"#).is_err());
        assert!(serde_json::from_str::<LinkFaults>(r#"{"to_client": {"loss": 1}}"#).is_err());
    }
}
