//! Turning Pantavisor's log lines into records.
//!
//! - `pantavisor/pantavisor.log` (filetree layout):
//!   `[pantavisor] <tsec> <LEVEL>\t -- [<module>]: <msg>`, where `tsec` is seconds
//!   since boot, or since the epoch with `PV_LOG_TIMESTAMP=absolute`;
//! - `pv.log` (singlefile layout): JSON lines
//!   `{"tsec":..,"tnano":..,"platform":..,"lvl":..,"src":..,"msg":..}`;
//! - container sources (`lxc/console.log`, `var/log/syslog`, …): raw lines.
//!
//! Nothing here fails: a line that does not parse is kept whole as an INFO record.

use pv_adapter_api::LogRecord;
use serde_json::Value;

/// Longest message kept; longer ones are cut and marked.
pub const MAX_MSG: usize = 16 * 1024;
/// Below this, a `tsec` counts as seconds since boot rather than since the epoch.
const EPOCH_FLOOR: i64 = 1_000_000_000;

fn cut(msg: &str) -> String {
    let msg = msg.trim_end_matches(['\r', '\n']);
    if msg.len() <= MAX_MSG {
        return msg.to_owned();
    }
    let mut end = MAX_MSG;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

/// A line from a container source, timestamped when it was read.
pub fn raw(plat: &str, src: &str, line: &str, now: (i64, u32)) -> LogRecord {
    LogRecord {
        seq: 0,
        tsec: now.0,
        tnano: now.1,
        lvl: "INFO".into(),
        plat: plat.to_owned(),
        src: src.to_owned(),
        msg: cut(line),
        rev: String::new(),
    }
}

/// A line of `pantavisor.log`.
pub fn pantavisor(line: &str, now: (i64, u32)) -> LogRecord {
    let parsed = (|| {
        let rest = line.strip_prefix("[pantavisor] ")?;
        let (tsec, rest) = rest.split_once(' ')?;
        let tsec: i64 = tsec.parse().ok()?;
        let (lvl, rest) = rest.split_once('\t')?;
        let rest = rest.strip_prefix(" -- [")?;
        let (module, msg) = rest.split_once("]: ")?;
        Some((tsec, lvl.trim().to_owned(), module.to_owned(), msg))
    })();
    match parsed {
        Some((tsec, lvl, module, msg)) => LogRecord {
            seq: 0,
            tsec: if tsec >= EPOCH_FLOOR { tsec } else { now.0 },
            tnano: if tsec >= EPOCH_FLOOR { 0 } else { now.1 },
            lvl,
            plat: "pantavisor".into(),
            src: module,
            msg: cut(msg),
            rev: String::new(),
        },
        None => raw("pantavisor", "pantavisor.log", line, now),
    }
}

/// A line of the singlefile `pv.log`.
pub fn singlefile(line: &str, now: (i64, u32)) -> LogRecord {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) else {
        return raw("pantavisor", "pv.log", line, now);
    };
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let tsec = m.get("tsec").and_then(Value::as_i64).unwrap_or(now.0);
    LogRecord {
        seq: 0,
        tsec: if tsec >= EPOCH_FLOOR { tsec } else { now.0 },
        tnano: m
            .get("tnano")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|_| tsec >= EPOCH_FLOOR)
            .unwrap_or(now.1),
        lvl: s("lvl").unwrap_or_else(|| "INFO".into()),
        // The key is `platform`, although the docs show `plat`.
        plat: s("platform")
            .or_else(|| s("plat"))
            .unwrap_or_else(|| "pantavisor".into()),
        src: s("src").unwrap_or_default(),
        msg: cut(&s("msg").unwrap_or_default()),
        rev: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: (i64, u32) = (1_790_000_000, 42);

    #[test]
    fn pantavisor_lines_parse() {
        let r = pantavisor(
            "[pantavisor] 12 INFO\t -- [updater]: revision locals/x: DONE",
            NOW,
        );
        assert_eq!(
            (r.lvl.as_str(), r.plat.as_str(), r.src.as_str()),
            ("INFO", "pantavisor", "updater")
        );
        assert_eq!(r.msg, "revision locals/x: DONE");
        assert_eq!(
            (r.tsec, r.tnano),
            NOW,
            "boot-relative tsec: stamped when read"
        );
        let r = pantavisor("[pantavisor] 1795000000 WARN\t -- [ctrl]: a: b", NOW);
        assert_eq!(
            (r.tsec, r.tnano, r.lvl.as_str(), r.msg.as_str()),
            (1_795_000_000, 0, "WARN", "a: b")
        );
    }

    #[test]
    fn unparsable_lines_are_kept_whole() {
        let r = pantavisor("garbage without a format\r\n", NOW);
        assert_eq!(
            (r.src.as_str(), r.msg.as_str()),
            ("pantavisor.log", "garbage without a format")
        );
        let r = singlefile("{not json", NOW);
        assert_eq!((r.src.as_str(), r.msg.as_str()), ("pv.log", "{not json"));
    }

    #[test]
    fn singlefile_lines_use_the_platform_key() {
        let r = singlefile(
            r#"{"tsec":1795000001,"tnano":7,"platform":"app","lvl":"ERROR","src":"lxc/console.log","msg":"boom"}"#,
            NOW,
        );
        assert_eq!(
            r,
            LogRecord {
                seq: 0,
                tsec: 1_795_000_001,
                tnano: 7,
                lvl: "ERROR".into(),
                plat: "app".into(),
                src: "lxc/console.log".into(),
                msg: "boom".into(),
                rev: String::new(),
            }
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MSG);
        let r = raw("app", "x", &long, NOW);
        assert!(r.msg.len() <= MAX_MSG + "…".len());
        assert!(r.msg.ends_with('…'));
    }
}
