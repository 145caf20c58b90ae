"""Figure: nIoU of textual and visual circuits per task and span (heatmap)."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("curve", "overlap"), figures.overlap_heatmap)
