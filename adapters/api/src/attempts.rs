//! Revision names for repeated attempts at one update. The engine keeps the
//! final status of every offer id (its journal, and Pantavisor's trail keeps
//! the revision), so an update offered again after it failed, rolled back or
//! was withdrawn needs a name of its own: `<name>`, then `<name>-retry2`,
//! `<name>-retry3`, … An adapter keeps the spent names durably with its own
//! record of the deployment.

use serde::{Deserialize, Serialize};

/// How many spent names are kept.
pub const KEEP: usize = 64;

/// Names whose offers ended without success (newest last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Spent(pub Vec<String>);

impl Spent {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name for the next attempt at installing `name`: `name` itself while
    /// no offer of it ended, else `<name>-retry<n>` with the first `n` from 2
    /// not spent (shortened at the front to stay within 64 characters).
    pub fn next(&self, name: &str) -> String {
        if !self.contains(name) {
            return name.to_owned();
        }
        (2u32..)
            .map(|n| {
                let suffix = format!("-retry{n}");
                let mut cut = name.len().min(64 - suffix.len());
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}{suffix}", &name[..cut])
            })
            .find(|candidate| !self.contains(candidate))
            .unwrap_or_else(|| name.to_owned())
    }

    /// Notes the end of the offer named `name`: a success frees the name,
    /// anything else spends it.
    pub fn ended(&mut self, name: &str, success: bool) {
        if success {
            self.0.retain(|s| s != name);
        } else if !self.contains(name) {
            self.0.push(name.to_owned());
            let over = self.0.len().saturating_sub(KEEP);
            self.0.drain(..over);
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|s| s == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_name_is_not_offered_again() {
        let mut s = Spent::default();
        assert_eq!(s.next("1.0.1"), "1.0.1");
        s.ended("1.0.1", false);
        assert_eq!(s.next("1.0.1"), "1.0.1-retry2");
        s.ended("1.0.1-retry2", false);
        assert_eq!(s.next("1.0.1"), "1.0.1-retry3");
        assert_eq!(s.next("1.0.2"), "1.0.2", "other names are untouched");
        s.ended("1.0.1", false);
        assert_eq!(s.0.iter().filter(|n| *n == "1.0.1").count(), 1);
        s.ended("1.0.1-retry2", true);
        assert!(!s.contains("1.0.1-retry2"));
        for i in 0..200 {
            s.ended(&format!("x{i}"), false);
        }
        assert_eq!(s.0.len(), KEEP);
        assert_eq!(s.0.last().map(String::as_str), Some("x199"));
        assert_eq!(
            serde_json::to_string(&Spent(vec!["a".into()])).unwrap(),
            r#"["a"]"#
        );
    }

    #[test]
    fn a_long_name_is_shortened_to_fit_an_offer_id() {
        let long = "v".repeat(64);
        let mut s = Spent::default();
        s.ended(&long, false);
        let next = s.next(&long);
        assert!(next.len() == 64 && next.ends_with("-retry2"), "{next}");
        assert!(crate::valid_offer_id(&next));
        s.ended(&next, false);
        let third = s.next(&long);
        assert!(third.len() == 64 && third.ends_with("-retry3"), "{third}");
    }
}
