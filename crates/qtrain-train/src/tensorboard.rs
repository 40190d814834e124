//! TensorBoard event files, written by hand: TFRecord framing around hand-encoded
//! `Event` protobufs carrying scalar summaries. This module owns the file name, the
//! framing, the CRC and the protobuf encoding; `metrics` decides what to log.
//!
//! No protobuf or TensorFlow dependency: the subset TensorBoard needs for scalars
//! is small and has been stable since 2016:
//!
//! - record: `u64 length (LE) | masked crc32c(length) | data | masked crc32c(data)`,
//!   with `mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`;
//! - `Event { double wall_time = 1; int64 step = 2; string file_version = 3;
//!   Summary summary = 5 }`, `Summary { repeated Value value = 1 }`,
//!   `Value { string tag = 1; float simple_value = 2 }`.
//!
//! The first record carries `file_version = "brain.Event:2"`, which TensorBoard
//! checks before reading scalars. `scripts/read_tfevents.py` reads a file back with
//! TensorBoard's own loader.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The version string TensorBoard expects in the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise. Event records
/// are a few hundred bytes per step, so a table or SIMD version would buy nothing.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord stores CRCs masked, so that a CRC of data that itself contains CRCs
/// does not degenerate: `((c >> 15) | (c << 17)) + 0xa282ead8`.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Wire types of the protobuf encoding we use.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, b: &[u8], out: &mut Vec<u8>) {
    key(field, LEN, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// The first event of a file: wall time and `file_version`, no step (as
/// TensorFlow's own writer does).
pub fn encode_version_event(wall_time: f64) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, FIXED64, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    bytes_field(3, FILE_VERSION.as_bytes(), &mut e);
    e
}

/// An event with scalar summaries for `step`. The step is written even when it is
/// 0 (proto3 would allow leaving it out; being explicit costs two bytes).
pub fn encode_scalar_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, FIXED64, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(2, VARINT, &mut e);
    // int64 is encoded as its two's-complement u64 (negative steps take 10 bytes).
    varint(step as u64, &mut e);
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut v);
        key(2, FIXED32, &mut v);
        v.extend_from_slice(&value.to_le_bytes());
        bytes_field(1, &v, &mut summary);
    }
    bytes_field(5, &summary, &mut e);
    e
}

