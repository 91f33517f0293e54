//! Property tests ("fuzzing" on stable Rust) of everything that parses outside input: the
//! checkpoint readers (arbitrary bytes, forged headers, mutated checkpoints; torch.save archives
//! damaged or with hostile pickles), the precision
//! parser (`FromStr`, `TryFrom<i64>`) and the GradScaler state JSON (`from_json`, then
//! `load_state_dict`). Each target must never panic, and what it accepts must make sense.
//!
//! `PROPTEST_CASES` sets the number of cases per target (proptest's default, 256, in a plain
//! `cargo test`; `.ci/run` runs 10,000). Run with `--nocapture` to see the counts.
mod common;

use common::{same, weights};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::Cell;
use tch::{nn, Device};
use tch_fabric::{scaler::GradScalerState, Fabric, GradScaler, GradScalerConfig, Precision};

fn runner() -> (TestRunner, u32) {
    let config = Config {
        // A failure prints its (shrunk) input; there is no source file to keep it next to.
        failure_persistence: None,
        ..Config::default()
    };
    let cases = config.cases;
    (TestRunner::new(config), cases)
}

/// A checkpoint of a small 16-mixed model with a scaler and a user state.
fn checkpoint(dir: &std::path::Path) -> (Fabric, nn::VarStore, Vec<u8>) {
    let f = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .build()
        .unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = nn::linear(vs.root() / "l1", 3, 2, Default::default());
    let opt = tch_fabric::FusedAdamW::new(&vs, 1e-3).unwrap();
    let _ = f.setup(m, &mut vs, opt).unwrap();
    let path = dir.join("good.safetensors");
    f.save(&path, &("epoch", 4u32)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (f, vs, bytes)
}

/// Ways to damage a file: flip bits, overwrite, insert, delete, truncate, append.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Append(Vec<u8>),
    /// One of the header's padding spaces becomes other JSON whitespace: harmless.
    Whitespace(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        1 => (any::<usize>(), prop_oneof![Just(b'\t'), Just(b'\n'), Just(b'\r')])
            .prop_map(|(i, c)| Mutation::Whitespace(i, c)),
    ]
}

/// The header length a file declares (0 when it is too short to declare one).
fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i, mask) => bytes[i % len] ^= mask,
        Mutation::Set(i, b) => bytes[i % len] = *b,
        Mutation::Insert(i, b) => {
            let at = i % (len + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let at = i % len;
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => bytes.truncate(i % len),
        Mutation::Append(b) => bytes.extend_from_slice(b),
        Mutation::Whitespace(i, c) => {
            let spaces: Vec<usize> = (8..len.min(8 + header_len(bytes)))
                .filter(|&k| bytes[k] == b' ')
                .collect();
            if !spaces.is_empty() {
                bytes[spaces[i % spaces.len()]] = *c;
            }
        }
    }
}

/// A safetensors header written by hand: random dtypes, shapes, offsets and metadata, some of
/// them valid, followed by random data; the length prefix is right, so the parser goes past it.
fn forged() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("F64"),
        Just("I64"),
        Just("U8"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("U64"),
        Just("X"),
    ];
    let dim = prop_oneof![
        0u64..5,
        Just(u64::MAX),
        Just(1 << 62),
        Just(i64::MAX as u64 + 1)
    ];
    let tensor = (
        "[a-z.]{0,8}",
        dtype,
        prop::collection::vec(dim, 0..4),
        0u64..64,
        0u64..64,
    );
    let meta = prop_oneof![
        Just(String::new()),
        Just(r#""__metadata__":{"tch_fabric.format":"2"},"#.to_string()),
        Just(r#""__metadata__":{"tch_fabric.format":"1","tch_fabric.precision":"32-true","tch_fabric.state":"null"},"#.to_string()),
        Just(r#""__metadata__":{"tch_fabric.format":"2","tch_fabric.precision":"32-true","tch_fabric.state":"1","tch_fabric.checksums":"{\"algorithm\":\"crc32\",\"header\":0,\"tensors\":{}}"},"#.to_string()),
        Just(r#""__metadata__":5,"#.to_string()),
    ];
    (
        meta,
        prop::collection::vec(tensor, 0..3),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(meta, tensors, data)| {
            let entries: Vec<String> = tensors
                .iter()
                .map(|(name, dtype, shape, a, b)| {
                    format!(
                        r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{a},{b}]}}"#
                    )
                })
                .collect();
            let header = format!("{{{meta}{}}}", entries.join(","));
            let header = header.replace(",}", "}");
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&data);
            bytes
        })
}

