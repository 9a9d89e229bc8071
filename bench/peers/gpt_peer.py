#!/usr/bin/env python3
"""Python peer of `wick-bench gpt`: wick-gpt's model and training step in PyTorch.

The same architecture as examples/gpt/model.cpp (byte-level; RMSNorm, rotary
embeddings on pairs (2i, 2i+1), SwiGLU, causal scaled_dot_product_attention,
no biases), the same initialisation rule, AdamW(lr, betas 0.9/0.95, weight
decay 0.1 on matrices, 0 on norms, fused=True where the C++ side uses
wick::FusedAdam's fused kernel), gradient clipping at 1.0, bf16 autocast on
the CPU. Data: random byte windows from a generator seeded seed+1.

Cases: "train" (one optimizer step: forward, loss, backward, clip, step) and
"generate" (prefill a 16-byte prompt, then greedy decoding of --new-tokens
with a KV cache, batch 1). --compile wraps the model in torch.compile.
--fp32-attention computes the attention in float32 under bf16 autocast, the
choice wick-gpt makes on the CPU, to separate that choice from the rest.

--device cuda (wick-bench gpt --device cuda): the data and model on the GPU,
bf16 autocast on "cuda" (or --precision fp32 with TF32 off), fused AdamW on
the GPU, clip_grad_norm_ (foreach, no host synchronisation), timed between
torch.cuda.synchronize() calls; only the "train" case. --time-limit stops a
case that runs too long (torch.compile's compilation included) and reports
an error line instead.

Prints one JSON line per case: median ms per step (train) or per generated
token (generate), every run's figure.
"""
import argparse
import json
import math
import os
import statistics
import sys
import threading
import time


