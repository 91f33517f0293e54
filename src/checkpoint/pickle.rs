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
//!
//! The walk also bounds what the Unpickler would build, since libtorch builds and frees value
//! trees recursively and sizes its memo by the largest index: values nested deeper than
//! [`MAX_HEIGHT`] (each container's height is tracked through the memo, and a container may
//! not grow once it sits in another), type strings of `restore_type_tag` nested deeper than
//! [`MAX_TYPE_NESTING`], and memo indices past the pickle's own length are refused. The walk
//! is linear in the pickle's length.

/// The key under which a rewritten OrderedDict keeps its `BUILD` state (its `_metadata`), with
/// a suffix that makes it appear nowhere in the pickle it is put into, so that no entry of the
/// file itself (a parameter or user key of that name) is mistaken for it: see [`build_key`].
const BUILD_KEY: &str = "\u{0}tch_fabric.build_state";

/// [`BUILD_KEY`], then `.1`, `.2`, ... until it is not a substring of `pickle`.
fn build_key(pickle: &[u8]) -> String {
    let mut key = BUILD_KEY.to_string();
    let mut n = 0;
    while pickle.windows(key.len()).any(|w| w == key.as_bytes()) {
        n += 1;
        key = format!("{BUILD_KEY}.{n}");
    }
    key
}

/// The deepest nesting of containers (lists, dicts, tuples, objects) a pickle may build. A
/// state dict is under 10 deep; libtorch frees a value tree recursively, and 10^5 levels
/// overflow its stack.
pub(crate) const MAX_HEIGHT: u32 = 128;

/// The deepest bracket nesting of a type string given to `torch.jit._pickle.restore_type_tag`
/// (`Dict[str, List[Tensor]]` is 2): libtorch's type parser recurses on each level.
pub(crate) const MAX_TYPE_NESTING: u32 = 32;

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
    /// `torch.jit._pickle.restore_type_tag`, whose second argument libtorch parses as a type.
    RestoreTypeTag,
    Other,
}

/// What the walk knows about a value: how deep it nests, whether it already sits in another
/// container, and for a string (or a tuple of them) its bracket nesting as a type string.
#[derive(Debug, Clone, Copy, Default)]
struct Node {
    height: u32,
    placed: bool,
    nest: u32,
}

/// The node of every value that holds nothing and is never added to (numbers, None, globals,
/// storages).
const LEAF: usize = 0;

/// A stack entry: its kind, where its bytes start in the output (where a key is inserted
/// before a BUILD state), and its value's [`Node`] (shared by the memo's copies).
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: Kind,
    start: usize,
    node: usize,
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
    /// Bytes to insert into `out` (at a position, in the order given), applied once at the end
    /// so that each insertion costs its own length, not the output's.
    inserts: Vec<(usize, Vec<u8>)>,
    stack: Vec<Entry>,
    memo: std::collections::HashMap<u64, (Kind, usize)>,
    nodes: Vec<Node>,
}

