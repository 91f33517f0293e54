"""Crafted torch.save files that a reader must refuse (or read exactly), for tests/hostile_checkpoints.rs.

Usage: .venv/bin/python scripts/hostile_checkpoints.py OUT_DIR

Writes OUT_DIR/<case>.pt for every case below and OUT_DIR/cases.json, which maps each case to
the words its error must contain ("" where the file must load, with `state` the values it must
load as; null where either outcome is right, as long as it comes in linear time). Every file is made here, from torch.save's own output or from pickle opcodes written
out by hand, so nothing binary is committed; the test runs this script each time.

The cases are the red-team findings of issue #28 on the torch.save reader: storages declared
longer than their records (a heap over-read in libtorch's Unpickler), trees nested 10^6 deep
(a stack overflow when libtorch frees them), a type string nested 10^5 deep (libtorch's type
parser), a memo index of 2^27 (a 2 GiB memo), decompression bombs, single-byte damage that the
zip's CRC-32 catches, a long chain of OrderedDict BUILDs (quadratic in the old rewriter), and an
entry named like the key the reader gives a state_dict's metadata.
"""

import io
import json
import os
import struct
import sys
import zipfile
import zlib

import torch


def archive(path, pickle, records=None, deflate=(), prefix="archive", attrs=None):
    """A torch.save-layout zip: PREFIX/data.pkl, PREFIX/data/<key>, version and byteorder;
    `attrs` sets entries' external attributes."""
    attrs = attrs or {}
    records = records or {}
    with zipfile.ZipFile(path, "w") as z:
        entries = [("data.pkl", pickle)] + [("data/" + k, v) for k, v in records.items()]
        entries += [(".data/version", b"3\n"), ("byteorder", b"little")]
        for name, data in entries:
            kind = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            info = zipfile.ZipInfo(f"{prefix}/{name}")
            info.external_attr = attrs.get(name, 0)
            z.writestr(info, data, compress_type=kind)


def entries_of(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}


