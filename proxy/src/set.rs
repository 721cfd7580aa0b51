//! Many named links under one roof, e.g. one per ordered region pair
//! (`us-east-1->eu-west-1`), with one control server for all of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::control::ControlServer;
use crate::error::Error;
use crate::faults::LinkFaults;
use crate::link::{Proxy, ProxyHandle, ProxyOptions};
use crate::stats::LinkStats;

/// Most links one set manages. A cluster of 5 regions has 20 ordered pairs;
/// this leaves room for per-node links and peers without letting a runaway
/// script open thousands of listeners.
pub const LINKS_MAX: usize = 1024;

/// Longest link name, in bytes.
pub const LINK_NAME_BYTES_MAX: usize = 128;

/// Checks a link name: 1 to [`LINK_NAME_BYTES_MAX`] bytes of ASCII letters,
/// digits and `- _ . : >`, so `us-east-1->eu-west-1` is a name, and a name
/// never needs quoting in a `--link` spec (which uses `=` and `,`).
pub fn validate_link_name(name: &str) -> Result<(), Error> {
    let bad = |why| Err(Error::LinkName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > LINK_NAME_BYTES_MAX {
        return bad("longer than 128 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:>".contains(&b)) {
        return bad("only ASCII letters, digits and - _ . : > are allowed");
    }
    Ok(())
}

/// What the control API reports about one link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The link's name in its set.
    pub name: String,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where the link forwards to.
    pub upstream: SocketAddr,
    /// The current faults.
    pub faults: LinkFaults,
    /// Counters since the link started.
    pub stats: LinkStats,
}

/// A set of named links. Cheap to clone; clones share the links, so the same
/// set can be driven in-process (tests, `geokv dev`) and over HTTP at once.
#[derive(Clone, Debug, Default)]
pub struct ProxySet {
    links: Arc<Mutex<BTreeMap<String, ProxyHandle>>>,
}

impl ProxySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProxyHandle>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a link named `name`; see [`Proxy::start`].
    pub async fn add(
        &self,
        name: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
        faults: LinkFaults,
    ) -> Result<ProxyHandle, Error> {
        self.add_with(name, listen, upstream, faults, ProxyOptions::default()).await
    }

    /// [`ProxySet::add`] with explicit bounds.
    pub async fn add_with(
        &self,
        name: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
        faults: LinkFaults,
        options: ProxyOptions,
    ) -> Result<ProxyHandle, Error> {
        validate_link_name(name)?;
        self.check_room(name)?;
        let handle = Proxy::start_with(listen, upstream, faults, options).await?;
        // Checked again: another add may have taken the name while binding.
        let raced = {
            let mut links = self.lock();
            if links.contains_key(name) {
                Err(Error::LinkExists(name.to_string()))
            } else if links.len() >= LINKS_MAX {
                Err(Error::TooManyLinks(LINKS_MAX))
            } else {
                links.insert(name.to_string(), handle.clone());
                Ok(())
            }
        };
        if let Err(e) = raced {
            handle.shutdown().await;
            return Err(e);
        }
        Ok(handle)
    }

    fn check_room(&self, name: &str) -> Result<(), Error> {
        let links = self.lock();
        if links.contains_key(name) {
            return Err(Error::LinkExists(name.to_string()));
        }
        if links.len() >= LINKS_MAX {
            return Err(Error::TooManyLinks(LINKS_MAX));
        }
        Ok(())
    }

    /// The link named `name`.
    pub fn get(&self, name: &str) -> Result<ProxyHandle, Error> {
        self.lock().get(name).cloned().ok_or_else(|| Error::LinkNotFound(name.to_string()))
    }

    /// The names of all links, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The status of the link named `name`.
    pub fn status(&self, name: &str) -> Result<LinkStatus, Error> {
        Ok(status_of(name, &self.get(name)?))
    }

    /// The status of every link, sorted by name.
    pub fn statuses(&self) -> Vec<LinkStatus> {
        let links: Vec<(String, ProxyHandle)> =
            self.lock().iter().map(|(n, h)| (n.clone(), h.clone())).collect();
        links.iter().map(|(name, handle)| status_of(name, handle)).collect()
    }

    /// Stops the link named `name` and forgets it.
    pub async fn remove(&self, name: &str) -> Result<(), Error> {
        let handle = self.lock().remove(name).ok_or_else(|| Error::LinkNotFound(name.to_string()))?;
        handle.shutdown().await;
        Ok(())
    }

    /// Serves the control API for this set on `addr` (port 0 allowed).
    pub async fn serve_control(&self, addr: SocketAddr) -> Result<ControlServer, Error> {
        ControlServer::start(self.clone(), addr).await
    }

    /// Stops every link and forgets them.
    pub async fn shutdown(&self) {
        let links = std::mem::take(&mut *self.lock());
        for handle in links.values() {
            handle.shutdown().await;
        }
    }
}

fn status_of(name: &str, handle: &ProxyHandle) -> LinkStatus {
    LinkStatus {
        name: name.to_string(),
        listen: handle.local_addr(),
        upstream: handle.upstream(),
        faults: handle.faults(),
        stats: handle.stats(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names() {
        assert!(validate_link_name("us-east-1->eu-west-1").is_ok());
        assert!(validate_link_name("a_b.c:1").is_ok());
        for bad in ["", "a b", "a=b", "a,b", "a/b", "é"] {
            assert!(validate_link_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_link_name(&"x".repeat(LINK_NAME_BYTES_MAX + 1)).is_err());
    }

    #[tokio::test]
    async fn duplicate_and_missing_links_are_typed_errors() {
        let set = ProxySet::new();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        set.add("a->b", any, up, LinkFaults::default()).await.unwrap();
        let dup = set.add("a->b", any, up, LinkFaults::default()).await.unwrap_err();
        assert_eq!(dup.reason(), "LINK_EXISTS");
        assert_eq!(set.get("b->a").unwrap_err().reason(), "LINK_NOT_FOUND");
        assert_eq!(set.names(), vec!["a->b".to_string()]);
        set.remove("a->b").await.unwrap();
        assert!(set.names().is_empty());
        set.shutdown().await;
    }
}
