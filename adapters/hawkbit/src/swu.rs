//! SWUpdate images (`.swu`): a cpio "newc" archive whose first member is
//! `sw-description` (reference §8.7). goosebit only takes `.swu` (or RAUC)
//! files, so a Pantavisor revision travels inside one: the `pvr export`
//! archive is a member beside `sw-description`. Only the member table is read
//! here; the payload is unpacked in place from its offset, never copied.

use std::io::{Read, Seek, SeekFrom};

/// Most members read before the archive is refused.
const MAX_MEMBERS: usize = 256;
/// Longest member name.
const MAX_NAME: u64 = 4096;
const HEADER: u64 = 110;

/// One member: its name and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// True when `head` starts like a cpio newc archive.
pub fn is_swu(head: &[u8]) -> bool {
    head.starts_with(b"070701") || head.starts_with(b"070702")
}

fn field(h: &[u8], index: usize) -> Result<u64, String> {
    let at = 6 + index * 8;
    let s = std::str::from_utf8(&h[at..at + 8]).map_err(|_| "a header field is not text")?;
    u64::from_str_radix(s, 16).map_err(|_| format!("header field {s:?} is not hex"))
}

fn pad4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

/// The members of the newc archive `r` (of `len` bytes), up to its trailer.
pub fn members(r: &mut (impl Read + Seek), len: u64) -> Result<Vec<Member>, String> {
    let mut out = Vec::new();
    let mut at = 0u64;
    loop {
        if out.len() >= MAX_MEMBERS {
            return Err(format!("more than {MAX_MEMBERS} members"));
        }
        if at + HEADER > len {
            return Err("the archive ends without its TRAILER!!! member".into());
        }
        r.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
        let mut h = [0u8; HEADER as usize];
        r.read_exact(&mut h).map_err(|e| e.to_string())?;
        if !is_swu(&h) {
            return Err(format!("no cpio newc header at byte {at}"));
        }
        let size = field(&h, 6)?;
        let namesize = field(&h, 11)?;
        if namesize == 0 || namesize > MAX_NAME {
            return Err(format!("a member name of {namesize} bytes at byte {at}"));
        }
        let mut name = vec![0u8; namesize as usize];
        r.read_exact(&mut name)
            .map_err(|_| "the archive ends inside a member name".to_owned())?;
        if name.pop() != Some(0) {
            return Err(format!("a member name at byte {at} does not end with NUL"));
        }
        let name = String::from_utf8(name).map_err(|_| "a member name is not UTF-8")?;
        let offset = pad4(at + HEADER + namesize);
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        let end = offset
            .checked_add(size)
            .filter(|e| *e <= len)
            .ok_or_else(|| format!("member {name:?} runs past the end of the archive"))?;
        out.push(Member { name, offset, size });
        at = pad4(end);
    }
}

/// The `pvr export` archive among `members`: exactly one `.tgz`, `.tar.gz`
/// or `.tar` member, after an `sw-description` first member.
pub fn payload(members: &[Member]) -> Result<&Member, String> {
    if members.first().map(|m| m.name.as_str()) != Some("sw-description") {
        return Err("the first member of a .swu must be sw-description".into());
    }
    let exports: Vec<&Member> = members
        .iter()
        .filter(|m| pv_adapter_local::archive::kind(&m.name).is_some())
        .collect();
    match exports.as_slice() {
        [one] => Ok(one),
        [] => Err("the .swu carries no pvr export (a .tgz, .tar.gz or .tar member)".into()),
        many => Err(format!(
            "the .swu carries {} archives ({}); exactly one pvr export is expected",
            many.len(),
            many.iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A newc member (for tests and the test kit's images).
pub fn newc(name: &str, data: &[u8], ino: u32) -> Vec<u8> {
    let mut nb = name.as_bytes().to_vec();
    nb.push(0);
    let fields = [
        ino,
        0o100644,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        nb.len() as u32,
        0,
    ];
    let mut out = b"070701".to_vec();
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(&nb);
    out.resize(pad4(out.len() as u64) as usize, 0);
    out.extend_from_slice(data);
    out.resize(pad4(out.len() as u64) as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn swu(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (n, d)) in members.iter().enumerate() {
            out.extend(newc(n, d, i as u32 + 1));
        }
        out.extend(newc("TRAILER!!!", b"", 0));
        out
    }

    fn read(b: &[u8]) -> Result<Vec<Member>, String> {
        members(&mut Cursor::new(b), b.len() as u64)
    }

    #[test]
    fn the_export_is_found_in_place() {
        let desc = b"software = { version = \"1.2.3\"; };";
        let export = b"pretend this is a tgz";
        let b = swu(&[("sw-description", desc), ("pvrevision.tgz", export)]);
        assert!(is_swu(&b));
        let m = read(&b).unwrap();
        assert_eq!(m.len(), 2);
        let p = payload(&m).unwrap();
        assert_eq!(p.name, "pvrevision.tgz");
        assert_eq!(
            &b[p.offset as usize..(p.offset + p.size) as usize],
            &export[..]
        );
    }

    #[test]
    fn what_is_wrong_with_a_swu_is_said() {
        let desc: &[u8] = b"software = { version = \"1\"; };";
        let no_export = swu(&[("sw-description", desc)]);
        assert!(
            payload(&read(&no_export).unwrap())
                .unwrap_err()
                .contains("no pvr export")
        );
        let two = swu(&[("sw-description", desc), ("a.tgz", b"1"), ("b.tar", b"2")]);
        assert!(
            payload(&read(&two).unwrap())
                .unwrap_err()
                .contains("a.tgz, b.tar")
        );
        let first = swu(&[("a.tgz", b"1"), ("sw-description", desc)]);
        assert!(
            payload(&read(&first).unwrap())
                .unwrap_err()
                .contains("first member")
        );
        let full = swu(&[("sw-description", desc), ("a.tgz", b"12345678")]);
        let cut = &full[..full.len() - 130];
        assert!(
            read(cut).unwrap_err().contains("past the end"),
            "{:?}",
            read(cut)
        );
        let no_trailer = &full[..full.len() - 124];
        assert!(read(no_trailer).unwrap_err().contains("TRAILER"));
        assert!(
            read(&[b'x'; 200])
                .unwrap_err()
                .contains("no cpio newc header")
        );
        let mut bad = full.clone();
        bad[6 + 6 * 8] = b'Z';
        assert!(read(&bad).unwrap_err().contains("not hex"));
    }
}