impl<'a> Walk<'a> {
    fn pop(&mut self) -> Result<Entry, String> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }

    /// Pops through the topmost MARK, marking what it pops as placed, and returns the MARK's
    /// entry with the greatest height and type nesting among the popped values.
    fn pop_mark(&mut self) -> Result<(Entry, u32, u32), String> {
        let (mut height, mut nest) = (0, 0);
        loop {
            let e = self.pop()?;
            if e.kind == Kind::Mark {
                return Ok((e, height, nest));
            }
            let n = self.place(e.node);
            height = height.max(n.height);
            nest = nest.max(n.nest);
        }
    }

    /// Marks a value as sitting in a container and returns its node.
    fn place(&mut self, node: usize) -> Node {
        if node != LEAF {
            self.nodes[node].placed = true;
        }
        self.nodes[node]
    }

    /// A new value holding values of `height` (and type nesting `nest`) at most.
    fn node(&mut self, height: u32, nest: u32) -> Result<usize, String> {
        if height > MAX_HEIGHT {
            return Err(format!(
                "values nested more than {MAX_HEIGHT} deep (at byte {}); a checkpoint nests under 10",
                self.pos
            ));
        }
        self.nodes.push(Node {
            height,
            placed: false,
            nest,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Records that values of up to `height` were added to the value of `node`.
    fn grow(&mut self, node: usize, height: u32) -> Result<(), String> {
        if node == LEAF {
            return Err(format!(
                "items added to a value that is not a container, at byte {}",
                self.pos
            ));
        }
        let n = &mut self.nodes[node];
        let new = height + 1;
        if new > n.height {
            if n.placed {
                return Err(format!(
                    "a container grown after it was put in another (byte {}), which no \
                     torch.save writes",
                    self.pos
                ));
            }
            if new > MAX_HEIGHT {
                return Err(format!(
                    "values nested more than {MAX_HEIGHT} deep (at byte {}); a checkpoint nests \
                     under 10",
                    self.pos
                ));
            }
            n.height = new;
        }
        Ok(())
    }

    fn top(&self) -> Result<Entry, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("empty stack at byte {}", self.pos))
    }

    fn push(&mut self, kind: Kind, start: usize, node: usize) {
        self.stack.push(Entry { kind, start, node });
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
/// A pickler numbers its memo from 0, one entry per value it wrote, so an index is below the
/// pickle's length; libtorch sizes its memo by the largest index, so one far past it would
/// allocate gigabytes.
fn memo_index(text: bool, argument: &[u8], binary: u64, len: usize) -> Result<u64, String> {
    let index = if text {
        String::from_utf8_lossy(argument)
            .trim()
            .parse::<u64>()
            .map_err(|_| "a bad memo index".to_string())?
    } else {
        binary
    };
    if index >= len as u64 {
        return Err(format!(
            "memo index {index} in a pickle of {len} bytes, which has fewer values than that"
        ));
    }
    Ok(index)
}

/// The bracket nesting of a string as a type string (`List[Dict[str, Tensor]]`: 2).
fn type_nesting(text: &[u8]) -> u32 {
    let (mut depth, mut most) = (0u32, 0u32);
    for &b in text {
        match b {
            b'[' | b'(' => {
                depth += 1;
                most = most.max(depth);
            }
            b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    most
}

/// Applies the insertions (positions in `out` before any insertion) in one pass.
fn splice_all(out: Vec<u8>, mut inserts: Vec<(usize, Vec<u8>)>) -> Vec<u8> {
    if inserts.is_empty() {
        return out;
    }
    inserts.sort_by_key(|(at, _)| *at);
    let extra: usize = inserts.iter().map(|(_, b)| b.len()).sum();
    let mut merged = Vec::with_capacity(out.len() + extra);
    let mut from = 0;
    for (at, bytes) in inserts {
        // Positions come from entries already emitted, so within `out`; clamped all the same.
        let at = at.clamp(from, out.len());
        merged.extend_from_slice(&out[from..at]);
        merged.extend_from_slice(&bytes);
        from = at;
    }
    merged.extend_from_slice(&out[from..]);
    merged
}

/// `data.pkl` of a torch.save archive, rewritten for libtorch's Unpickler (see the module
/// documentation), and the key its OrderedDicts' BUILD states are under (drop those entries
/// after unpickling), or the reason it cannot be read.
pub(crate) fn rewrite(input: &[u8]) -> Result<(Vec<u8>, String), String> {
    let build = build_key(input);
    let mut w = Walk {
        input,
        pos: 0,
        out: Vec::with_capacity(input.len() + 64),
        inserts: Vec::new(),
        stack: Vec::new(),
        memo: std::collections::HashMap::new(),
        nodes: vec![Node::default()],
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
                return Ok((splice_all(w.out, w.inserts), build));
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
                    w.push(Kind::OrderedDictClass, start, LEAF);
                } else if (module, name) == ("torch.jit._pickle", "restore_type_tag") {
                    w.push(Kind::RestoreTypeTag, start, LEAF);
                } else {
                    w.push(Kind::Other, start, LEAF);
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
                let key = memo_index(op == b'g', argument, int_arg, input.len())?;
                let (kind, node) = *w
                    .memo
                    .get(&key)
                    .ok_or_else(|| format!("memo entry {key} read before it was written"))?;
                if kind == Kind::OrderedDictClass {
                    replaced = Some(vec![EMPTY_DICT]);
                }
                w.push(kind, start, node);
            }
            b'q' | b'r' | b'p' => {
                let key = memo_index(op == b'p', argument, int_arg, input.len())?;
                let top = w.top()?;
                w.memo.insert(key, (top.kind, top.node));
            }
            0x94 => {
                let top = w.top()?;
                let key = w.memo.len() as u64;
                w.memo.insert(key, (top.kind, top.node));
            }
            b')' => {
                let node = w.node(1, 0)?;
                w.push(Kind::EmptyTuple, start, node);
            }
            b']' | b'}' | 0x8f => {
                let node = w.node(1, 0)?;
                w.push(Kind::Other, start, node);
            }
            // Strings: a type string's nesting is checked where restore_type_tag gets it.
            b'S' | b'V' | b'T' | b'U' | b'X' | 0x8c | 0x8d => {
                let node = w.node(0, type_nesting(argument))?;
                w.push(Kind::Other, start, node);
            }
            b'R' => {
                let args = w.pop()?;
                let callable = w.pop()?;
                let a = w.place(args.node);
                if callable.kind == Kind::OrderedDictClass {
                    // The EMPTY_TUPLE just emitted is dropped; the EMPTY_DICT that stood for
                    // the class becomes the instance.
                    if args.kind != Kind::EmptyTuple || args.start + 1 != w.out.len() {
                        return Err("an OrderedDict built with arguments".to_string());
                    }
                    w.out.truncate(args.start);
                    replaced = Some(Vec::new());
                    let node = w.node(1, 0)?;
                    w.push(Kind::OrderedDict, callable.start, node);
                } else {
                    if callable.kind == Kind::RestoreTypeTag && a.nest > MAX_TYPE_NESTING {
                        return Err(format!(
                            "a type string nested more than {MAX_TYPE_NESTING} deep (at byte \
                             {op_pos})"
                        ));
                    }
                    // What a call returns holds at most what its arguments held.
                    let node = w.node(a.height, 0)?;
                    w.push(Kind::Other, callable.start, node);
                }
            }
            b'b' => {
                let state = w.pop()?;
                let st = w.place(state.node);
                let top = w.top()?;
                w.grow(top.node, st.height)?;
                if top.kind == Kind::OrderedDict {
                    let key = build.as_bytes();
                    let mut ins = vec![BINUNICODE];
                    ins.extend_from_slice(&(key.len() as u32).to_le_bytes());
                    ins.extend_from_slice(key);
                    w.inserts.push((state.start, ins));
                    replaced = Some(vec![SETITEM]);
                }
            }
            b'(' => w.push(Kind::Mark, start, LEAF),
            b'0' => {
                w.pop()?;
            }
            b'1' => {
                w.pop_mark()?;
            }
            b'2' => {
                let top = w.top()?;
                w.push(top.kind, start, top.node);
            }
            // BINPERSID: a storage.
            b'Q' => {
                let e = w.pop()?;
                w.push(Kind::Other, e.start, LEAF);
            }
            // TUPLE1, TUPLE2, TUPLE3.
            0x85..=0x87 => {
                let (mut height, mut nest, mut first) = (0, 0, 0);
                for _ in 0..(op - 0x84) {
                    let e = w.pop()?;
                    let n = w.place(e.node);
                    height = height.max(n.height);
                    nest = nest.max(n.nest);
                    first = e.start;
                }
                let node = w.node(height + 1, nest)?;
                w.push(Kind::Other, first, node);
            }
            // NEWOBJ (class, args) and NEWOBJ_EX (class, args, kwargs).
            0x81 | 0x92 => {
                let mut height = 0;
                if op == 0x92 {
                    let kwargs = w.pop()?;
                    height = w.place(kwargs.node).height;
                }
                let args = w.pop()?;
                height = height.max(w.place(args.node).height);
                let class = w.pop()?;
                let node = w.node(height, 0)?;
                w.push(Kind::Other, class.start, node);
            }
            b'a' => {
                let item = w.pop()?;
                let h = w.place(item.node).height;
                let parent = w.top()?;
                w.grow(parent.node, h)?;
            }
            b's' => {
                let value = w.pop()?;
                let key = w.pop()?;
                let h = w.place(value.node).height.max(w.place(key.node).height);
                let parent = w.top()?;
                w.grow(parent.node, h)?;
            }
            b'e' | b'u' | 0x90 => {
                let (_, h, _) = w.pop_mark()?;
                let parent = w.top()?;
                w.grow(parent.node, h)?;
            }
            b't' | b'd' | b'l' | 0x91 | b'o' => {
                let (m, h, nest) = w.pop_mark()?;
                let node = w.node(h + 1, nest)?;
                w.push(Kind::Other, m.start, node);
            }
            0x80 | 0x98 => {}
            _ => w.push(Kind::Other, start, LEAF),
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
        let (out, key) = rewrite(STATE_DICT).unwrap();
        assert_eq!(key, BUILD_KEY);
        assert!(!contains(&out, b"collections\nOrderedDict\n"));
        assert!(contains(&out, BUILD_KEY.as_bytes()));
        // Tensor rebuilds and everything else are copied as they were.
        assert!(contains(&out, b"torch._utils\n_rebuild_tensor_v2\n"));
        assert!(contains(&out, b"FloatStorage"));
        assert_eq!(*out.last().unwrap(), b'.');
    }

    #[test]
    fn the_build_key_is_one_the_file_does_not_hold() {
        // A file with an entry named like the key (a parameter or user key) keeps it.
        let mut pickle = b"\x80\x02}X".to_vec();
        let name = format!("{BUILD_KEY}.1");
        pickle.extend_from_slice(&(name.len() as u32).to_le_bytes());
        pickle.extend_from_slice(name.as_bytes());
        pickle.extend_from_slice(b"K\x01s.");
        assert_eq!(build_key(&pickle), format!("{BUILD_KEY}.2"));
        assert_eq!(rewrite(&pickle).unwrap().1, format!("{BUILD_KEY}.2"));
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
