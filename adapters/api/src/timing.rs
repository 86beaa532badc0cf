//! Timing helpers shared by adapters: jitter, so that a fleet started together
//! (a power cut over a site, a broker restart) does not poll or reconnect in
//! lockstep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static STATE: AtomicU64 = AtomicU64::new(0);

/// A pseudo-random number (xorshift64*, seeded from the clock and the process
/// id). Not for cryptography: only to spread timers.
pub fn random_u64() -> u64 {
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        x = (t ^ (u64::from(std::process::id()) << 32)) | 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// `d` moved by up to `spread` of itself either way (`spread` 0.2: 80 %–120 %).
pub fn jittered(d: Duration, spread: f64) -> Duration {
    let spread = spread.clamp(0.0, 1.0);
    let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    d.mul_f64(1.0 - spread + 2.0 * spread * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_band_and_spreads() {
        let d = Duration::from_secs(10);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let j = jittered(d, 0.2);
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
                "{j:?}"
            );
            seen.insert(j.as_millis() / 100);
        }
        assert!(
            seen.len() > 30,
            "1000 draws fall in only {} bands",
            seen.len()
        );
        assert_eq!(jittered(d, 0.0), d);
    }
}