/// One input of the checkpoint reader.
#[derive(Debug, Clone)]
enum Input {
    Raw(Vec<u8>),
    Forged(Vec<u8>),
    Mutated(Vec<Mutation>),
}

#[test]
fn fuzz_the_checkpoint_reader() {
    let dir = std::env::temp_dir().join(format!("tch-fabric-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (f, vs, good) = checkpoint(&dir);
    let saved = weights(&vs);
    let path = dir.join("case.safetensors");
    let input = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::Raw),
        2 => forged().prop_map(Input::Forged),
        4 => prop::collection::vec(mutation(), 1..4).prop_map(Input::Mutated),
    ];
    let (mut runner, cases) = runner();
    let (refused, loaded) = (Cell::new(0u32), Cell::new(0u32));
    runner
        .run(&input, |input| {
            let bytes = match &input {
                Input::Raw(b) | Input::Forged(b) => b.clone(),
                Input::Mutated(ms) => {
                    let mut b = good.clone();
                    for m in ms {
                        if !b.is_empty() {
                            apply(&mut b, m);
                        }
                    }
                    b
                }
            };
            std::fs::write(&path, &bytes).unwrap();
            match f.load::<(String, u32)>(&path) {
                Err(_) => refused.set(refused.get() + 1),
                Ok(state) => {
                    // Only the checkpoint itself, or a change the format ignores (JSON
                    // whitespace), loads; and then it restores exactly what was saved.
                    prop_assert_eq!(state, ("epoch".to_string(), 4));
                    prop_assert!(same(&weights(&vs), &saved), "loaded altered weights");
                    loaded.set(loaded.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "checkpoint reader: {cases} cases, 0 panics ({} refused, {} loaded the saved content)",
        refused.get(),
        loaded.get()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_the_precision_parser() {
    let text = prop_oneof![
        "\\PC{0,12}",
        "[0-9a-z-]{0,10}",
        Just("bf16-mixed".to_string()),
        Just("16".to_string()),
        Just(" 32-true".to_string()),
    ];
    let input = (text, any::<i64>(), -100i64..100);
    let (mut runner, cases) = runner();
    let accepted = Cell::new(0u32);
    runner
        .run(&input, |(s, big, small)| {
            if let Ok(p) = s.parse::<Precision>() {
                // Whatever parses prints as a canonical value that parses back to itself.
                prop_assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
                accepted.set(accepted.get() + 1);
            }
            for n in [big, small] {
                if let Ok(p) = Precision::try_from(n) {
                    prop_assert!(matches!(n, 16 | 32 | 64), "{} accepted as {}", n, p);
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "precision parser: {cases} cases (a string and two integers each), 0 panics ({} strings accepted)",
        accepted.get()
    );
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            Just(0.0),
            Just(-1.0),
            Just(0.5),
            Just(2.0),
            Just(1e308),
            Just(f64::MIN_POSITIVE),
            Just(65536.0)
        ]
        .prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn fuzz_the_grad_scaler_state() {
    let key = prop_oneof![
        Just("scale"),
        Just("growth_factor"),
        Just("backoff_factor"),
        Just("growth_interval"),
        Just("_growth_tracker"),
        Just("other"),
    ];
    let object = prop::collection::btree_map(key.prop_map(String::from), json_value(), 0..6)
        .prop_map(|m| serde_json::to_string(&m).unwrap());
    // Every key, each with a value at or near the edges of its range.
    let float = |v: &'static [f64]| prop::sample::select(v);
    let int = |v: &'static [i64]| prop::sample::select(v);
    let complete = (
        float(&[65536.0, 1.0, 0.0, -1.0, 1e308, 1e-300, 0.5]),
        float(&[2.0, 1.0, 1.5, 0.5, 1e308]),
        float(&[0.5, 1.0, 0.0, 2.0, 1e-300]),
        int(&[2000, 1, 0, -1, i64::MAX]),
        int(&[0, 17, -1, i64::MAX, i64::MIN]),
    )
        .prop_map(|(s, g, b, i, t)| {
            format!(
                r#"{{"scale":{s:?},"growth_factor":{g:?},"backoff_factor":{b:?},"growth_interval":{i},"_growth_tracker":{t}}}"#
            )
        });
    let input = prop_oneof![
        3 => object,
        3 => complete,
        1 => "\\PC{0,40}",
        1 => json_value().prop_map(|v| v.to_string())
    ];
    let (mut runner, cases) = runner();
    let loaded = Cell::new(0u32);
    runner
        .run(&input, |json| {
            let Ok(state) = GradScalerState::from_json(&json) else {
                return Ok(());
            };
            let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
            let checked = scaler.check_state_dict(&state);
            let before = scaler.state_dict().unwrap();
            match scaler.load_state_dict(&state) {
                Ok(()) => {
                    prop_assert!(checked.is_ok(), "check refused what load accepted");
                    let s = scaler.get_scale().unwrap();
                    prop_assert!(s.is_finite() && s > 0.0, "loaded scale {}", s);
                    // The state round-trips through its JSON.
                    let again = GradScalerState::from_json(&scaler.state_dict().unwrap().to_json());
                    prop_assert!(again.is_ok());
                    loaded.set(loaded.get() + 1);
                }
                Err(_) => {
                    prop_assert!(checked.is_err(), "check accepted what load refused");
                    prop_assert_eq!(
                        scaler.state_dict().unwrap(),
                        before,
                        "a refused load changed the scaler"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "scaler state JSON: {cases} cases, 0 panics ({} loaded)",
        loaded.get()
    );
}

/// A torch.save archive rebuilt with its entries' checksums right: what a hostile (rather than
/// damaged) file looks like, since the CRC-32 check catches mere damage.
fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        w.start_file(name.as_str(), stored).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// One input of the torch.save reader.
#[derive(Debug, Clone)]
enum TorchInput {
    /// Random bytes behind a zip's magic number (so the torch.save reader takes them).
    Raw(Vec<u8>),
    /// The file with bytes changed: the zip's structure or an entry's content (CRC-32 wrong).
    Mutated(Vec<Mutation>),
    /// `data.pkl` changed, the archive rebuilt with checksums that match: hostile pickles for
    /// the rewriter and libtorch's Unpickler.
    Repickled(Vec<Mutation>),
}

#[test]
fn fuzz_the_torch_save_reader() {
    let dir = std::env::temp_dir().join(format!("tch-fabric-fuzz-pt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (f, vs, _) = checkpoint(&dir);
    let good_path = dir.join("good.pt");
    let epoch = std::collections::BTreeMap::from([("epoch".to_string(), 4u32)]);
    f.save(&good_path, &epoch).unwrap();
    let good = std::fs::read(&good_path).unwrap();
    let saved = weights(&vs);
    let entries: Vec<(String, Vec<u8>)> = {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(good.clone())).unwrap();
        (0..z.len())
            .map(|i| {
                let mut e = z.by_index(i).unwrap();
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
                (e.name().to_string(), bytes)
            })
            .collect()
    };
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("/data.pkl"))
        .unwrap();
    let path = dir.join("case.pt");
    let input = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(TorchInput::Raw),
        3 => prop::collection::vec(mutation(), 1..4).prop_map(TorchInput::Mutated),
        4 => prop::collection::vec(mutation(), 1..4).prop_map(TorchInput::Repickled),
    ];
    let (mut runner, cases) = runner();
    let (refused, loaded, other) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    runner
        .run(&input, |input| {
            let bytes = match &input {
                TorchInput::Raw(b) => [&b"PK\x03\x04"[..], b].concat(),
                TorchInput::Mutated(ms) => {
                    let mut b = good.clone();
                    for m in ms {
                        // A truncation may have emptied it: nothing left to change.
                        if !b.is_empty() {
                            apply(&mut b, m);
                        }
                    }
                    b
                }
                TorchInput::Repickled(ms) => {
                    let mut e = entries.clone();
                    for m in ms {
                        if !e[pkl].1.is_empty() {
                            apply(&mut e[pkl].1, m);
                        }
                    }
                    rezip(&e)
                }
            };
            std::fs::write(&path, &bytes).unwrap();
            if let TorchInput::Repickled(_) = input {
                // A valid pickle may say something else (another epoch, another number): it
                // must read or be refused, never crash; the model is left out of it.
                match tch_fabric::checkpoint::inspect(&path) {
                    Ok(_) => other.set(other.get() + 1),
                    Err(_) => refused.set(refused.get() + 1),
                }
                return Ok(());
            }
            match f.load::<std::collections::BTreeMap<String, u32>>(&path) {
                Err(_) => refused.set(refused.get() + 1),
                Ok(state) => {
                    // Damage the checksums do not cover (the zip's own padding and directory
                    // fields libtorch ignores) loads exactly what was saved.
                    prop_assert_eq!(&state, &epoch);
                    prop_assert!(same(&weights(&vs), &saved), "loaded altered weights");
                    loaded.set(loaded.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "torch.save reader: {cases} cases, 0 panics ({} refused, {} loaded the saved content, \
         {} rewritten pickles read)",
        refused.get(),
        loaded.get(),
        other.get()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
