//! Secrets that may appear in the bridge's own log lines (a Pantacor Hub claim
//! challenge is shown to the installer in the console), kept out of the log
//! records the bridge forwards to its backends: the engine scrubs every record
//! with [`scrub`] before an adapter sees it.
//!
//! The set is process-wide and small (a handful of strings); registering one is
//! cheap and idempotent.

use std::borrow::Cow;
use std::sync::Mutex;

/// What a scrubbed secret becomes.
pub const MASK: &str = "[secret]";

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn lock() -> std::sync::MutexGuard<'static, Vec<String>> {
    SECRETS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `secret` out of forwarded log records from now on. Strings shorter than
/// 6 bytes are ignored: masking them would mangle ordinary text.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < 6 {
        return;
    }
    let mut s = lock();
    if !s.iter().any(|k| k == secret) {
        s.push(secret.to_owned());
    }
}

/// Stops masking `secret` (it no longer grants anything).
pub fn forget(secret: &str) {
    lock().retain(|k| k != secret.trim());
}

/// `text` with every registered secret replaced by [`MASK`].
pub fn scrub(text: &str) -> Cow<'_, str> {
    let s = lock();
    if !s.iter().any(|k| text.contains(k.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_owned();
    for k in s.iter() {
        if out.contains(k.as_str()) {
            out = out.replace(k.as_str(), MASK);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_masked_until_forgotten() {
        let secret = "keen-brave-otter-secrets-test";
        let line = format!("claim with challenge={secret} now");
        assert_eq!(scrub(&line), line.as_str());
        register(secret);
        register(secret);
        register("abc");
        assert_eq!(scrub(&line), "claim with challenge=[secret] now");
        assert_eq!(scrub("abc"), "abc", "short strings are not secrets");
        forget(secret);
        assert_eq!(scrub(&line), line.as_str());
    }
}