def build(torch, a):
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight).to(x.dtype)

    def rope(x, cos, sin):
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(x.dtype)

    class Attention(nn.Module):
        def __init__(self, width, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(width, 3 * width, bias=False)
            self.proj = nn.Linear(width, width, bias=False)

        def forward(self, x, cos, sin, cache=None):
            B, T, C = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if cache is not None:
                if cache[0] is not None:
                    k = torch.cat((cache[0], k), 2)
                    v = torch.cat((cache[1], v), 2)
                past = 0 if cache[0] is None else cache[0].shape[2]
                cache[0], cache[1] = k, v
            else:
                past = 0
            if past == 0 and a.fp32_attention and q.dtype == torch.bfloat16:
                # what wick-gpt does on the CPU: the flash kernel in float32
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(T, past + T, dtype=torch.bool).tril(past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))

    class SwiGLU(nn.Module):
        def __init__(self, width, hidden):
            super().__init__()
            self.gate = nn.Linear(width, hidden, bias=False)
            self.up = nn.Linear(width, hidden, bias=False)
            self.down = nn.Linear(hidden, width, bias=False)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = RMSNorm(a.width)
            self.attn = Attention(a.width, a.heads)
            self.norm2 = RMSNorm(a.width)
            self.ffn = SwiGLU(a.width, a.ffn_hidden)

        def forward(self, x, cos, sin, cache=None):
            h = x + self.attn(self.norm1(x), cos, sin, cache)
            return h + self.ffn(self.norm2(h))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, a.width)
            self.blocks = nn.ModuleList(Block() for _ in range(a.layers))
            self.norm = RMSNorm(a.width)
            self.head = nn.Linear(a.width, 256, bias=False)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if p.dim() >= 2:
                        residual = "proj" in name or "down" in name
                        p.normal_(0.0, 0.02 / math.sqrt(2 * a.layers) if residual else 0.02)
            half = a.width // a.heads // 2
            inv = a.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
            angles = torch.outer(torch.arange(a.context, dtype=torch.float64), inv)
            self.register_buffer("cos", angles.cos().float())
            self.register_buffer("sin", angles.sin().float())

        def forward(self, tokens, caches=None, past=0):
            T = tokens.shape[1]
            cos, sin = self.cos[past:past + T], self.sin[past:past + T]
            x = self.embed(tokens)
            for i, b in enumerate(self.blocks):
                x = b(x, cos, sin, None if caches is None else caches[i])
            return self.head(self.norm(x))

    torch.manual_seed(a.seed)
    return GPT()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn-hidden", type=int, default=512)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rope-base", type=float, default=10000.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp32-attention", action="store_true",
                   help="attention in float32 under bf16 autocast, as wick-gpt does on the CPU (case *_fp32_attention)")
    p.add_argument("--cases", default="train,generate")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the whole run (0: none)")
    a = p.parse_args()

    cuda = a.device == "cuda"
    case_suffix = ("_compile" if a.compile else "") + ("_fp32_attention" if a.fp32_attention else "")
    if cuda:
        case_suffix += "_cuda" + ("_fp32" if a.precision == "fp32" else "")

    def out_of_time():
        # A watchdog thread, not a signal: torch.compile swallows exceptions raised inside it.
        print(json.dumps({"case": "python_train" + case_suffix, "device": a.device, "precision": a.precision,
                          "error": f"over --time-limit {a.time_limit:g} s"}), flush=True)
        os._exit(0)

    if a.time_limit > 0:
        watchdog = threading.Timer(a.time_limit, out_of_time)
        watchdog.daemon = True
        watchdog.start()

    import torch

    torch.set_num_threads(a.threads)
    if cuda:
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # TF32 off: fp32 means fp32
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    g = torch.Generator().manual_seed(a.seed + 1)
    data = torch.randint(0, 256, (a.steps + a.warmup, a.batch, a.context + 1), generator=g)
    if cuda:
        data = data.to("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if "train" in a.cases:
        runs = []
        error = None
        for _ in range(a.repeats):
            model = build(torch, a).to(a.device)
            decay = [p for p in model.parameters() if p.dim() >= 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=a.lr, betas=(0.9, 0.95), fused=True)
            compile_s = None
            fwd = torch.compile(model) if a.compile else model

            def step(i):
                batch = data[i]
                with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                    logits = fwd(batch[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                return loss

            try:
                tc = time.perf_counter()
                for i in range(a.warmup):
                    loss = step(i)
                    if i == 0:
                        check_loss = loss.item()
                        compile_s = time.perf_counter() - tc
                sync()
                t0 = time.perf_counter()
                for i in range(a.steps):
                    loss = step(a.warmup + i)
                sync()
                runs.append(1e3 * (time.perf_counter() - t0) / a.steps)
            except Exception as e:  # torch.compile may fail on a machine without a compiler; or out of time
                error = f"{type(e).__name__}: {e}"[:500]
                break
        line = {"case": "python_train" + case_suffix, "threads": a.threads, "batch": a.batch, "context": a.context,
                "device": a.device, "precision": a.precision}
        if runs:
            line.update({"ms_per_step": statistics.median(runs), "runs_ms": runs, "check_loss": check_loss,
                         "tokens_per_s": a.batch * a.context / (statistics.median(runs) / 1e3)})
            if compile_s is not None:
                line["first_step_s"] = compile_s  # torch.compile's compilation, when compiling
        if error:
            line["error"] = error
        print(json.dumps(line), flush=True)

    if "generate" in a.cases and not cuda:
        model = build(torch, a).eval()
        fwd = torch.compile(model) if a.compile else model
        prompt = data[0, 0, :16].unsqueeze(0)
        runs = []
        with torch.inference_mode():
            for r in range(a.repeats + 1):
                caches = [[None, None] for _ in range(a.layers)]
                t0 = time.perf_counter()
                logits = model(prompt, caches, 0)
                past = prompt.shape[1]
                for _ in range(a.new_tokens):
                    nxt = logits[0, -1].argmax().view(1, 1)
                    logits = model(nxt, caches, past)
                    past += 1
                if r > 0:  # the first run warms up
                    runs.append(1e3 * (time.perf_counter() - t0) / a.new_tokens)
        print(json.dumps({"case": "python_generate", "threads": a.threads, "new_tokens": a.new_tokens,
                          "ms_per_token": statistics.median(runs), "runs_ms": runs}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
