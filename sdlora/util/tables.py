"""Human-readable tables: the dry-run plan of adapted modules."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def plan_table(layers, groups, cfg) -> str:
    """One row per adapted module: name, kind, rank, alpha, init, rates (A / B / alpha), trainable parameters."""
    rate_of = {id(p): g["lr"] for g in groups.groups for p in g["params"]}
    rows, total = [], 0
    for name, layer in layers.items():
        params = layer.trainable_by_role()
        n = sum(p.numel() for p in params.values())
        total += n
        rates = "/".join(f"{rate_of[id(params[k])]:.2e}" if k in params else "frozen" for k in ("down", "up", "scale")
                         if k != "scale" or cfg.lora.learnable_alpha)
        rows.append([name, layer.kind, layer.rank, f"{float(layer.alpha):g}", layer.init_scheme, rates, f"{n:,}"])
    table = format_table(["module", "kind", "rank", "alpha", "init", "lr A/B" + ("/alpha" if cfg.lora.learnable_alpha else ""), "params"],
                         rows, "lllrlrr")
    n_unet = sum(1 for n in layers if n.startswith("unet."))
    groups_txt = "\n".join(f"  {g['name']}: lr {g['lr']:.3e}, {sum(p.numel() for p in g['params']):,} params"
                           for g in groups.groups)
    n_te2 = sum(1 for n in layers if n.startswith("text_encoder_2."))
    te = f"{len(layers) - n_unet - n_te2} text encoder" + (f", {n_te2} text encoder 2" if n_te2 else "")
    return (f"{table}\n\n{len(layers)} modules ({n_unet} UNet, {te}), "
            f"{total:,} trainable parameters\noptimiser groups:\n{groups_txt}")
