//! The README's five-minute tour as data: its command lines, the comment
//! beside each, and the check of one line's outcome against its comment.
//! `tests/tour.rs` runs it on `geokv dev`, `tests/deploy.rs` on the
//! example deployment's nodes.

use super::{tests_path, CliOutput};

/// One `./scripts/geokv` line of the tour.
#[derive(Debug, Clone)]
pub struct TourLine {
    /// The arguments after `./scripts/geokv`.
    pub args: Vec<String>,
    /// The comment beside the line (empty when none).
    pub comment: String,
}

impl TourLine {
    pub fn shown(&self) -> String {
        format!("geokv {}", self.args.join(" "))
    }

    /// The arguments with `$E` (every region's client endpoint, as the
    /// README defines it) replaced by `endpoints`.
    pub fn args_with_endpoints(&self, endpoints: &str) -> Vec<String> {
        self.args.iter().map(|a| a.replace("$E", endpoints)).collect()
    }

    /// The reason the line's comment says it fails with, if it says so.
    pub fn expected_failure(&self) -> Option<&'static str> {
        if self.comment.contains("RESIDENCY_VIOLATION") {
            Some("RESIDENCY_VIOLATION")
        } else if self.comment.contains("NOT SET") {
            Some("NOT SET")
        } else {
            None
        }
    }

    /// Asserts `out` is what the comment promises: a failure naming its
    /// reason, or success.
    pub fn check(&self, out: &CliOutput) {
        let line = self.shown();
        match self.expected_failure() {
            Some(reason) => {
                assert!(!out.status.success(), "`{line}` should fail ({}):\n{}", self.comment, out.stdout);
                let text = format!("{}{}", out.stdout, out.stderr);
                assert!(text.contains(reason), "`{line}` failed without {reason}:\n{text}");
            }
            None => assert!(
                out.status.success(),
                "`{line}` failed with {}:\nstdout:\n{}\nstderr:\n{}",
                out.status,
                out.stdout,
                out.stderr
            ),
        }
    }
}

/// The tour's lines, from the README's "Five-minute tour" up to its
/// multi-node block.
pub fn tour_lines() -> Vec<TourLine> {
    let readme = std::fs::read_to_string(tests_path("../README.md")).expect("read README.md");
    let start = readme.find("## Five-minute tour").expect("the README has a five-minute tour");
    let rest = &readme[start..];
    let end = rest.find("Several nodes per region").expect("the tour's multi-node block");
    rest[..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("./scripts/geokv "))
        .map(|l| {
            let (cmd, comment) = l.split_once('#').unwrap_or((l, ""));
            TourLine {
                args: cmd.split_whitespace().map(str::to_string).collect(),
                comment: comment.trim().to_string(),
            }
        })
        .collect()
}

/// Fewest lines the tour may have: fewer means the README lost them.
pub const TOUR_LINES_MIN: usize = 15;
