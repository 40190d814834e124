//! Bit-compatibility with bitsandbytes: `scripts/bnb_fixture.py` ran bitsandbytes
//! 0.50.2 (CUDA, H100) on fixed inputs and stored inputs and outputs in
//! `tests/fixtures/bnb_nf4.safetensors`; here qtrain's implementation must produce
//! the same bytes: packed NF4 codes, absmax (plain and double-quantized), nested
//! absmax, offset, the serialized quant-state JSON, 8-bit blockwise codes and the
//! dynamic maps.

use qtrain_quant::{
    create_dynamic_map, dequantize_blockwise, double_quantize, quantize_blockwise,
    signed_dynamic_map, Absmax, Nf4Tensor, SerDtype,
};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::sync::OnceLock;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/bnb_nf4.safetensors"
);

/// The fixture, read at run time so that a missing file fails these tests with
/// instructions instead of failing the build.
fn fixture() -> SafeTensors<'static> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| {
        std::fs::read(FIXTURE).unwrap_or_else(|e| {
            panic!(
                "{FIXTURE}: {e}. Generate it on a CUDA machine with torch and bitsandbytes \
                 0.50.2: python3 scripts/bnb_fixture.py {FIXTURE}"
            )
        })
    });
    SafeTensors::deserialize(bytes)
        .expect("fixture parses; regenerate it with scripts/bnb_fixture.py")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes<'a>(st: &SafeTensors<'a>, name: &str) -> &'a [u8] {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    t.data()
}

fn shape(st: &SafeTensors, name: &str) -> Vec<usize> {
    st.tensor(name).unwrap().shape().to_vec()
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let st = fixture();
    assert_eq!(create_dynamic_map(true, 7, 8), f32s(&st, "map.signed"));
    assert_eq!(create_dynamic_map(false, 7, 8), f32s(&st, "map.unsigned"));
}

#[test]
fn blockwise_8bit_codes_equal_bitsandbytes() {
    let st = fixture();
    let x = f32s(&st, "bw.input");
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(256)];
    quantize_blockwise(&x, signed_dynamic_map(), 256, &mut q, &mut absmax);
    assert_eq!(absmax, f32s(&st, "bw.absmax"));
    assert_eq!(q.as_slice(), bytes(&st, "bw.q"));
}

#[test]
fn nf4_with_and_without_double_quant_equals_bitsandbytes() {
    let st = fixture();
    for (name, dq) in [("w1", true), ("w2", true), ("w3", false)] {
        let input = f32s(&st, &format!("{name}.input"));
        let shp = shape(&st, &format!("{name}.input"));
        let q = Nf4Tensor::quantize(&input, &shp, 64, dq).unwrap();
        assert_eq!(
            q.packed.as_slice(),
            bytes(&st, &format!("{name}.packed")),
            "{name}: packed codes"
        );
        match &q.absmax {
            Absmax::DoubleQuant(d) => {
                assert_eq!(
                    vec![d.offset],
                    f32s(&st, &format!("{name}.offset")),
                    "{name}: offset"
                );
                assert_eq!(
                    d.quantized.as_slice(),
                    bytes(&st, &format!("{name}.absmax")),
                    "{name}: absmax codes"
                );
                assert_eq!(
                    d.nested_absmax,
                    f32s(&st, &format!("{name}.nested_absmax")),
                    "{name}: nested absmax"
                );
                assert_eq!(
                    d.nested_code,
                    f32s(&st, &format!("{name}.nested_quant_map")),
                    "{name}: nested map"
                );
            }
            Absmax::F32(a) => {
                assert_eq!(a, &f32s(&st, &format!("{name}.absmax")), "{name}: absmax")
            }
        }
        assert_eq!(
            q.dequantize_to_vec(),
            f32s(&st, &format!("{name}.dequantized")),
            "{name}: dequantized"
        );

        // The serialized entries carry the same bytes bitsandbytes wrote, the JSON
        // included (the fixture's inputs were f32, so its dtype is "float32").
        for e in q.to_bnb_entries(name, "float32") {
            let key = if e.name == name {
                format!("{name}.packed")
            } else {
                e.name.clone()
            };
            assert_eq!(e.bytes.as_slice(), st.tensor(&key).unwrap().data(), "{key}");
        }
    }
}

/// The double-quantization stage on 2,560 to 65,536 blocks: the offset
/// (torch's CUDA `absmax.mean()`), the 8-bit absmax codes and the nested absmax.
#[test]
fn double_quant_of_larger_tensors_equals_bitsandbytes() {
    let st = fixture();
    for n in [2560, 16384, 65536] {
        let absmax = f32s(&st, &format!("dq{n}.absmax_f32"));
        assert_eq!(absmax.len(), n);
        let d = double_quantize(&absmax);
        assert_eq!(
            d.offset.to_bits(),
            f32s(&st, &format!("dq{n}.offset"))[0].to_bits(),
            "dq{n}: offset"
        );
        assert_eq!(
            d.quantized.as_slice(),
            bytes(&st, &format!("dq{n}.absmax")),
            "dq{n}: absmax codes"
        );
        assert_eq!(
            d.nested_absmax,
            f32s(&st, &format!("dq{n}.nested_absmax")),
            "dq{n}: nested absmax"
        );
    }
}

#[test]
fn reads_bitsandbytes_entries() {
    let st = fixture();
    let q = Nf4Tensor::from_bnb_entries("w1", |k| {
        let key = if k == "w1" { "w1.packed" } else { k };
        let t = st.tensor(key).ok()?;
        let dtype = match t.dtype() {
            safetensors::Dtype::U8 => SerDtype::U8,
            safetensors::Dtype::F32 => SerDtype::F32,
            _ => return None,
        };
        // bitsandbytes stores the packed weight as [n/2, 1]; the fixture flattened it.
        Some((dtype, t.shape().to_vec(), Cow::Borrowed(t.data())))
    })
    .unwrap();
    assert_eq!(q.shape, vec![128, 320]);
    assert_eq!(q.dequantize_to_vec(), f32s(&st, "w1.dequantized"));
    let mut back = vec![0f32; 1000];
    dequantize_blockwise(
        bytes(&st, "bw.q"),
        &f32s(&st, "bw.absmax"),
        signed_dynamic_map(),
        256,
        &mut back,
    );
    assert!(back
        .iter()
        .zip(f32s(&st, "bw.input"))
        .all(|(a, b)| (a - b).abs() < 0.1));
}
