"""Pictures of D2C-SR's inner workings: weight-map heatmaps and labelled grids (paper Fig. 10)."""
import cv2
import numpy as np


def weight_heatmap(weight, vmax=1.0):
    """A weight map (H, W) as a colour heatmap: uint8 BGR (H, W, 3), 0 blue .. ``vmax`` red.

    With P branches the weights hover around 1/P; ``vmax=2/P`` puts that in the middle of the
    colour scale, so where a branch is preferred (red) or avoided (blue) is easy to see.
    """
    weight = np.clip(np.asarray(weight, dtype=np.float32) / vmax, 0, 1)
    return cv2.applyColorMap((weight * 255).round().astype(np.uint8), cv2.COLORMAP_JET)


def labelled_grid(rows, labels, pad=4, label_height=22):
    """Tile uint8 BGR images of equal size into one picture with a caption above each.

    Args:
        rows (list[list[ndarray | None]]): images per row; None leaves a blank cell.
        labels (list[list[str]]): captions, same layout.

    Returns:
        ndarray: uint8 BGR picture.
    """
    cells = [img for row in rows for img in row if img is not None]
    height, width = cells[0].shape[:2]
    num_cols = max(len(row) for row in rows)
    cell_h, cell_w = height + label_height + pad, width + pad
    canvas = np.full((len(rows) * cell_h + pad, num_cols * cell_w + pad, 3), 255, np.uint8)
    for r, (row, row_labels) in enumerate(zip(rows, labels)):
        for c, (img, label) in enumerate(zip(row, row_labels)):
            if img is None:
                continue
            if img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            y, x = r * cell_h + pad, c * cell_w + pad
            cv2.putText(canvas, label, (x + 2, y + label_height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                        cv2.LINE_AA)
            canvas[y + label_height:y + label_height + height, x:x + width] = img
    return canvas