/// One TFRecord around `data`.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix secs>.<hostname>.qtrain` and writes the
    /// version record. A file of that name is never overwritten: a resumed run that
    /// starts within the same second as the previous one gets a `.1`, `.2`, ...
    /// suffix (TensorBoard reads every file whose name contains `tfevents`).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = wall_time();
        let base = format!("events.out.tfevents.{}.{}.qtrain", now as u64, hostname());
        let mut n = 0u32;
        let (file, path) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        w.write_record(&encode_version_event(now))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends scalars for `step` and flushes, so a killed run keeps every point
    /// it logged and TensorBoard sees them while the run goes on.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> std::io::Result<()> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.write_record(&encode_scalar_event(wall_time(), step, values))
    }

    fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&frame_record(data))?;
        self.out.flush()
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (TensorBoard shows it when runs from several
/// machines share a directory). Read from the kernel's record rather than through
/// libc, which is not a dependency of this crate; anything that would make an odd
/// file name is replaced.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4: 32 zero bytes -> 0x8A9136AA; the check value of "123456789".
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    /// A decoded event: the fields scalar logging uses.
    #[derive(Debug, Default, PartialEq)]
    pub(crate) struct Event {
        pub wall_time: Option<f64>,
        pub step: Option<i64>,
        pub file_version: Option<String>,
        pub scalars: Vec<(String, f32)>,
    }

    /// Splits a file into TFRecord payloads, checking both CRCs of every record and
    /// that nothing trails the last one.
    pub(crate) fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            assert!(i + 12 <= bytes.len(), "truncated record header at {i}");
            let len_b = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_b.try_into().unwrap()) as usize;
            let lc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(lc, masked_crc(len_b), "length crc of the record at {i}");
            assert!(i + 16 + len <= bytes.len(), "truncated record at {i}");
            let data = &bytes[i + 12..i + 12 + len];
            let dc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(dc, masked_crc(data), "data crc of the record at {i}");
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    /// A protobuf decoder written from the wire format, independent of the encoder
    /// above: (field number, wire type, payload) triples.
    fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        fn varint(b: &[u8], i: &mut usize) -> u64 {
            let (mut v, mut s) = (0u64, 0);
            loop {
                let x = b[*i];
                *i += 1;
                v |= ((x & 0x7f) as u64) << s;
                s += 7;
                if x < 0x80 {
                    return v;
                }
            }
        }
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let k = varint(b, &mut i);
            let (f, w) = (k >> 3, k & 7);
            let v = match w {
                0 => varint(b, &mut i).to_le_bytes().to_vec(),
                1 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                5 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                _ => panic!("unexpected wire type {w}"),
            };
            out.push((f, w, v));
        }
        assert_eq!(i, b.len(), "message overran its bytes");
        out
    }

    pub(crate) fn decode_event(e: &[u8]) -> Event {
        let mut ev = Event::default();
        for (f, w, v) in fields(e) {
            match (f, w) {
                (1, 1) => ev.wall_time = Some(f64::from_le_bytes(v[..8].try_into().unwrap())),
                (2, 0) => ev.step = Some(i64::from_le_bytes(v[..8].try_into().unwrap())),
                (3, 2) => ev.file_version = Some(String::from_utf8(v).unwrap()),
                (5, 2) => {
                    for (vf, vw, value) in fields(&v) {
                        assert_eq!((vf, vw), (1, 2), "Summary.value");
                        let mut tag = None;
                        let mut x = None;
                        for (ff, fw, vv) in fields(&value) {
                            match (ff, fw) {
                                (1, 2) => tag = Some(String::from_utf8(vv).unwrap()),
                                (2, 5) => x = Some(f32::from_le_bytes(vv[..4].try_into().unwrap())),
                                other => panic!("unexpected Value field {other:?}"),
                            }
                        }
                        ev.scalars
                            .push((tag.expect("tag"), x.expect("simple_value")));
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        ev
    }

    /// Every event of an event file, CRCs checked.
    pub(crate) fn read_events(path: &Path) -> Vec<Event> {
        read_records(&std::fs::read(path).unwrap())
            .iter()
            .map(|r| decode_event(r))
            .collect()
    }

    #[test]
    fn event_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let before = wall_time();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("events.out.tfevents.") && name.ends_with(".qtrain"),
            "{name}"
        );
        w.scalars(7, &[("train/loss", 1.5), ("train/lr", 2e-4)])
            .unwrap();
        w.scalars(300, &[("eval/loss", 0.25)]).unwrap();
        // Steps past 2^35 need a 6-byte varint.
        w.scalars(1 << 40, &[("train/loss", f32::NAN)]).unwrap();
        let ev = read_events(w.path());
        assert_eq!(ev.len(), 4);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(ev[0].step, None);
        assert!(ev[0].scalars.is_empty());
        for e in &ev {
            let t = e.wall_time.unwrap();
            assert!(t >= before.floor() && t <= wall_time() + 1.0, "{t}");
        }
        assert_eq!(ev[1].step, Some(7));
        assert_eq!(
            ev[1].scalars,
            vec![
                ("train/loss".to_string(), 1.5),
                ("train/lr".to_string(), 2e-4)
            ]
        );
        assert_eq!(ev[2].step, Some(300));
        assert_eq!(ev[2].scalars, vec![("eval/loss".to_string(), 0.25)]);
        assert_eq!(ev[3].step, Some(1 << 40));
        assert!(ev[3].scalars[0].1.is_nan());
    }

    #[test]
    fn encoding_matches_hand_computed_bytes() {
        // Event{wall_time: 1.0, step: 1, summary{value{tag:"a", simple_value: 1.0}}}
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        // step: key 0x10, 1. summary: key 0x2a, 10 bytes; value: key 0x0a, 8 bytes;
        // tag: key 0x0a, 1 byte "a"; simple_value: key 0x15, 4 bytes.
        want.extend_from_slice(&[0x10, 0x01, 0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&1.0f32.to_le_bytes());
        assert_eq!(encode_scalar_event(1.0, 1, &[("a", 1.0)]), want);
        // Negative int64: ten bytes, all continuation bits but the last.
        let e = encode_scalar_event(0.0, -1, &[]);
        assert_eq!(
            &e[9..20],
            &[0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        let framed = frame_record(b"xyz");
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(&framed[12..15], b"xyz");
    }

    #[test]
    fn a_second_writer_in_the_same_second_does_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path()).unwrap();
        a.scalars(1, &[("train/loss", 1.0)]).unwrap();
        let mut b = EventWriter::create(dir.path()).unwrap();
        b.scalars(2, &[("train/loss", 2.0)]).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(read_events(a.path())[1].step, Some(1));
        assert_eq!(read_events(b.path())[1].step, Some(2));
    }
}
