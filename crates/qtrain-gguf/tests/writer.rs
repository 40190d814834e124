//! The container read back by a small independent parser written from the GGUF v3
//! description: header, every metadata type, tensor infos with aligned offsets, and
//! the data at those offsets; and the writer's refusals.

use qtrain_gguf::{GgmlType, GgufWriter, Metadata, TensorInfo, Value};

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn value(&mut self, ty: u32) -> Value {
        match ty {
            4 => Value::U32(self.u32()),
            5 => Value::I32(self.u32() as i32),
            6 => Value::F32(f32::from_bits(self.u32())),
            7 => Value::Bool(self.take(1)[0] != 0),
            8 => Value::String(self.string()),
            10 => Value::U64(self.u64()),
            9 => {
                let et = self.u32();
                let n = self.u64() as usize;
                match et {
                    8 => Value::ArrayString((0..n).map(|_| self.string()).collect()),
                    6 => Value::ArrayF32((0..n).map(|_| f32::from_bits(self.u32())).collect()),
                    5 => Value::ArrayI32((0..n).map(|_| self.u32() as i32).collect()),
                    t => panic!("array of type {t}"),
                }
            }
            t => panic!("value type {t}"),
        }
    }
}

#[test]
fn written_file_parses_back_with_aligned_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut md = Metadata::new();
    md.set_str("general.architecture", "llama");
    md.set_u32("llama.block_count", 3);
    md.set_f32("llama.rope.freq_base", 1e6);
    md.set_bool("tokenizer.ggml.add_bos_token", true);
    md.set("x.u64", Value::U64(1 << 40));
    md.set("x.i32", Value::I32(-7));
    md.set(
        "tokenizer.ggml.tokens",
        Value::ArrayString(vec!["<s>".into(), "▁a".into(), "".into()]),
    );
    md.set(
        "tokenizer.ggml.scores",
        Value::ArrayF32(vec![0.0, -1.5, 2.25]),
    );
    md.set("tokenizer.ggml.token_type", Value::ArrayI32(vec![3, 1, 5]));
    let tensors = vec![
        // 3 f32 values: 12 bytes, so the next tensor needs 20 bytes of padding.
        TensorInfo::from_torch_shape("a.weight", &[3], GgmlType::F32),
        TensorInfo::from_torch_shape("b.weight", &[2, 64], GgmlType::Q8_0),
        TensorInfo::from_torch_shape("c.weight", &[5, 7], GgmlType::F16),
    ];
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (0..t.nbytes())
                .map(|j| (i * 31 + j as usize) as u8)
                .collect()
        })
        .collect();
    assert_eq!(tensors[1].nbytes(), 2 * 2 * 34);
    assert_eq!(tensors[2].dims, vec![7, 5]);
    let mut w = GgufWriter::create(&path, &md, tensors.clone()).unwrap();
    assert!(path.with_extension("gguf.partial").exists());
    for (t, d) in tensors.iter().zip(&data) {
        w.write_tensor(&t.name, d).unwrap();
    }
    assert!(!path.exists(), "the file appears only when finished");
    w.finish().unwrap();
    assert!(!path.with_extension("gguf.partial").exists());

    let bytes = std::fs::read(&path).unwrap();
    let mut c = Cursor { b: &bytes, at: 0 };
    assert_eq!(c.take(4), b"GGUF");
    assert_eq!(c.u32(), 3);
    assert_eq!(c.u64(), 3);
    assert_eq!(c.u64(), md.entries().len() as u64);
    for (k, v) in md.entries() {
        assert_eq!(&c.string(), k);
        let ty = c.u32();
        assert_eq!(&c.value(ty), v, "{k}");
    }
    let mut offsets = Vec::new();
    for t in &tensors {
        assert_eq!(c.string(), t.name);
        let n = c.u32() as usize;
        let dims: Vec<u64> = (0..n).map(|_| c.u64()).collect();
        assert_eq!(dims, t.dims);
        assert_eq!(c.u32(), t.ty.id());
        let off = c.u64();
        assert_eq!(off % 32, 0, "{} at {off}", t.name);
        offsets.push(off);
    }
    let data_start = c.at.div_ceil(32) * 32;
    assert!(bytes[c.at..data_start].iter().all(|&b| b == 0));
    assert_eq!(offsets, vec![0, 32, 32 + 160]);
    for ((t, d), off) in tensors.iter().zip(&data).zip(&offsets) {
        let at = data_start + *off as usize;
        assert_eq!(&bytes[at..at + d.len()], &d[..], "{}", t.name);
    }
    let end = data_start + offsets[2] as usize + data[2].len();
    assert_eq!(bytes.len(), end.div_ceil(32) * 32);
}

#[test]
fn bad_tensors_and_orders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let md = Metadata::new();
    let q = |name: &str, shape: &[usize]| TensorInfo::from_torch_shape(name, shape, GgmlType::Q4K);
    let e = GgufWriter::create(&path, &md, vec![q("a", &[2, 100])])
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("not a multiple of the q4_K block size 256"),
        "{e}"
    );
    let long = "x".repeat(64);
    let e = GgufWriter::create(&path, &md, vec![q(&long, &[1, 256])])
        .err()
        .unwrap();
    assert!(e.to_string().contains("longer than ggml's 63 bytes"), "{e}");
    let e = GgufWriter::create(&path, &md, vec![q("a", &[1, 256]), q("a", &[1, 256])])
        .err()
        .unwrap();
    assert!(e.to_string().contains("appears twice"), "{e}");

    let mut w = GgufWriter::create(&path, &md, vec![q("a", &[1, 256]), q("b", &[1, 256])]).unwrap();
    let e = w.write_tensor("b", &[0; 144]).unwrap_err();
    assert!(e.to_string().contains("out of order"), "{e}");
    let e = w.write_tensor("a", &[0; 143]).unwrap_err();
    assert!(e.to_string().contains("143 bytes"), "{e}");
    w.write_tensor("a", &[0; 144]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("`b`: never written"), "{e}");
    assert!(!path.exists() && !path.with_extension("gguf.partial").exists());
}
