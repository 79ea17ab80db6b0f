"""Pictures of a training run: the routing heatmap (per sparse layer, the share of each modality's tokens each expert
receives) and the loss curve of the stages. Used by the quickstart and the chat app; matplotlib is imported when a
picture is drawn."""

from pathlib import Path
from typing import BinaryIO

import torch


def plot_routing(
    shares: torch.Tensor,
    layers: list[int | str],
    expert_names: list[str],
    path: str | Path | BinaryIO,
    *,
    row_labels: list[str],
    title: str = "Share of each modality's media tokens routed to each expert (top-k assignments, held-out data)",
    max_columns: int = 8,
) -> None:
    """Draw routing shares as one annotated heatmap per sparse layer (at most `max_columns` per row of panels).

    `shares` [rows, layers, experts] (rows named by `row_labels`: modalities, or a modality per token type), values in
    0..1; `expert_names` labels the experts under their index ("" for none); `path` is a file path or a binary file
    object, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if shares.shape[:2] != (len(row_labels), len(layers)):
        raise ValueError(f"shares of shape {tuple(shares.shape)} for {len(row_labels)} rows and {len(layers)} layers")
    columns = min(len(layers), max_columns)
    grid_rows = -(-len(layers) // columns)
    panel_height = 1.2 + 0.5 * len(row_labels)  # inches: 3.2 for the four modalities
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, panel_height * grid_rows), squeeze=False)
    for axis in axes.flat[len(layers):]:
        axis.set_visible(False)
    for index, (axis, layer) in enumerate(zip(axes.flat, layers)):
        axis.imshow(shares[:, index].numpy(), vmin=0, vmax=1, cmap="viridis")
        axis.set_title(layer if isinstance(layer, str) else f"layer {layer}")  # a str names the panel itself
        axis.set_xticks(range(len(expert_names)), [f"e{i}\n{name}" for i, name in enumerate(expert_names)], fontsize=7)
        axis.set_yticks(range(len(row_labels)), row_labels if index % columns == 0 else [""] * len(row_labels))
        for m in range(len(row_labels)):
            for e in range(len(expert_names)):
                value = shares[m, index, e].item()
                axis.text(e, m, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png", bbox_inches="tight")
    plt.close(figure)


def plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for title, entries in histories.items():
        steps = list(range(offset, offset + len(entries)))
        axis.plot(steps, [entry["ce_loss"] for entry in entries], label=title)
        offset += len(entries)
    axis.set_xlabel("logging step (10 optimizer steps each; stage 2: one expert after another)")
    axis.set_ylabel("cross-entropy")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
