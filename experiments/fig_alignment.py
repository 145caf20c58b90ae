"""Figure: image-to-text alignment of residuals across layers."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("alignment",), figures.alignment_lines)
