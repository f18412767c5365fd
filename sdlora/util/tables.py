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


ROLE_LABELS = {"down": "A", "up": "B", "factor": "W", "magnitude": "m", "scale": "alpha"}  # as the log labels read


def plan_table(layers, groups, cfg, family) -> str:
    """One row per adapted module: name, kind, rank, alpha, init, rates (per role: A / B / ... / alpha), parameters;
    then the count per part of `family` (model/parts.py)."""
    rate_of = {id(p): g["lr"] for g in groups.groups for p in g["params"]}
    roles = [r for r in ROLE_LABELS if any(r == layer.PARAMETER_ROLES[n] for layer in layers.values()
                                           for n in layer.parameters_by_name())]
    rows, total = [], 0
    for name, layer in layers.items():
        n = sum(p.numel() for p in layer.trainable_parameters().values())
        total += n
        mine = [(layer.PARAMETER_ROLES[k], p) for k, p in layer.parameters_by_name().items()]

        def rate(role):
            ps = [p for r, p in mine if r == role]
            if not ps:
                return "-"
            return f"{rate_of[id(ps[0])]:.2e}" if ps[0].requires_grad else "frozen"

        rows.append([name, layer.kind, layer.rank, f"{float(layer.alpha.detach()):g}", layer.init_scheme,
                     "/".join(rate(r) for r in roles), f"{n:,}"])
    table = format_table(["module", "kind", "rank", "alpha", "init", "lr " + "/".join(ROLE_LABELS[r] for r in roles),
                          "params"], rows, "lllrlrr")
    groups_txt = "\n".join(f"  {g['name']}: lr {g['lr']:.3e}, {sum(p.numel() for p in g['params']):,} params"
                           for g in groups.groups)
    counts = [(sum(1 for n in layers if n.startswith(part + ".")), title) for part, title in _part_titles(family)]
    per_part = ", ".join(f"{n} {title}" for i, (n, title) in enumerate(counts) if n or i < 2)  # a later encoder: if adapted
    return (f"{table}\n\n{len(layers)} modules ({per_part}), "
            f"{total:,} trainable parameters\noptimiser groups:\n{groups_txt}")


def _part_titles(family) -> list[tuple[str, str]]:
    """(part, what the plan's summary calls it) for the family's adaptable parts: `UNet` (the denoiser's class
    name without `2DConditionModel`), `text encoder`, `text encoder 2`, ..."""
    denoiser = family.denoiser
    titles = [(denoiser.name, denoiser.model_class.rpartition(".")[2].removesuffix("2DConditionModel"))]
    titles += [(name, "text encoder" + (f" {i + 1}" if i else "")) for i, name in enumerate(family.text_encoders)]
    return titles
