//! Errors of the library, each with a stable machine-readable reason.

use std::net::SocketAddr;

use crate::faults::FaultsError;

/// Why a proxy, a link or the control server could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener (a link's or the control server's) could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A fault setting is out of range.
    #[error("invalid faults: {0}")]
    Faults(#[from] FaultsError),
    /// [`crate::ProxyOptions`] are out of range.
    #[error("invalid proxy options: {0}")]
    Options(String),
    /// A link name is empty, too long or has characters outside the allowed set.
    #[error("invalid link name {name:?}: {why}")]
    LinkName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A [`crate::ProxySet`] already has a link of this name.
    #[error("link {0:?} already exists")]
    LinkExists(String),
    /// A [`crate::ProxySet`] has no link of this name.
    #[error("no link named {0:?}")]
    LinkNotFound(String),
    /// A [`crate::ProxySet`] is at its bound of links.
    #[error("too many links: at most {0}")]
    TooManyLinks(usize),
}

impl Error {
    /// A stable code for programs and the control API's JSON errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Bind { .. } => "BIND_FAILED",
            Error::Faults(_) => "INVALID_FAULTS",
            Error::Options(_) => "INVALID_OPTIONS",
            Error::LinkName { .. } => "INVALID_LINK_NAME",
            Error::LinkExists(_) => "LINK_EXISTS",
            Error::LinkNotFound(_) => "LINK_NOT_FOUND",
            Error::TooManyLinks(_) => "TOO_MANY_LINKS",
        }
    }
}
