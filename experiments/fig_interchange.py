"""Figure: cross-modal interchange score per span and task."""
from modality_circuits import figures
from modality_circuits.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("curve", "interchange"), figures.interchange_bars)
