//! Placement and residency: where a row lives and who may hold it.
//!
//! This is pure logic over the configuration, decided before any storage is
//! touched: [`resolve`] turns a row's table and locality into its home region
//! and residency zone, and [`admit_write`] / [`admit_read`] decide whether this
//! node's region may take the request at the requested level.

use crate::config::{Config, Level, LocalityMode, TableConfig};
use crate::error::KvError;

/// How a request says where its row lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Locality {
    /// Nothing given: the table's default (if it has one) applies.
    #[default]
    Unset,
    /// An explicit home region.
    HomeRegion(String),
    /// A locality value (e.g. a country code) the table maps to a region.
    Value(String),
}

/// Where a row lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub home_region: String,
    /// Residency zone ("" when the row may be stored in any region).
    pub zone: String,
    /// The regions allowed to hold the row, in configuration order.
    pub replica_regions: Vec<String>,
}

impl Placement {
    pub fn allows(&self, region: &str) -> bool {
        self.replica_regions.iter().any(|r| r == region)
    }

    fn violation(&self, region: &str) -> KvError {
        KvError::ResidencyViolation {
            zone: if self.zone.is_empty() { "<none>".into() } else { self.zone.clone() },
            allowed: self.replica_regions.clone(),
            region: region.to_string(),
        }
    }
}

/// Finds the row's home region and residency zone from its locality.
pub fn resolve(cfg: &Config, table: &TableConfig, locality: &Locality) -> Result<Placement, KvError> {
    let known = |region: &str| -> Result<String, KvError> {
        if cfg.regions.iter().any(|r| r.name == region) {
            Ok(region.to_string())
        } else {
            Err(KvError::UnknownRegion { region: region.to_string(), known: cfg.region_names() })
        }
    };
    let home = match (table.locality, locality) {
        (LocalityMode::ByTable, Locality::Unset) => known(table.home_region.as_deref().unwrap_or_default())?,
        (LocalityMode::ByTable, Locality::HomeRegion(r)) => {
            let home = known(table.home_region.as_deref().unwrap_or_default())?;
            if *r != home {
                return Err(KvError::InvalidField {
                    field: "row.home_region",
                    why: format!("table `{}` homes every row in `{home}`", table.name),
                });
            }
            home
        }
        (LocalityMode::ByTable, Locality::Value(_)) => {
            return Err(KvError::InvalidField {
                field: "row.locality_value",
                why: format!("table `{}` is homed by table, not by row", table.name),
            })
        }
        (_, Locality::HomeRegion(r)) => known(r)?,
        (_, Locality::Value(v)) => {
            let mapped = table.localities.get(v).or_else(|| cfg.localities.get(v));
            match mapped {
                Some(r) => known(r)?,
                None => return Err(KvError::UnknownLocality { table: table.name.clone(), value: v.clone() }),
            }
        }
        (LocalityMode::Global, Locality::Unset) => cfg.region.clone(),
        (LocalityMode::ByRow, Locality::Unset) => match &table.default_home_region {
            Some(r) => known(r)?,
            None => return Err(KvError::MissingLocality { table: table.name.clone() }),
        },
    };
    let zone = match &table.zone {
        Some(z) => cfg.zone(z),
        None => cfg.zone_of(&home),
    };
    let placement = match zone {
        Some(z) => Placement { home_region: home, zone: z.name.clone(), replica_regions: z.regions.clone() },
        None => Placement { home_region: home, zone: String::new(), replica_regions: cfg.region_names() },
    };
    if !placement.allows(&placement.home_region) {
        let home = placement.home_region.clone();
        return Err(placement.violation(&home));
    }
    Ok(placement)
}

/// Decides whether this node's region may accept a write at `level`.
pub fn admit_write(here: &str, placement: &Placement, level: Level) -> Result<(), KvError> {
    // A row never passes through a region outside its zone, whatever the level.
    if !placement.allows(here) {
        return Err(placement.violation(here));
    }
    match level {
        Level::Local if placement.home_region != here => {
            Err(KvError::NotHome { home: placement.home_region.clone(), here: here.to_string() })
        }
        Level::Local | Level::Eventual => Ok(()),
        // A majority (or a consensus group) of one region is this region.
        Level::Quorum | Level::Strong if placement.replica_regions.len() == 1 => Ok(()),
        Level::Quorum | Level::Strong => {
            Err(KvError::LevelUnavailable { level: level.as_str().to_uppercase() })
        }
    }
}

/// Read levels, as the domain sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLevel {
    Local,
    Bounded { max_staleness_ms: u64 },
    Session,
    Quorum,
    Strong,
}

