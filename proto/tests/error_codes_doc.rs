//! `docs/error-codes.md` is what operators and client authors read; the
//! table in `geokv_proto::reasons` is what the server and the client run.
//! These tests hold the two to each other: a reason added to one and not the
//! other, a changed gRPC code, a reason in the wrong section, or a change to
//! which reasons are retried fails here.

use std::collections::{BTreeMap, BTreeSet};

use geokv_proto::reasons::{self, Origin};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/error-codes.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// One row of a reason table of the page: reason, gRPC code, and whether it
/// stands below the client-side heading.
struct Row {
    code: String,
    origin: Origin,
}

/// The first span between backticks in `s`.
fn backticked(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(&s[start..start + len])
}

/// Every row of the page's reason tables, by reason; panics on a reason
/// listed twice.
fn rows(doc: &str) -> BTreeMap<String, Row> {
    let mut origin = Origin::Server;
    let mut rows = BTreeMap::new();
    for line in doc.lines() {
        if line.starts_with("Client-side reasons") {
            origin = Origin::Client;
        }
        if !line.starts_with("| `") {
            continue;
        }
        // `| reason | gRPC code | when | metadata |`: cell 0 is before the first bar.
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = backticked(cells[1]).unwrap_or_else(|| panic!("no reason in row: {line}")).to_string();
        let code = cells.get(2).unwrap_or_else(|| panic!("no gRPC code in row: {line}")).to_string();
        let dup = rows.insert(name.clone(), Row { code, origin });
        assert!(dup.is_none(), "`{name}` is listed twice");
    }
    rows
}

/// `InvalidArgument` -> `INVALID_ARGUMENT`, as the page writes codes.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[test]
fn the_page_lists_exactly_the_reasons_of_the_table() {
    let rows = rows(&doc());
    let listed: BTreeSet<&str> = rows.keys().map(String::as_str).collect();
    let table: BTreeSet<&str> = reasons::ALL.iter().map(|r| r.name).collect();
    let missing: Vec<_> = table.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&table).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "reasons of geokv_proto::reasons missing from docs/error-codes.md: {missing:?}; \
         reasons docs/error-codes.md lists that are not in the table: {unknown:?}"
    );
}

#[test]
fn the_page_gives_each_reason_its_code_and_side() {
    let rows = rows(&doc());
    for r in reasons::ALL {
        let Some(row) = rows.get(r.name) else { continue };
        assert_eq!(row.code, code_name(r.code), "gRPC code of `{}`", r.name);
        assert_eq!(row.origin, r.origin, "`{}` is in the wrong section of the page", r.name);
    }
}

#[test]
fn the_page_names_exactly_the_retryable_reasons() {
    let doc = doc();
    let start = doc.find("Retryable reasons:").expect("the page has a paragraph on retryable reasons");
    let paragraph = &doc[start..];
    let paragraph = &paragraph[..paragraph.find("No other reason").expect("the paragraph ends the list")];
    let named: BTreeSet<&str> = paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
        .collect();
    let retryable: BTreeSet<&str> = reasons::ALL.iter().filter(|r| r.retryable).map(|r| r.name).collect();
    assert_eq!(named, retryable, "the retryable reasons of docs/error-codes.md and of the table");
}

#[test]
fn code_names_match_the_page() {
    assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
}
