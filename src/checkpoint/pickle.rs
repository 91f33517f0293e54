//! The one change a Python `data.pkl` needs before libtorch's Unpickler can read it:
//! `collections.OrderedDict` (every `state_dict()`) becomes a plain dict.
//!
//! libtorch's Unpickler hard-wires `OrderedDict()` to None (it expects one only as a tensor's
//! empty backward hooks), so the `SETITEMS` that fills a state_dict then fails an internal
//! assert; it also knows no `POP`, and `BUILD` only on its own classes. So [`rewrite`] walks the
//! opcodes, tracking what each stack entry is (not its value), and:
//!
//! - replaces `GLOBAL collections OrderedDict` (and each later `BINGET` of it) by `EMPTY_DICT`,
//!   and drops the `EMPTY_TUPLE REDUCE` that calls it: the new dict stands for the instance;
//! - turns `<state> BUILD` on such a dict (a state_dict's `_metadata` attribute) into
//!   `<BUILD_KEY> <state> SETITEM`, an entry [`BUILD_KEY`] that the reader then drops;
//! - refuses every other global that is not a tensor rebuild or a storage class: Python
//!   objects that `torch.load(weights_only=True)` would refuse too, named in the error.
//!
//! Everything else is copied byte for byte, so memo indices keep their meaning.

/// The key under which a rewritten OrderedDict keeps its `BUILD` state (its `_metadata`): it
/// starts with a NUL, which no Python identifier (hence no module or parameter name) contains.
pub(crate) const BUILD_KEY: &str = "\u{0}tch_fabric.build_state";

/// What the walk knows about a stack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A MARK (pickle keeps marks on the stack).
    Mark,
    /// The `collections.OrderedDict` class.
    OrderedDictClass,
    /// An `OrderedDict` instance, now a dict.
    OrderedDict,
    /// `()`.
    EmptyTuple,
    Other,
}

/// A stack entry: its kind and where its bytes start in the output (where a key is inserted
/// before a BUILD state).
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: Kind,
    start: usize,
}

const EMPTY_DICT: u8 = b'}';
const SETITEM: u8 = b's';
const BINUNICODE: u8 = b'X';

/// How an opcode's argument is laid out.
enum Arg {
    None,
    Fixed(usize),
    /// A little-endian length of this many bytes, then that many bytes.
    Counted(usize),
    /// Newline-terminated lines.
    Lines(usize),
}

/// The argument layout of every opcode of protocols 0-5, or `None` for an unknown byte.
fn arg_of(op: u8) -> Option<Arg> {
    Some(match op {
        b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'R' | b'a' | b'b' | b'd' | b'}'
        | b'e' | b'l' | b']' | b'o' | b's' | b't' | b')' | b'u' | 0x81 | 0x85 | 0x86 | 0x87
        | 0x88 | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 | 0x93 | 0x94 | 0x97 | 0x98 => Arg::None,
        b'F' | b'I' | b'L' | b'P' | b'S' | b'V' | b'g' | b'p' => Arg::Lines(1),
        b'c' | b'i' => Arg::Lines(2),
        b'K' | b'h' | b'q' | 0x80 | 0x82 => Arg::Fixed(1),
        b'M' | 0x83 => Arg::Fixed(2),
        b'J' | b'j' | b'r' | 0x84 => Arg::Fixed(4),
        b'G' | 0x95 => Arg::Fixed(8),
        b'T' | b'X' | b'B' | 0x8b => Arg::Counted(4),
        b'U' | b'C' | 0x8a | 0x8c => Arg::Counted(1),
        0x8d | 0x8e | 0x96 => Arg::Counted(8),
        _ => return None,
    })
}

/// Globals that a state dict may name: tensor rebuilds and storage classes (which libtorch's
/// Unpickler resolves itself), the OrderedDict this module rewrites, and the type tags of
/// files written by libtorch's own pickler.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_parameter"),
        "torch" => name.ends_with("Storage"),
        "torch.jit._pickle" => true,
        _ => false,
    }
}

struct Walk<'a> {
    input: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    stack: Vec<Entry>,
    memo: std::collections::HashMap<u64, Kind>,
}

