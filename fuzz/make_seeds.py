#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/<target>/ (docs/fuzzing.md).

A few valid and a few broken inputs per target, small so libFuzzer's
mutations stay cheap. The checkpoint seeds come from the target itself:
    WICK_FUZZ_MAKE_SEEDS=fuzz/corpus/checkpoint build-fuzz/fuzz/checkpoint_fuzz
Usage: fuzz/make_seeds.py [fuzz/corpus]
"""
import gzip
import json
import os
import struct
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")


def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def idx(shape, payload=None, dtype=0x08):
    n = 1
    for s in shape:
        n *= s
    if payload is None:
        payload = bytes(i % 256 for i in range(n))
    return bytes([0, 0, dtype, len(shape)]) + b"".join(struct.pack(">I", s) for s in shape) + payload


# IDX: labels-like 1-d, images-like 3-d, gzip, and broken headers/payloads.
put("idx", "labels-1d", idx([10], bytes(range(10))))
put("idx", "images-3d", idx([2, 3, 4]))
put("idx", "images-3d.gz", gzip.compress(idx([2, 3, 4]), mtime=0))
put("idx", "broken-truncated", idx([2, 3, 4])[:-5])
put("idx", "broken-trailing", idx([4]) + b"xx")
put("idx", "broken-magic", b"\x01\x00" + idx([4])[2:])
put("idx", "broken-type-float", idx([1], b"\0\0\0\0", dtype=0x0D)[:12])
put("idx", "broken-huge-dims", bytes([0, 0, 8, 4]) + b"\x7f\xff\xff\xff" * 4)
put("idx", "broken-zero-dim", idx([3, 0]))

# Fortunes: byte 0 picks val_every; "\n%%%%\n" separates files.
fortunes = "A fortune.\n%\nAnother one,\n  on two lines.\n%\n%\nThird.\n"
put("corpus", "two-files", "\x03" + fortunes + "\n%%%%\n" + "Second file.\n%\nLast\n")
put("corpus", "one-file", "\x00" + fortunes)
put("corpus", "crlf-and-blank", "\x05" + "dos\r\n%\r\n\n \n%\nunix\n")
put("corpus", "broken-empty-files", "\x01" + "\n%%%%\n\n%%%%\n%\n%")
put("corpus", "binary", "\x02" + "\x00\xff\xfe%\n%\x00\n%\n\x80")

# metrics.jsonl as MetricLogger writes it, and broken lines.
train = {"kind": "train", "step": 1, "epoch": 0, "loss": 2.3, "lr": 0.1, "samples_per_s": 1000.0}
val = {"kind": "val", "step": 1, "epoch": 0, "loss": 2.1, "accuracy": 0.3}
put("metrics_jsonl", "valid", "\n".join(json.dumps(x) for x in [train, dict(train, step=2, loss=1.9), val]) + "\n")
put("metrics_jsonl", "blank-lines", "\n  \n" + json.dumps(train) + "\r\n\t\n")
put("metrics_jsonl", "script-in-strings", json.dumps({"kind": "</script><!--<script>", "step": 1, "note": "<b>"}) + "\n")
put("metrics_jsonl", "broken-not-object", "[1, 2]\n")
put("metrics_jsonl", "broken-kind-number", json.dumps({"kind": 1, "step": 1}) + "\n")
put("metrics_jsonl", "broken-truncated", json.dumps(train)[:-7] + "\n")

# gpt_config.json as wick-gpt train writes it, and broken ones.
cfg = {"vocab": 256, "context": 128, "layers": 4, "width": 192, "heads": 6, "ffn_hidden": 512,
       "rope_base": 10000.0, "moe": False, "experts": 8, "shared_experts": 1, "top_k": 2,
       "expert_hidden": 128, "aux_loss_weight": 0.01}
put("gpt_config", "dense", json.dumps(cfg, indent=2) + "\n")
put("gpt_config", "moe", json.dumps(dict(cfg, moe=True, layers=1, width=32, heads=2)) + "\n")
put("gpt_config", "broken-missing-key", json.dumps({k: v for k, v in cfg.items() if k != "heads"}))
put("gpt_config", "broken-string-size", json.dumps(dict(cfg, width="192")))
put("gpt_config", "broken-negative", json.dumps(dict(cfg, layers=-1)))
put("gpt_config", "broken-huge", json.dumps(dict(cfg, width=2**40)))
put("gpt_config", "broken-odd-head", json.dumps(dict(cfg, width=30, heads=2)))
put("gpt_config", "broken-not-json", "{\"vocab\": 256,")

# safetensors as Python's package writes them (header padded to 8 bytes with
# spaces, data largest element first), and the broken files the rules name.
def safetensors(entries, data, metadata=None, pad=True, length=None):
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(entries)
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


f32 = struct.pack("<4f", 1.0, -2.5, float("nan"), 3.0)
two = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
       "b": {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]}}
put("safetensors", "two-tensors-metadata", safetensors(two, f32 + b"\x00\x3c\x00\xc0\xff\x7f", {"format": "pt"}))
put("safetensors", "every-small-dtype", safetensors(
    {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
     "c": {"dtype": "C64", "shape": [], "data_offsets": [8, 16]},
     "d": {"dtype": "BF16", "shape": [1, 1], "data_offsets": [16, 18]},
     "e": {"dtype": "BOOL", "shape": [2], "data_offsets": [18, 20]},
     "f": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [20, 21]},
     "g": {"dtype": "F4", "shape": [2], "data_offsets": [21, 22]},
     "h": {"dtype": "U16", "shape": [0, 3], "data_offsets": [22, 22]}},
    bytes(range(22))))
put("safetensors", "empty", safetensors({}, b""))
put("safetensors", "unpadded", safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32[:4], pad=False))
put("safetensors", "broken-gap", safetensors({"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"ab"))
put("safetensors", "broken-overlap", safetensors(
    {"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
     "y": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"ab"))
put("safetensors", "broken-size", safetensors({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, f32[:8]))
put("safetensors", "broken-overflow", safetensors(
    {"x": {"dtype": "F64", "shape": [2**62, 8], "data_offsets": [0, 8]}}, f32[:8]))
put("safetensors", "broken-header-length", safetensors({}, b"", length=2**40))
put("safetensors", "broken-dtype", safetensors({"x": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}, b"abc"))