impl ReadLevel {
    pub fn name(self) -> &'static str {
        match self {
            ReadLevel::Local => "LOCAL",
            ReadLevel::Bounded { .. } => "BOUNDED",
            ReadLevel::Session => "SESSION",
            ReadLevel::Quorum => "QUORUM",
            ReadLevel::Strong => "STRONG",
        }
    }
}

/// Decides whether this node's region may serve a read at `level`.
pub fn admit_read(here: &str, placement: &Placement, level: ReadLevel) -> Result<(), KvError> {
    if !placement.allows(here) {
        return Err(placement.violation(here));
    }
    match level {
        // Freshness of BOUNDED and SESSION reads is checked against what
        // replication has applied here (`kv::Node::read`).
        ReadLevel::Local | ReadLevel::Bounded { .. } | ReadLevel::Session => Ok(()),
        // A single replica region is its own majority and its own leader.
        ReadLevel::Quorum | ReadLevel::Strong if placement.replica_regions.len() == 1 => Ok(()),
        _ => Err(KvError::LevelUnavailable { level: level.name().into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_toml(
            r#"
            region = "us-east-1"
            regions = [{ name = "us-east-1" }, { name = "eu-west-1" }, { name = "eu-central-1" }]
            zones = [{ name = "eu", regions = ["eu-west-1", "eu-central-1"] }]
            localities = { DE = "eu-central-1", FR = "eu-west-1", US = "us-east-1" }
            [[tables]]
            name = "users"
            [[tables]]
            name = "eu_only"
            zone = "eu"
            [[tables]]
            name = "catalog"
            locality = "by_table"
            home_region = "us-east-1"
            "#,
        )
        .unwrap()
        .finish()
        .unwrap()
    }

    #[test]
    fn locality_value_maps_to_home_and_zone() {
        let c = cfg();
        let p = resolve(&c, c.table("users").unwrap(), &Locality::Value("DE".into())).unwrap();
        assert_eq!(p.home_region, "eu-central-1");
        assert_eq!(p.zone, "eu");
        assert_eq!(p.replica_regions, ["eu-west-1", "eu-central-1"]);
        let us = resolve(&c, c.table("users").unwrap(), &Locality::Value("US".into())).unwrap();
        assert_eq!(us.zone, "");
        assert_eq!(us.replica_regions.len(), 3);
    }

    #[test]
    fn missing_and_unknown_locality_are_typed() {
        let c = cfg();
        let t = c.table("users").unwrap();
        assert_eq!(resolve(&c, t, &Locality::Unset).unwrap_err().reason(), "MISSING_LOCALITY");
        assert_eq!(resolve(&c, t, &Locality::Value("XX".into())).unwrap_err().reason(), "UNKNOWN_LOCALITY");
        assert_eq!(
            resolve(&c, t, &Locality::HomeRegion("mars".into())).unwrap_err().reason(),
            "UNKNOWN_REGION"
        );
    }

    #[test]
    fn home_outside_table_zone_is_a_residency_violation() {
        let c = cfg();
        let e = resolve(&c, c.table("eu_only").unwrap(), &Locality::Value("US".into())).unwrap_err();
        assert_eq!(e.reason(), "RESIDENCY_VIOLATION");
    }

    #[test]
    fn eu_row_is_refused_in_us_region_at_every_level() {
        let c = cfg();
        let p = resolve(&c, c.table("users").unwrap(), &Locality::Value("FR".into())).unwrap();
        for level in [Level::Local, Level::Eventual, Level::Quorum, Level::Strong] {
            assert_eq!(admit_write("us-east-1", &p, level).unwrap_err().reason(), "RESIDENCY_VIOLATION");
        }
        assert_eq!(
            admit_read("us-east-1", &p, ReadLevel::Local).unwrap_err().reason(),
            "RESIDENCY_VIOLATION"
        );
        assert!(admit_write("eu-central-1", &p, Level::Eventual).is_ok());
        assert_eq!(admit_write("eu-central-1", &p, Level::Local).unwrap_err().reason(), "NOT_HOME");
        assert_eq!(admit_write("eu-west-1", &p, Level::Quorum).unwrap_err().reason(), "LEVEL_UNAVAILABLE");
    }

    #[test]
    fn by_table_ignores_nothing() {
        let c = cfg();
        let t = c.table("catalog").unwrap();
        assert_eq!(resolve(&c, t, &Locality::Unset).unwrap().home_region, "us-east-1");
        assert!(resolve(&c, t, &Locality::HomeRegion("eu-west-1".into())).is_err());
    }
}
