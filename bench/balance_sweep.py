"""Does the router's balance loss weight move expert specialization? Train one model per weight, compare.

    python -m bench.balance_sweep --variants 0,0.02,0.1,0.02/per_layer --minutes 3.5 [--size small]

A variant is a weight (`router_aux_loss_coef`), optionally `/per_layer` for a balance loss per layer
rather than transformers' one over all layers pooled (moe_build.train.per_layer_balance_loss). Each
variant trains the same preset with the same seed and data for the same
wall-clock budget; the runs share the machine at once (one process each), so every run gets about
the same share of it and the comparison stays fair even though each is slower than alone. Then
`bench.model_quality.measure` on each: held-out perplexity, header parse rate, and per layer the
Jensen–Shannon divergence between the experts code and prose tokens are routed to, beside how
unbalanced the routing is (the busiest expert's share of choices × experts: 1.0 = perfectly even).
Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.model_quality import measure

_TRAIN = (
    "import sys; from pathlib import Path; from moe_build.train import train; "
    "train(Path(sys.argv[1]), size=sys.argv[2], minutes=float(sys.argv[3]), "
    "aux_loss_coef=float(sys.argv[4]), balance=sys.argv[5], instruct_minutes=0, overwrite=True, "
    "progress=False)"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="0,0.02,0.1", help="COEF[/per_layer], comma-separated")
    p.add_argument("--minutes", type=float, default=3.5, help="training budget of each run")
    p.add_argument("--size", default="small", help="moe_build.train preset")
    p.add_argument("--work", type=Path, default=Path("/tmp/localmoe-balance-sweep"))
    p.add_argument("--headers", type=int, default=100)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [(float(v.split("/")[0]), [*v.split("/"), "pooled"][1]) for v in args.variants.split(",")]
    dirs = {v: args.work / f"aux-{v[0]:g}-{v[1]}" for v in variants}

    print(f"training {len(variants)} models at once, {args.minutes} min each…", file=sys.stderr, flush=True)
    procs = {
        v: subprocess.Popen(
            [sys.executable, "-c", _TRAIN, str(d), args.size, str(args.minutes), str(v[0]), v[1]]
        )
        for v, d in dirs.items()
    }
    failed = [v for v, proc in procs.items() if proc.wait() != 0]
    if failed:
        print(f"training failed for {failed}", file=sys.stderr)
        return 1

    rows = []
    for i, ((c, balance), d) in enumerate(dirs.items()):
        print(f"[{i + 1}/{len(dirs)}] measuring aux {c:g} {balance}…", file=sys.stderr, flush=True)
        q = measure(d, device=device, headers=args.headers, sequences=64)
        record = json.loads((d / "training.json").read_text())
        imbalance = {
            kind: [round(max(layer) * len(layer), 2) for layer in use] for kind, use in q.expert_use.items()
        }
        rows.append(
            {
                "aux_loss_coef": c,
                "balance": balance,
                "steps": record["steps"],
                "perplexity": q.perplexity["model"],
                "lenient": q.lenient,
                "strict": q.strict,
                "jsd": q.jsd,
                "jsd_mean": round(sum(q.jsd) / max(len(q.jsd), 1), 4),
                "busiest_expert_x_experts": imbalance,
            }
        )
    head = f"{'aux':>6} {'balance':>9} {'steps':>6} {'ppl code':>9} {'ppl prose':>10} {'parse':>6}"
    print(f"\n{head} {'JSD mean':>9}  JSD per layer")
    for r in rows:
        ppl = r["perplexity"]
        print(
            f"{r['aux_loss_coef']:>6g} {r['balance']:>9} {r['steps']:>6} "
            f"{ppl.get('code', float('nan')):>9.2f} {ppl.get('prose', float('nan')):>10.2f}"
            f" {r['lenient']:>6.0%} {r['jsd_mean']:>9.3f}  {r['jsd']}"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