impl<'a> Walk<'a> {
    fn pop(&mut self) -> Result<Entry, String> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }

    /// Pops through the topmost MARK and returns the MARK's entry.
    fn pop_mark(&mut self) -> Result<Entry, String> {
        loop {
            let e = self.pop()?;
            if e.kind == Kind::Mark {
                return Ok(e);
            }
        }
    }

    fn top(&self) -> Result<Entry, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("empty stack at byte {}", self.pos))
    }

    fn push(&mut self, kind: Kind, start: usize) {
        self.stack.push(Entry { kind, start });
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let input = self.input;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= input.len())
            .ok_or_else(|| "the pickle ends in the middle of an opcode".to_string())?;
        let s = &input[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn line(&mut self) -> Result<&'a [u8], String> {
        let input = self.input;
        let rest = &input[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| "the pickle ends in the middle of a line argument".to_string())?;
        let s = &input[self.pos..self.pos + n];
        self.pos += n + 1;
        Ok(s)
    }

    fn uint(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// The memo index of a GET/PUT: a decimal line (protocol 0's `g`/`p`) or the binary argument.
fn memo_index(text: bool, argument: &[u8], binary: u64) -> Result<u64, String> {
    if !text {
        return Ok(binary);
    }
    String::from_utf8_lossy(argument)
        .trim()
        .parse::<u64>()
        .map_err(|_| "a bad memo index".to_string())
}

/// `data.pkl` of a torch.save archive, rewritten for libtorch's Unpickler (see the module
/// documentation), or the reason it cannot be read.
pub(crate) fn rewrite(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut w = Walk {
        input,
        pos: 0,
        out: Vec::with_capacity(input.len() + 64),
        stack: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let input = w.input;
    loop {
        let op_pos = w.pos;
        let op = *w
            .input
            .get(w.pos)
            .ok_or_else(|| "the pickle ends without a STOP opcode".to_string())?;
        w.pos += 1;
        let arg_start = w.pos;
        let (mut argument, mut int_arg): (&[u8], u64) = (&[], 0);
        match arg_of(op).ok_or_else(|| format!("unknown opcode 0x{op:02x} at byte {op_pos}"))? {
            Arg::None => {}
            Arg::Fixed(n) => {
                argument = w.take(n)?;
                int_arg = Walk::uint(argument);
            }
            Arg::Counted(n) => {
                let len = Walk::uint(w.take(n)?);
                let len = usize::try_from(len).map_err(|_| "a length out of range".to_string())?;
                argument = w.take(len)?;
            }
            Arg::Lines(n) => {
                for _ in 0..n {
                    w.line()?;
                }
                argument = &input[arg_start..w.pos];
            }
        }
        let start = w.out.len();
        let raw = &input[op_pos..w.pos];
        // What to emit instead of `raw`, if anything.
        let mut replaced: Option<Vec<u8>> = None;
        match op {
            b'.' => {
                w.out.extend_from_slice(raw);
                return Ok(w.out);
            }
            // FRAME: a hint that the copy would make wrong; dropped.
            0x95 => replaced = Some(Vec::new()),
            b'c' => {
                let text = String::from_utf8_lossy(argument);
                let mut parts = text.split('\n');
                let (module, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if !allowed_global(module, name) {
                    return Err(format!(
                        "it holds a Python object ({module}.{name}) that torch.load(weights_only=True) \
                         refuses too; only tensors, numbers, strings, lists, tuples and dicts load"
                    ));
                }
                if (module, name) == ("collections", "OrderedDict") {
                    replaced = Some(vec![EMPTY_DICT]);
                    w.push(Kind::OrderedDictClass, start);
                } else {
                    w.push(Kind::Other, start);
                }
            }
            // STACK_GLOBAL (protocol 4): the module and name are on the stack as strings; this
            // walk does not track values, so it cannot vet them.
            0x93 => {
                return Err(
                    "it uses pickle protocol 4 or later (STACK_GLOBAL); save it with torch.save's \
                     default protocol (2)"
                        .to_string(),
                )
            }
            b'i' | 0x82 | 0x83 | 0x84 => {
                return Err(format!(
                    "opcode 0x{op:02x} (an object by extension code or INST) at byte {op_pos}: \
                     only plain state dicts load"
                ))
            }
            b'h' | b'j' | b'g' => {
                let key = memo_index(op == b'g', argument, int_arg)?;
                let kind = *w
                    .memo
                    .get(&key)
                    .ok_or_else(|| format!("memo entry {key} read before it was written"))?;
                if kind == Kind::OrderedDictClass {
                    replaced = Some(vec![EMPTY_DICT]);
                }
                w.push(kind, start);
            }
            b'q' | b'r' | b'p' => {
                let key = memo_index(op == b'p', argument, int_arg)?;
                let kind = w.top()?.kind;
                w.memo.insert(key, kind);
            }
            0x94 => {
                let kind = w.top()?.kind;
                let key = w.memo.len() as u64;
                w.memo.insert(key, kind);
            }
            b')' => w.push(Kind::EmptyTuple, start),
            b'R' => {
                let args = w.pop()?;
                let callable = w.pop()?;
                if callable.kind == Kind::OrderedDictClass {
                    // The EMPTY_TUPLE just emitted is dropped; the EMPTY_DICT that stood for
                    // the class becomes the instance.
                    if args.kind != Kind::EmptyTuple || args.start + 1 != w.out.len() {
                        return Err("an OrderedDict built with arguments".to_string());
                    }
                    w.out.truncate(args.start);
                    replaced = Some(Vec::new());
                    w.push(Kind::OrderedDict, callable.start);
                } else {
                    w.push(Kind::Other, callable.start);
                }
            }
            b'b' => {
                let state = w.pop()?;
                if w.top()?.kind == Kind::OrderedDict {
                    let key = BUILD_KEY.as_bytes();
                    let mut ins = vec![BINUNICODE];
                    ins.extend_from_slice(&(key.len() as u32).to_le_bytes());
                    ins.extend_from_slice(key);
                    w.out.splice(state.start..state.start, ins);
                    replaced = Some(vec![SETITEM]);
                }
            }
            b'(' => w.push(Kind::Mark, start),
            b'0' => {
                w.pop()?;
            }
            b'1' => {
                w.pop_mark()?;
            }
            b'2' => {
                let top = w.top()?;
                w.push(top.kind, start);
            }
            b'Q' | 0x85 => {
                let e = w.pop()?;
                w.push(Kind::Other, e.start);
            }
            0x86 | 0x81 => {
                w.pop()?;
                let e = w.pop()?;
                w.push(Kind::Other, e.start);
            }
            0x87 | 0x92 => {
                w.pop()?;
                w.pop()?;
                let e = w.pop()?;
                w.push(Kind::Other, e.start);
            }
            b'a' => {
                w.pop()?;
            }
            b's' => {
                w.pop()?;
                w.pop()?;
            }
            b'e' | b'u' | 0x90 => {
                w.pop_mark()?;
            }
            b't' | b'd' | b'l' | 0x91 | b'o' => {
                let m = w.pop_mark()?;
                w.push(Kind::Other, m.start);
            }
            0x80 | 0x98 => {}
            _ => w.push(Kind::Other, start),
        }
        match replaced {
            Some(bytes) => w.out.extend_from_slice(&bytes),
            None => w.out.extend_from_slice(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `data.pkl` of `torch.save({"model": torch.nn.Linear(2, 1).state_dict(), "step": 3})`
    /// (PyTorch 2.13; regenerate with that and `zipfile` if the format ever changes).
    const STATE_DICT: &[u8] = include_bytes!("../../tests/data/linear_state_dict.pkl");

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn ordered_dicts_become_dicts_and_their_metadata_an_entry() {
        assert!(contains(STATE_DICT, b"collections\nOrderedDict\n"));
        let out = rewrite(STATE_DICT).unwrap();
        assert!(!contains(&out, b"collections\nOrderedDict\n"));
        assert!(contains(&out, BUILD_KEY.as_bytes()));
        // Tensor rebuilds and everything else are copied as they were.
        assert!(contains(&out, b"torch._utils\n_rebuild_tensor_v2\n"));
        assert!(contains(&out, b"FloatStorage"));
        assert_eq!(*out.last().unwrap(), b'.');
    }

    #[test]
    fn python_objects_and_bad_streams_are_refused() {
        let object = b"\x80\x02cargparse\nNamespace\nq\x00)R.";
        let e = rewrite(object).unwrap_err();
        assert!(e.contains("argparse.Namespace"), "{e}");
        assert!(rewrite(b"\x80\x02}").unwrap_err().contains("STOP"));
        assert!(rewrite(b"\x80\x02X\xff\xff\xff\x7f").is_err());
        assert!(rewrite(b"\x80\x02u.").unwrap_err().contains("underflow"));
        assert!(rewrite(b"\xff").unwrap_err().contains("unknown opcode"));
        assert!(rewrite(b"h\x05.").unwrap_err().contains("memo"));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = rewrite(&bytes);
        }

        #[test]
        fn never_panics_on_a_mutated_state_dict(
            flips in proptest::collection::vec((0..STATE_DICT.len(), any::<u8>()), 1..6),
            cut in 0..=STATE_DICT.len(),
        ) {
            let mut bytes = STATE_DICT.to_vec();
            for (i, b) in flips {
                bytes[i] = b;
            }
            bytes.truncate(cut.max(1));
            let _ = rewrite(&bytes);
        }
    }
}
