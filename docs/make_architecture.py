"""Draws docs/architecture.png: who holds what, and the one direction data flows."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {
    "c1": (0.02, 0.70, "Client node A\n(ray job submit\n jobs/client_train.py)\nimages stay here\n"
                       "Ray Train: BlockLoRA slot 3"),
    "c2": (0.02, 0.40, "Client node B\nRay Train: slot 7"),
    "c3": (0.02, 0.10, "Client node C\nRay Train: slot 12"),
    "coord": (0.37, 0.40, "Coordinator actor\n(named, detached, max_restarts)\nslots + owner tokens (hashed)\n"
                          "validates artifacts\nmerged residual, version v\nstate dir: safetensors + manifest"),
    "serve": (0.70, 0.55, "Serve generator replicas\nbase loaded once\nper-slot factors; apply only\n"
                          "changed concept's rows\nper-request subsets batched"),
    "http": (0.70, 0.15, "FastAPI ingress (127.0.0.1)\nPOST /v1/generate\nGET /v1/concepts\n"
                         "admin: POST/DELETE /v1/concepts"),
}
ARROWS = [("c1", "coord", "artifact: B rows, A,\ntoken embeds (safetensors)"), ("c2", "coord", ""), ("c3", "coord", ""),
          ("coord", "serve", "state(v) via object store"), ("http", "serve", "requests"),
          ("http", "coord", "admin add/remove\n(admin token)")]


def _edge(src: tuple, dst: tuple) -> tuple[float, float]:
    """Where an arrow from box `src` toward box `dst` leaves `src`: a side edge, or top/bottom."""
    cx, cy, _x, _y, w, h = src
    dx, dy = dst[0] - cx, dst[1] - cy
    if abs(dx) > w:
        return cx + (w / 2 if dx > 0 else -w / 2), cy + max(-h / 3, min(h / 3, dy / 3))
    return cx, cy + (h / 2 if dy > 0 else -h / 2)


def main(out: Path = Path(__file__).with_name("architecture.png")) -> None:
    fig, ax = plt.subplots(figsize=(12, 6.5))
    ax.set_axis_off()
    centers = {}
    for key, (x, y, text) in BOXES.items():
        w, h = 0.27, 0.24
        color = "#e8f1fb" if key.startswith("c") and key != "coord" else ("#fdf1dc" if key == "coord" else "#e6f5e6")
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01", fc=color, ec="#444"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)
        centers[key] = (x + w / 2, y + h / 2, x, y, w, h)
    for a, b, label in ARROWS:
        (xa, ya), (xb, yb) = _edge(centers[a], centers[b]), _edge(centers[b], centers[a])
        ax.add_patch(FancyArrowPatch((xa, ya), (xb, yb), arrowstyle="-|>", mutation_scale=14, color="#333"))
        if label:
            ax.text((xa + xb) / 2 + 0.01, (ya + yb) / 2 + 0.03, label, ha="left" if abs(xa - xb) < 0.05 else "center",
                    fontsize=8, style="italic", bbox={"fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_title("blocklora: concepts flow one way — client artifact → coordinator → serve replicas", fontsize=11)
    fig.savefig(out, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
