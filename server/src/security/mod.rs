//! Security of a node: who may do what, and a record of who did.
//!
//! # Layout
//! - [`grants`]: authorization as data: principals, privileges on tables
//!   and on the cluster, deny by default, `root` as the built-in superuser.
//! - [`authn`]: who is calling: the principal of each request, per port.
//! - [`audit`]: the access audit log, kept in the region that wrote it
//!   (column family `audit`, never replicated), with keyed hashes instead of
//!   row keys.

pub mod audit;
pub mod authn;
pub mod grants;
