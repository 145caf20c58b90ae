"""Figure: back-patching accuracy gains on visual prompts and the textual control."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("backpatch",), figures.backpatch_bars)
