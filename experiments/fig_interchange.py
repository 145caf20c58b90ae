"""Figure: cross-modal interchange score per span and task."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("curve", "interchange"), figures.interchange_bars)
