//! The crate's one table of dtypes: each tch [`Kind`] with c10's `ScalarType` number (what the
//! shim takes), its safetensors dtype (what checkpoints store), PyTorch's name (what messages
//! say) and whether it is a floating type. tch keeps its own c10 conversion private, so every
//! place that needs one of these reads it here.
use safetensors::Dtype;
use tch::Kind;

/// One dtype as every layer of the crate names it.
struct Entry {
    kind: Kind,
    /// c10's `ScalarType` number (`c10/core/ScalarType.h`).
    c10: i32,
    /// How safetensors stores it (`None`: checkpoints cannot hold it).
    safetensors: Option<Dtype>,
    /// PyTorch's name (`torch.float32` without the prefix).
    name: &'static str,
    /// Whether it is a real floating type that precisions convert (float8 is, but nothing
    /// converts parameters to it: see [`is_float`]).
    floating: bool,
}

const fn entry(
    kind: Kind,
    c10: i32,
    safetensors: Option<Dtype>,
    name: &'static str,
    floating: bool,
) -> Entry {
    Entry {
        kind,
        c10,
        safetensors,
        name,
        floating,
    }
}

const TABLE: [Entry; 20] = [
    entry(Kind::Uint8, 0, Some(Dtype::U8), "uint8", false),
    entry(Kind::Int8, 1, Some(Dtype::I8), "int8", false),
    entry(Kind::Int16, 2, Some(Dtype::I16), "int16", false),
    entry(Kind::Int, 3, Some(Dtype::I32), "int32", false),
    entry(Kind::Int64, 4, Some(Dtype::I64), "int64", false),
    entry(Kind::Half, 5, Some(Dtype::F16), "float16", true),
    entry(Kind::Float, 6, Some(Dtype::F32), "float32", true),
    entry(Kind::Double, 7, Some(Dtype::F64), "float64", true),
    entry(Kind::ComplexHalf, 8, None, "complex32", false),
    entry(Kind::ComplexFloat, 9, None, "complex64", false),
    entry(Kind::ComplexDouble, 10, None, "complex128", false),
    entry(Kind::Bool, 11, Some(Dtype::BOOL), "bool", false),
    entry(Kind::QInt8, 12, None, "qint8", false),
    entry(Kind::QUInt8, 13, None, "quint8", false),
    entry(Kind::QInt32, 14, None, "qint32", false),
    entry(Kind::BFloat16, 15, Some(Dtype::BF16), "bfloat16", true),
    entry(
        Kind::Float8e5m2,
        23,
        Some(Dtype::F8_E5M2),
        "float8_e5m2",
        false,
    ),
    entry(
        Kind::Float8e4m3fn,
        24,
        Some(Dtype::F8_E4M3),
        "float8_e4m3fn",
        false,
    ),
    entry(Kind::Float8e5m2fnuz, 25, None, "float8_e5m2fnuz", false),
    entry(Kind::Float8e4m3fnuz, 26, None, "float8_e4m3fnuz", false),
];

fn of(kind: Kind) -> &'static Entry {
    // Every Kind has a row (checked by the test below), so the fallback is never taken.
    TABLE.iter().find(|e| e.kind == kind).unwrap_or(&TABLE[6])
}

/// c10's `ScalarType` number of `kind`.
pub(crate) fn c10(kind: Kind) -> i32 {
    of(kind).c10
}

/// The tch [`Kind`] of a c10 `ScalarType` number (`None` for one tch does not know).
pub(crate) fn from_c10(scalar_type: i32) -> Option<Kind> {
    TABLE.iter().find(|e| e.c10 == scalar_type).map(|e| e.kind)
}

/// How safetensors stores `kind` (`None`: checkpoints cannot hold it).
pub(crate) fn to_safetensors(kind: Kind) -> Option<Dtype> {
    of(kind).safetensors
}

/// The [`Kind`] of a safetensors dtype (`None`: not one tch-fabric reads).
pub(crate) fn from_safetensors(dtype: Dtype) -> Option<Kind> {
    TABLE
        .iter()
        .find(|e| e.safetensors == Some(dtype))
        .map(|e| e.kind)
}

/// PyTorch's name of `kind` (`float32`, `bfloat16`, ...).
pub(crate) fn name(kind: Kind) -> &'static str {
    of(kind).name
}

/// Whether `kind` is one of the floating types parameters are kept in and precisions convert
/// between: float16, bfloat16, float32, float64.
pub(crate) fn is_float(kind: Kind) -> bool {
    of(kind).floating
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row_and_the_numbers_round_trip() {
        for (i, e) in TABLE.iter().enumerate() {
            assert_eq!(TABLE.iter().filter(|o| o.kind == e.kind).count(), 1);
            assert_eq!(from_c10(c10(e.kind)), Some(e.kind), "row {i}");
            if let Some(d) = e.safetensors {
                assert_eq!(from_safetensors(d), Some(e.kind));
            }
        }
        assert_eq!(from_c10(-1), None);
        assert_eq!(name(Kind::BFloat16), "bfloat16");
        assert!(is_float(Kind::Half) && !is_float(Kind::Int64) && !is_float(Kind::Float8e4m3fn));
    }
}
