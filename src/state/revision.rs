//! Pantavisor revision names: `0`, `1`, … for Hub revisions and `locals/<name>` for
//! revisions staged through pv-ctrl (`storage.c: pv_storage_is_revision_local`).

use std::fmt;
use std::str::FromStr;

/// Prefix of revisions staged locally.
pub const LOCAL_PREFIX: &str = "locals/";
/// Longest name after [`LOCAL_PREFIX`] (`SIZE_LOCAL_REV`).
pub const LOCAL_NAME_MAX: usize = 64;

/// A revision name as Pantavisor stores it under `/storage/trails`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Revision {
    /// A revision numbered by Pantacor Hub (`"0"` is the factory revision).
    Remote(u64),
    /// A revision staged through pv-ctrl: `locals/<name>`; holds `<name>`.
    Local(String),
}

/// Why a revision name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevisionError {
    #[error("revision name is empty")]
    Empty,
    #[error("local revision name {0:?} is empty after \"locals/\"")]
    EmptyLocal(String),
    #[error("local revision name {name:?} is {len} bytes long; at most {LOCAL_NAME_MAX} allowed")]
    TooLong { name: String, len: usize },
    #[error(
        "local revision name {name:?} contains {ch:?}, which does not survive a request line \
         (space, '?', '#' and '%' are refused)"
    )]
    BadChar { name: String, ch: char },
    #[error("local revision name {0:?} contains a '/' after \"locals/\"")]
    ExtraSlash(String),
    #[error("local revision name {0:?} must not be \".\" or \"..\"")]
    DotName(String),
    #[error("revision name {0:?} contains a control character")]
    ControlChar(String),
    #[error("revision name {0:?} is neither a decimal number nor \"locals/<name>\"")]
    NotARevision(String),
}

impl Revision {
    /// A local revision from its bare name (what follows `locals/`).
    pub fn local(name: &str) -> Result<Self, RevisionError> {
        validate_local_name(name)?;
        Ok(Self::Local(name.to_owned()))
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }
}

fn validate_local_name(name: &str) -> Result<(), RevisionError> {
    let full = || format!("{LOCAL_PREFIX}{name}");
    if name.is_empty() {
        return Err(RevisionError::EmptyLocal(full()));
    }
    // `SIZE_LOCAL_REV` bounds a C buffer: bytes, not characters.
    let len = name.len();
    if len > LOCAL_NAME_MAX {
        return Err(RevisionError::TooLong { name: full(), len });
    }
    if name.contains('/') {
        return Err(RevisionError::ExtraSlash(full()));
    }
    if name == "." || name == ".." {
        return Err(RevisionError::DotName(full()));
    }
    if name.chars().any(char::is_control) {
        return Err(RevisionError::ControlChar(full()));
    }
    // pv-ctrl takes the name from the raw, undecoded request URI: a space ends
    // it, '?' and '#' start a query or fragment, '%' is not decoded.
    if let Some(ch) = name.chars().find(|c| matches!(c, ' ' | '?' | '#' | '%')) {
        return Err(RevisionError::BadChar { name: full(), ch });
    }
    Ok(())
}

impl FromStr for Revision {
    type Err = RevisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(RevisionError::Empty);
        }
        if let Some(name) = s.strip_prefix(LOCAL_PREFIX) {
            return Self::local(name);
        }
        if s.chars().any(char::is_control) {
            return Err(RevisionError::ControlChar(s.to_owned()));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Self::Remote)
                .map_err(|_| RevisionError::NotARevision(s.to_owned()));
        }
        Err(RevisionError::NotARevision(s.to_owned()))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Remote(n) => write!(f, "{n}"),
            Self::Local(name) => write!(f, "{LOCAL_PREFIX}{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_remote_and_local_names() {
        assert_eq!("0".parse::<Revision>().unwrap(), Revision::Remote(0));
        assert_eq!("17".parse::<Revision>().unwrap(), Revision::Remote(17));
        let r: Revision = "locals/pvtx-1700000000-ab12-x".parse().unwrap();
        assert!(r.is_local());
        assert_eq!(r.to_string(), "locals/pvtx-1700000000-ab12-x");
    }

    #[test]
    fn accepts_exactly_64_bytes_and_refuses_65() {
        let sha = "a".repeat(64);
        assert!(format!("locals/{sha}").parse::<Revision>().is_ok());
        let err = format!("locals/{sha}b").parse::<Revision>().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("local revision name \"locals/{sha}b\" is 65 bytes long; at most 64 allowed")
        );
        // Pantavisor's limit is a C buffer: 32 × "é" is 64 bytes, 33 × is 66.
        assert!(
            format!("locals/{}", "é".repeat(32))
                .parse::<Revision>()
                .is_ok()
        );
        assert!(matches!(
            format!("locals/{}", "é".repeat(33)).parse::<Revision>(),
            Err(RevisionError::TooLong { len: 66, .. })
        ));
    }

    #[test]
    fn refuses_malformed_names_with_precise_reasons() {
        let cases = [
            ("", RevisionError::Empty),
            ("locals/", RevisionError::EmptyLocal("locals/".into())),
            ("locals/a/b", RevisionError::ExtraSlash("locals/a/b".into())),
            ("locals/..", RevisionError::DotName("locals/..".into())),
            (
                "locals/a\nb",
                RevisionError::ControlChar("locals/a\nb".into()),
            ),
            ("current", RevisionError::NotARevision("current".into())),
            (
                "locals/a b",
                RevisionError::BadChar {
                    name: "locals/a b".into(),
                    ch: ' ',
                },
            ),
            (
                "locals/a?x=1",
                RevisionError::BadChar {
                    name: "locals/a?x=1".into(),
                    ch: '?',
                },
            ),
            (
                "locals/a#b",
                RevisionError::BadChar {
                    name: "locals/a#b".into(),
                    ch: '#',
                },
            ),
            (
                "locals/50%",
                RevisionError::BadChar {
                    name: "locals/50%".into(),
                    ch: '%',
                },
            ),
            ("-1", RevisionError::NotARevision("-1".into())),
            (
                "99999999999999999999999",
                RevisionError::NotARevision("99999999999999999999999".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Revision>().unwrap_err(), want, "{input:?}");
        }
    }
}
