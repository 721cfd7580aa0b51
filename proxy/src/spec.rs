//! `NAME=LISTEN=UPSTREAM[,key=value...]`: a link on the command line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use crate::faults::{FaultsPatch, LinkFaults, SpecError};
use crate::set::validate_link_name;

/// A parsed `--link` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    /// The link's name, e.g. `us-east-1->eu-west-1`.
    pub name: String,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where to forward.
    pub upstream: SocketAddr,
    /// The starting faults, from the options after the first comma.
    pub faults: LinkFaults,
}

impl FromStr for LinkSpec {
    type Err = SpecError;

    /// Parses `NAME=LISTEN=UPSTREAM[,key=value...]`, for example
    /// `us->eu=127.0.0.1:7101=127.0.0.1:7001,latency_ms=80,jitter_ms=5`.
    /// Addresses are `host:port`; a host name is resolved once, here.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (head, options) = match spec.split_once(',') {
            Some((head, options)) => (head, Some(options)),
            None => (spec, None),
        };
        let parts: Vec<&str> = head.split('=').collect();
        let [name, listen, upstream] = parts[..] else {
            return Err(SpecError::new(
                spec,
                "expected NAME=LISTEN=UPSTREAM[,key=value...], e.g. a->b=127.0.0.1:0=127.0.0.1:7001,latency_ms=80",
            ));
        };
        validate_link_name(name).map_err(|e| SpecError::new(spec, e.to_string()))?;
        let mut patch = FaultsPatch::default();
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            patch.set_option(option).map_err(|e| SpecError::new(spec, e.why))?;
        }
        let faults = patch.apply(&LinkFaults::default()).map_err(|e| SpecError::new(spec, e.to_string()))?;
        Ok(LinkSpec {
            name: name.to_string(),
            listen: resolve(spec, "LISTEN", listen)?,
            upstream: resolve(spec, "UPSTREAM", upstream)?,
            faults,
        })
    }
}

fn resolve(spec: &str, what: &str, addr: &str) -> Result<SocketAddr, SpecError> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let bad = |why: String| SpecError::new(spec, format!("{what} {addr:?}: {why}"));
    addr.to_socket_addrs()
        .map_err(|e| bad(format!("not host:port ({e})")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let s: LinkSpec =
            "us-east-1->eu-west-1=127.0.0.1:0=127.0.0.1:7001,latency_ms=80,jitter_ms=5,to_client.latency_ms=70"
                .parse()
                .unwrap();
        assert_eq!(s.name, "us-east-1->eu-west-1");
        assert_eq!(s.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.upstream, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(s.faults.to_upstream.latency_ms, 80);
        assert_eq!(s.faults.to_client.latency_ms, 70);
        assert_eq!(s.faults.to_client.jitter_ms, 5);
    }

    #[test]
    fn parses_a_bare_spec_and_host_names() {
        let s: LinkSpec = "a=localhost:0=127.0.0.1:1".parse().unwrap();
        assert!(s.listen.ip().is_loopback());
        assert_eq!(s.faults, LinkFaults::default());
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let why = |s: &str| s.parse::<LinkSpec>().unwrap_err().why;
        assert!(why("a=127.0.0.1:1").contains("NAME=LISTEN=UPSTREAM"));
        assert!(why("a=127.0.0.1:1=127.0.0.1:2=x").contains("NAME=LISTEN=UPSTREAM"));
        assert!(why("a b=127.0.0.1:1=127.0.0.1:2").contains("invalid link name"));
        assert!(why("a=nowhere=127.0.0.1:2").contains("LISTEN \"nowhere\""));
        assert!(why("a=127.0.0.1:1=127.0.0.1:99999").contains("UPSTREAM"));
        assert!(why("a=127.0.0.1:1=127.0.0.1:2,latency=5").contains("unknown option"));
        assert!(why("a=127.0.0.1:1=127.0.0.1:2,latency_ms=-5").contains("whole number"));
        assert!(why("a=127.0.0.1:1=127.0.0.1:2,bandwidth_bytes_per_s=3").contains("bandwidth_bytes_per_s"));
    }
}