def bomb_entry(path, name, size):
    """Adds PREFIX/name to the archive at `path`: `size` zero bytes, deflated (about size/1000)."""
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo(f"archive/{name}")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(size // len(chunk)):
                f.write(chunk)


def saved(value):
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def main(out):
    os.makedirs(out, exist_ok=True)
    cases = {}

    def case(name, expect, state=None):
        cases[name] = {"error": expect, "state": state}
        return os.path.join(out, name + ".pt")

    # The model every record case starts from: one [3, 4] tensor of a given dtype.
    def base(dtype):
        path = os.path.join(out, "_base.pt")
        with open(path, "wb") as f:
            f.write(saved({"model": {"w": torch.arange(12).reshape(3, 4).to(dtype)}, "step": 3}))
        e = entries_of(path)
        os.remove(path)
        return e

    # 1. Storages declared longer than their records (over-read), an empty record, none at all.
    for dtype, label, short in [(torch.float32, "float", 16), (torch.float64, "double", 8),
                                (torch.int64, "long", 8)]:
        e = base(dtype)
        declared = 12 * dtype.itemsize
        archive(case(f"short_{label}_record", f"holds {short} bytes where the pickle declares "
                     f"a storage of {declared} bytes"),
                e["data.pkl"], {"0": e["data/0"][:short]})
    e = base(torch.float32)
    archive(case("empty_record", "holds 0 bytes where the pickle declares a storage of 48"),
            e["data.pkl"], {"0": b""})
    archive(case("missing_record", "that the archive does not hold"), e["data.pkl"], {})
    # A record marked as a directory (MS-DOS attribute 0x10): libtorch's zip reader then
    # "extracts" nothing into the buffer it allocated, so the tensor held uninitialised heap
    # (found by the fuzz target); its bytes fail the CRC-32.
    archive(case("directory_record", "is damaged: its bytes do not match the CRC-32"),
            e["data.pkl"], {"0": e["data/0"]}, attrs={"data/0": 0x10})
    archive(case("long_record", "holds 64 bytes where the pickle declares a storage of 48"),
            e["data.pkl"], {"0": e["data/0"] + bytes(16)})

    # 2. Deep trees: 10^6 nested lists on the stack; 10^5 through the memo, innermost first (so
    # no container grows after it is nested), and outermost first (which grows nested ones).
    n = 1_000_000
    archive(case("deep_lists", "nested more than 128 deep"),
            b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    n = 100_000
    body = b"".join(b"]r" + struct.pack("<I", i) + b"0" for i in range(n))
    inner_first = b"".join(b"j" + struct.pack("<I", i - 1) + b"j" + struct.pack("<I", i) + b"a0"
                           for i in range(n - 1, 0, -1))
    archive(case("deep_memo_chain", "nested more than 128 deep"),
            b"\x80\x02" + body + inner_first + b"j\x00\x00\x00\x00.")
    outer_first = b"".join(b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + b"a0"
                           for i in range(n - 1))
    archive(case("grown_after_nesting", "grown after it was put in another"),
            b"\x80\x02" + body + outer_first + b"j\x00\x00\x00\x00.")
    deep_type = ("List[" * n + "int" + "]" * n).encode()
    archive(case("deep_type_string", "type string nested more than 32 deep"),
            b"\x80\x02ctorch.jit._pickle\nrestore_type_tag\n]X" + struct.pack("<I", len(deep_type))
            + deep_type + b"\x86R.")

    # 11. A memo index of 2^27 in a 14-byte pickle (libtorch would size its memo by it).
    archive(case("huge_memo_index", "memo index 134217728"), b"\x80\x02]r\x00\x00\x00\x08.")

    # 11. Decompression bombs: a record that inflates to 512 MiB where 48 bytes are declared,
    # and a 1.1 GiB pickle.
    path = case("record_bomb", "holds 536870912 bytes where the pickle declares a storage of 48")
    archive(path, e["data.pkl"], {})
    bomb_entry(path, "data/0", 1 << 29)
    path = case("pickle_bomb", "declares 1207959552 bytes, over the 1073741824")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/.data/version"), b"3\n")
    bomb_entry(path, "data.pkl", 72 << 24)

    # 11. 200,000 OrderedDicts, each with a BUILD state (the state_dict `_metadata` pattern).
    n = 200_000
    od = b"ccollections\nOrderedDict\nq\x00)R"
    one = b"h\x00)R}b"
    archive(case("ordered_dict_chain", None),
            b"\x80\x02}(X\x04\x00\x00\x00listq\x01]q\x02(" + od + one * (n - 1) + b"eu.")

    # 6. Damage the zip's CRC-32 catches: a byte of a tensor's value, a byte of a key.
    values = {"model": {f"w{i}": torch.tensor(float(i) * 0.125 - 0.366) for i in range(8)},
              "optimizer": {"state": {"0": {"step": torch.tensor(5.0)}}}, "step": 3}
    good = saved(values)
    state = {"model": {k: float(t) for k, t in values["model"].items()},
             "optimizer": {"state": {"0": {"step": 5.0}}}, "step": 3}
    with open(case("intact", "", state), "wb") as f:
        f.write(good)
    value = struct.pack("<f", 3 * 0.125 - 0.366)
    at = good.index(value)
    with open(case("damaged_value", "is damaged: its bytes do not match the CRC-32"), "wb") as f:
        f.write(good[:at] + bytes([good[at] ^ 0x40]) + good[at + 1:])
    at = good.index(b"state")
    with open(case("damaged_key", "is damaged: its bytes do not match the CRC-32"), "wb") as f:
        f.write(good[:at + 3] + b"\x9b" + good[at + 4:])

    # 2. The other torch.jit._pickle globals, misused: a tensor-table reference with no table,
    # list builders given a number, a type string libtorch's parser rejects.
    jit = b"\x80\x02ctorch.jit._pickle\n"
    for name, body, words in [
        ("tensor_table_reference", b"build_tensor_from_id\nK\x00\x85R.", "tensor table"),
        ("intlist_of_a_number", b"build_intlist\nK\x05\x85R.", "cannot be unpickled"),
        ("tensorlist_of_a_number", b"build_tensorlist\nK\x05\x85R.", "cannot be unpickled"),
        ("bad_type_string", b"restore_type_tag\n]X\x05\x00\x00\x00List[\x86R.",
         "cannot be unpickled"),
    ]:
        archive(case(name, words), jit + body)

    # 8. An entry named like the reader's key for a state_dict's `_metadata`: kept (it was
    # dropped, so it passed a strict load unseen).
    key = "\0tch_fabric.build_state"
    named = {"model": {"w": torch.tensor(1.0), key: torch.tensor(2.0)}, "step": 3}
    with open(case("key_named_like_build_state", "",
                   {"model": {"w": 1.0, key: 2.0}, "step": 3}), "wb") as f:
        f.write(saved(named))

    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
