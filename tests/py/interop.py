"""The Python packages wick interoperates with, as the reference of its tests
(tests/interop_test.cpp through tests/python_reference.h):

    python interop.py <case> in.json out.json

safetensors_write  writes a file with Python's safetensors.torch.save_file:
                   one tensor of every dtype Python's torch side knows, its
                   bytes drawn at random (every bit pattern, NaN payloads
                   included); out.json lists each tensor's dtype, shape and
                   bytes (hex) and the metadata, for wick to compare.
safetensors_read   reads a file (written by wick) with load_file and
                   safe_open(...).metadata(), and lists the same.
safetensors_rejects tries load_file on each of a list of malformed files and
                   says which it refused (and why).
tensorboard_read   reads a log directory with TensorBoard's EventAccumulator:
                   every scalar (step, value, wall time), text, the hparams
                   plugin's session start (values and kinds) and end status.
"""

import json
import sys

import torch

from reference import num  # non-finite floats as "nan", "inf", "-inf"


def manifest(tensors, metadata):
    out = []
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        out.append(
            {
                "name": name,
                "dtype": str(t.dtype).split(".")[-1],
                "shape": list(t.shape),
                "hex": raw.numpy().tobytes().hex(),
            }
        )
    return {"tensors": out, "metadata": metadata or {}}


def random_bytes_as(dtype, shape, gen):
    probe = torch.empty(0, dtype=dtype)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * probe.element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def safetensors_write(inp):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(inp["seed"])
    dtypes = [
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8,
        torch.uint64, torch.uint32, torch.uint16, torch.uint8,
        torch.bool, torch.complex64,
        torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
        torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
    ]
    shapes = [[3, 5], [7], [2, 3, 2], [], [0, 4]]
    tensors = {}
    for i, dtype in enumerate(dtypes):
        shape = shapes[i % len(shapes)]
        if dtype == torch.float4_e2m1fn_x2 and not shape:
            shape = [3]
        tensors[f"t{i}.{str(dtype).split('.')[-1]}"] = random_bytes_as(dtype, shape, gen)
    save_file(tensors, inp["path"], metadata=inp.get("metadata") or None)
    return manifest(tensors, inp.get("metadata"))


def safetensors_read(inp):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(inp["path"])
    with safe_open(inp["path"], framework="pt") as f:
        metadata = f.metadata()
    return manifest(tensors, metadata)


def safetensors_rejects(inp):
    from safetensors.torch import load_file

    rejected, messages = [], []
    for path in inp["paths"]:
        try:
            load_file(path)
            rejected.append(False)
            messages.append("")
        except Exception as e:  # noqa: BLE001 - any refusal counts
            rejected.append(True)
            messages.append(f"{type(e).__name__}: {e}")
    return {"rejected": rejected, "messages": messages}


def tensorboard_read(inp):
    """Everything TensorBoard's EventAccumulator reads from a log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    everything = {k: 0 for k in ("scalars", "tensors", "histograms", "images", "audio",
                                 "compressedHistograms")}
    ea = EventAccumulator(inp["dir"], size_guidance=everything, purge_orphaned_data=True)
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [[e.step, num(e.value), e.wall_time] for e in ea.Scalars(t)]
               for t in tags["scalars"]}
    texts = {}
    for t in tags["tensors"]:
        texts[t] = [[e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()]
                    for e in ea.Tensors(t)]
    hparams, end_status = {}, None
    try:
        hparams_content = ea.PluginTagToContent("hparams")
    except KeyError:  # no hparams in these files
        hparams_content = {}
    for tag, content in hparams_content.items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                kind = v.WhichOneof("kind")
                hparams[k] = {"kind": kind, "value": getattr(v, kind)}
        if data.HasField("session_end_info"):
            end_status = data.session_end_info.status
    return {"scalars": scalars, "texts": texts, "hparams": hparams, "end_status": end_status,
            "file_version": ea.file_version}


CASES = {
    "safetensors_write": safetensors_write,
    "safetensors_read": safetensors_read,
    "safetensors_rejects": safetensors_rejects,
    "tensorboard_read": tensorboard_read,
}

if __name__ == "__main__":
    case, in_path, out_path = sys.argv[1:4]
    with open(in_path) as f:
        inp = json.load(f)
    result = CASES[case](inp)
    with open(out_path, "w") as f:
        json.dump(result, f)
