"""Whether int8 (per-channel int8 weights, int8 activations) is worth offering on this CPU: its
speed against bfloat16 at the embedded model's layer shapes, and its price in held-out loss.

Speed: oneDNN's quantised inner product (``torch.ops.onednn.qlinear_pointwise``, one scale
for the activations, per-channel scales for the weights, float32 out) against its bfloat16
inner product on packed weights, 64 rows, each of the model's linear shapes.

Price: the embedded model's held-out loss (nats per token over the bundled role-prompts and
quotes held-out texts) in float32, against the same model with every linear layer's weight
rounded to int8 per output channel and its input rounded to int8 as each call sees it: one
scale for the whole input (what oneDNN's kernel takes), or one scale per token (finer; no
oneDNN kernel takes it). Simulated in float32 (quantise, then scale back), which gives the
int8 kernel's numbers up to float rounding.

The engine offers int8 only where the loss moves by less than 1% and it is faster.

Run: .venv/bin/python benchmarks/check_int8_price.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import emit  # noqa: E402


def gflops(call, flops: float, repeats: int = 20) -> float:
    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return flops * repeats / (time.perf_counter() - start) / 1e9


def speed(shapes: list[tuple[int, int]], rows: int) -> list[dict]:

    out = []
    for features_out, features_in in shapes:
        out.append(emit(speed_of(features_out, features_in, rows)))
    return out


def speed_of(features_out: int, features_in: int, rows: int) -> dict:
    """bfloat16 and int8 GFLOP/s of one linear shape at ``rows`` rows."""
    import torch

    weight, x = torch.randn(features_out, features_in), torch.randn(rows, features_in)
    flops = 2 * rows * features_out * features_in
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), None)
    narrow = x.bfloat16()
    bf16 = gflops(
        lambda: torch.ops.mkldnn._linear_pointwise(narrow, packed, None, "none", [], ""), flops
    )
    scales = weight.abs().amax(1) / 127
    quantised = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    x_scale = float(x.abs().max() / 127)
    xq = (torch.round(x / x_scale).clamp(-127, 127) + 128).to(torch.uint8)
    zeros = torch.zeros(features_out, dtype=torch.long)
    record: dict = {"shape": [features_out, features_in], "rows": rows}
    record["bfloat16_gflops"] = round(bf16)
    try:
        q_packed = torch.ops.onednn.qlinear_prepack(quantised, [rows, features_in])
        int8 = gflops(
            lambda: torch.ops.onednn.qlinear_pointwise(
                xq,
                x_scale,
                128,
                q_packed,
                scales,
                zeros,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            ),  # fmt: skip
            flops,
        )
        record.update(int8_gflops=round(int8), int8_over_bfloat16=round(int8 / bf16, 2))
    except (RuntimeError, AttributeError) as exc:
        record["int8"] = f"not available here: {str(exc).splitlines()[0][:200]}"
    return record


def held_out_loss(model, tokenizer, texts: list[str]) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from softprompt.data import load_texts
    from softprompt.engine.autotune import cpu_signature
    from softprompt.models import load_base_model

    emit({"cpu": cpu_signature(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    base = load_base_model()
    model, tokenizer = base.model, base.tokenizer
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = sorted({tuple(m.weight.shape) for m in linears}, reverse=True)
    rates = speed([(int(o), int(i)) for o, i in shapes], args.rows)

    texts = []
    for source in ("examples:role-prompts:heldout", "examples:quotes:heldout"):
        texts += load_texts(source).texts
    exact = held_out_loss(model, tokenizer, texts)
    for linear in linears:
        weight = linear.weight.data
        scale = weight.abs().amax(1, keepdim=True) / 127
        linear.weight.data = torch.round(weight / scale).clamp(-127, 127) * scale
    prices = {}
    for granularity in ("per tensor", "per token"):

        def rounded(module, inputs, granularity=granularity):
            x = inputs[0]
            if granularity == "per tensor":
                scale = x.abs().amax() / 127
            else:
                scale = x.abs().amax(-1, keepdim=True) / 127
            scale = scale.clamp_min(1e-12)
            return (torch.round(x / scale).clamp(-127, 127) * scale,)

        hooks = [m.register_forward_pre_hook(rounded) for m in linears]
        loss = held_out_loss(model, tokenizer, texts)
        for hook in hooks:
            hook.remove()
        prices[granularity] = emit(
            {
                "activations": f"int8 {granularity}",
                "weights": "int8 per output channel",
                "texts": len(texts),
                "loss_float32": round(exact, 4),
                "loss_int8": round(loss, 4),
                "loss_difference_percent": round(100 * (loss - exact) / exact, 2),
            }
        )
    faster = [r["int8_over_bfloat16"] for r in rates if "int8_over_bfloat16" in r]
    offered = (
        bool(faster) and min(faster) > 1 and (prices["per tensor"]["loss_difference_percent"] < 1)
    )
    emit(
        {
            "summary": {
                "int8_over_bfloat16_per_shape": faster,
                "loss_difference_percent_per_tensor": prices["per tensor"][
                    "loss_difference_percent"
                ],
                "loss_difference_percent_per_token": prices["per token"]["loss_difference_percent"],
                "offer_int8": offered,
            }
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
