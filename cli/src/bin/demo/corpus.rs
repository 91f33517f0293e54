//! The demo's text: a corpus generated deterministically (so the repository ships no data
//! and every machine trains on the same bytes), or the user's own file.
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// splitmix64: a tiny deterministic generator (the same on every platform).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0, which has no such number, instead of a division
    /// by zero).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len())]
    }
}

const ADJ: &[&str] = &[
    "quick", "lazy", "small", "bright", "quiet", "brave", "old", "young", "clever", "gentle",
];
const NOUN: &[&str] = &[
    "fox", "dog", "cat", "bird", "robot", "river", "teacher", "farmer", "engine", "garden",
];
const VERB: &[&str] = &[
    "sees", "follows", "helps", "finds", "watches", "builds", "paints", "carries", "greets",
];

/// About `bytes` bytes of text: sentences from a small grammar and arithmetic facts, whose
/// regularities a small model can learn in a minute (the sums are right, so the digits after
/// `=` are predictable).
pub fn generated(bytes: usize) -> String {
    let mut rng = Rng::new(0x7C4_FAB1C);
    let mut out = String::with_capacity(bytes + 64);
    while out.len() < bytes {
        if rng.below(3) == 0 {
            let (a, b) = (rng.below(50), rng.below(50));
            out.push_str(&format!("{a}+{b}={}. ", a + b));
        } else {
            let s = format!(
                "the {} {} {} the {} {}. ",
                rng.pick(ADJ),
                rng.pick(NOUN),
                rng.pick(VERB),
                rng.pick(ADJ),
                rng.pick(NOUN)
            );
            out.push_str(&s);
        }
        if rng.below(8) == 0 {
            out.push('\n');
        }
    }
    out
}

/// A corpus as token ids over its own character vocabulary.
#[derive(Debug)]
pub struct Corpus {
    pub vocab: Vec<char>,
    pub ids: Vec<i64>,
    /// A fingerprint of the text, so a checkpoint is not resumed on other data.
    pub fingerprint: u64,
}

impl Corpus {
    pub fn from_text(text: &str, min_len: usize) -> Result<Corpus> {
        if text.trim().is_empty() {
            bail!("the text is empty");
        }
        let vocab: Vec<char> = text.chars().collect::<BTreeSet<_>>().into_iter().collect();
        let ids: Vec<i64> = text
            .chars()
            .map(|c| vocab.binary_search(&c).expect("in vocab") as i64)
            .collect();
        if ids.len() < min_len {
            bail!(
                "the text has {} characters; at least {min_len} are needed for this block size \
                 (use a longer file or a smaller --block)",
                ids.len()
            );
        }
        let mut h = Rng::new(ids.len() as u64);
        let mut fingerprint = 0u64;
        for &i in &ids {
            fingerprint = fingerprint.rotate_left(5) ^ (i as u64) ^ h.next_u64();
        }
        Ok(Corpus {
            vocab,
            ids,
            fingerprint,
        })
    }

    /// Reads a UTF-8 text file of at most `max_bytes` (a FIFO, a device or a larger file is
    /// refused before reading, so that nothing reads forever or without bound).
    pub fn load(path: &Path, min_len: usize, max_bytes: u64) -> Result<Corpus> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        if meta.len() > max_bytes {
            bail!(
                "{} has {} bytes; at most {max_bytes} are read",
                path.display(),
                meta.len()
            );
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                use std::io::Read;
                f.take(max_bytes + 1).read_to_end(&mut bytes)
            })
            .with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.len() as u64 > max_bytes {
            bail!("{} grew past {max_bytes} bytes while read", path.display());
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
        Corpus::from_text(&text, min_len).with_context(|| format!("{}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_corpus_is_deterministic_and_learnable() {
        let a = generated(10_000);
        assert_eq!(a, generated(10_000));
        assert!(a.len() >= 10_000);
        assert!(a.contains("the ") && a.contains('='));
        let c = Corpus::from_text(&a, 100).unwrap();
        assert!(c.vocab.len() < 60, "a small character vocabulary");
        assert_eq!(c.ids.len(), a.chars().count());
    }

    #[test]
    fn bad_texts_are_refused() {
        assert!(Corpus::from_text("", 10)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(Corpus::from_text("  \n", 10).is_err());
        assert!(Corpus::from_text("abc", 10)
            .unwrap_err()
            .to_string()
            .contains("at least 10"));
        let dir = std::env::temp_dir();
        let missing = dir.join("tch-fabric-no-such-file.txt");
        let e = Corpus::load(&missing, 10, 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
        let bin = dir.join(format!("tch-fabric-binary-{}.txt", std::process::id()));
        std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
        assert!(format!("{:#}", Corpus::load(&bin, 1, 1 << 20).unwrap_err()).contains("not UTF-8"));
        assert!(format!("{:#}", Corpus::load(&bin, 1, 2).unwrap_err()).contains("at most 2"));
        let dev = Corpus::load(Path::new("/dev/zero"), 1, 1 << 20).unwrap_err();
        assert!(format!("{dev:#}").contains("not a regular file"), "{dev:#}");
        let _ = std::fs::remove_file(bin);
    }
}
