"""Memory per Mac for Qwen3.8-Flash-Next (qwen4_exp) at 4-bit, from its shapes (no weights needed).

    .venv/bin/python scripts/qwen4exp_memory.py

Shapes from the public configs/implementations: 48 layers (36 GDN + 12 indexed attention),
hidden 2560, 4 hyper-connection streams (rank 320), attention 24/2 heads of 256 (gated q),
indexer 4 + 1 heads of 128, GDN 16 key / 32 value heads of 128 (transformers' defaults; the
release's exact value-head count moves the total by <1%), 512 experts + 1 shared of width 640,
vocab 248320 (untied), one n-gram table of 320M x 160 on one layer. "4-bit" is `convert -q`:
group 64 (4.5 bits/weight), group 32 where the group does not divide the row (the table's
160-wide rows: 5 bits/weight), routers and inject weights at 8 bits. The placement follows
`mtpdist.placement.plan_layers` (contiguous ranges, proportional to memory).
"""

from __future__ import annotations

from mtpdist.placement import plan_layers

H, L, HC, RANK, V = 2560, 48, 4, 320, 248320
ATT_EVERY, HEADS, KV, HD, IDX_H, IDX_D = 4, 24, 2, 256, 4, 128
LK, LV, LD, E, EW, TOP = 16, 32, 128, 512, 640, 10
TABLE_ROWS, TABLE_W, TABLE_LAYER = 320_000_000, 160, 1
Q4, Q4G32, Q8, BF16 = 4.5 / 8, 5 / 8, 8.5 / 8, 2.0
GB = 1e9


def layer_params(linear: bool) -> tuple[float, float]:
    """(params at 4-bit, params at 8-bit) of one decoder layer, the n-gram table excluded."""
    hc = 2 * (2 * HC * H * RANK)
    moe = E * 3 * H * EW + 3 * H * EW
    if linear:
        kd, vd = LK * LD, LV * LD
        mixer = H * (2 * kd + vd) + H * vd + 2 * H * LV + vd * H
    else:
        mixer = H * HEADS * HD * 2 + 2 * H * KV * HD + HEADS * HD * H + H * (IDX_H + 1) * IDX_D
    return mixer + hc + moe, E * H + H + 2 * HC * H   # router, shared-expert gate, inject weights


def main() -> None:
    per_layer = []
    for i in range(L):
        q4, q8 = layer_params((i + 1) % ATT_EVERY != 0)
        b = q4 * Q4 + q8 * Q8
        if i == TABLE_LAYER:
            b += TABLE_ROWS * TABLE_W * Q4G32 + (H * HC * H + H * H) * Q4   # table + its projections
        per_layer.append(int(b))
    table = TABLE_ROWS * TABLE_W * Q4G32
    head = 2 * V * H * Q4
    mtp_params = layer_params(False)[0] + 2 * H * H + HC * H * RANK * 2
    print(f"decoder layers 4-bit: {sum(per_layer) / GB:.1f} GB, of which the n-gram table {table / GB:.1f} GB "
          f"(layer {TABLE_LAYER}); bf16 all weights: "
          f"{(sum(sum(layer_params(i % 4 != 3)) for i in range(L)) + TABLE_ROWS * TABLE_W + 2 * V * H + mtp_params) * BF16 / GB:.0f} GB")
    print(f"coordinator: embedding + lm_head 4-bit {head / GB:.2f} GB; MTP head bf16 {mtp_params * BF16 / GB:.1f} GB "
          f"(4-bit {mtp_params * Q4 / GB:.1f} GB)")
    kv = (L // ATT_EVERY) * 2 * KV * HD * 2
    idx = (L // ATT_EVERY) * (IDX_D * 2 + IDX_D * 2 / 4)
    gdn = (L - L // ATT_EVERY) * (LV * LD * LD * 4 + 3 * (2 * LK * LD + LV * LD) * 2)
    print(f"per sequence: GDN state {gdn / 2**20:.0f} MiB; per 1k tokens: KV {kv * 1000 / 2**20:.1f} MiB + "
          f"indexer keys {idx * 1000 / 2**20:.1f} MiB; between stages {HC * H * 2 / 1024:.0f} KiB a token (bf16)")
    active = ((L - L // 4) * layer_params(True)[0] + (L // 4) * layer_params(False)[0]
              - L * (E - TOP) * 3 * H * EW + V * H)
    print(f"active params a token: {active / 1e9:.1f}B (plus the table's 16 rows)")
    for n in (2, 3, 4):
        p = plan_layers([10**15] * n, per_layer, headroom=0.0)
        parts = ", ".join(f"layers {s}-{e - 1}: {b / GB:.1f} GB" for (s, e), b in zip(p.ranges, p.bytes_per_worker))
        print(f"{n} Macs, equal memory: {parts}")


if __name__ == "__main__":
    main()
