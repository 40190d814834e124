//! TensorBoard event files written by hand: TFRecord framing around hand-encoded
//! `Event` protobufs carrying scalar summaries. No protobuf or TensorFlow
//! dependency; the format is small and stable:
//!
//! - record: `u64 length (LE) | masked crc32c(length) | data | masked crc32c(data)`
//! - `Event { wall_time: double = 1; step: int64 = 2; file_version: string = 3;
//!   summary: Summary = 5 }`, `Summary { repeated Value value = 1 }`,
//!   `Value { tag: string = 1; simple_value: float = 2 }`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise: the event files are tiny, speed does not matter.
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

/// TFRecord's masking of CRCs stored next to data.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, b: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// Encodes an `Event` with wall time, step and either a file version or scalars.
pub fn encode_event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            key(2, 5, &mut v);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

/// An open event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<secs>.<host>.qtrain` with the version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = wall_time();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.qtrain", now as u64));
        let mut w = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        w.write_record(&encode_event(now, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends scalars for `step` and flushes (a crash loses nothing written).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> std::io::Result<()> {
        self.write_record(&encode_event(wall_time(), step as i64, None, values))
    }

    fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())?;
        self.out.flush()
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 test vector: 32 bytes of zeros -> 0x8A9136AA; "123456789" -> 0xE3069283.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// Reads back records, checking both CRCs; returns the raw event payloads.
    pub(crate) fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let len_b = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_b.try_into().unwrap()) as usize;
            let lc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(lc, masked_crc(len_b), "length crc");
            let data = &bytes[i + 12..i + 12 + len];
            let dc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(dc, masked_crc(data), "data crc");
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    /// Pulls (step, tag, value) triples out of an encoded scalar event.
    pub(crate) fn decode_scalars(e: &[u8]) -> (i64, Vec<(String, f32)>) {
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
        fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
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
                    _ => panic!("wire type {w}"),
                };
                out.push((f, v));
            }
            out
        }
        let mut step = 0;
        let mut vals = Vec::new();
        for (f, v) in fields(e) {
            match f {
                2 => step = i64::from_le_bytes(v[..8].try_into().unwrap()),
                5 => {
                    for (_, value) in fields(&v) {
                        let mut tag = String::new();
                        let mut x = 0f32;
                        for (vf, vv) in fields(&value) {
                            match vf {
                                1 => tag = String::from_utf8(vv).unwrap(),
                                2 => x = f32::from_le_bytes(vv[..4].try_into().unwrap()),
                                _ => {}
                            }
                        }
                        vals.push((tag, x));
                    }
                }
                _ => {}
            }
        }
        (step, vals)
    }

    #[test]
    fn event_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss", 1.5), ("train/lr", 2e-4)])
            .unwrap();
        w.scalars(300, &[("eval/loss", 0.25)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let recs = read_records(&bytes);
        assert_eq!(recs.len(), 3);
        assert!(recs[0].windows(13).any(|x| x == b"brain.Event:2"));
        assert_eq!(
            decode_scalars(&recs[1]),
            (
                7,
                vec![
                    ("train/loss".to_string(), 1.5),
                    ("train/lr".to_string(), 2e-4)
                ]
            )
        );
        assert_eq!(
            decode_scalars(&recs[2]),
            (300, vec![("eval/loss".to_string(), 0.25)])
        );
    }
}
